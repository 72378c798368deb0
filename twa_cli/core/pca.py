"""Principal directions of a run's checkpoints, computed from the coordinates a basis already holds.

Checkpoint i is `vectors.T @ coords[:, i]` with orthonormal rows in `vectors`, so distances and inner products
between checkpoints are those of the columns of `coords`: the PCA of n checkpoints of D parameters is the PCA
of n points in k <= n dimensions, exact and cheap, without reading a checkpoint again. The parameters are the
trainable ones (the basis leaves buffers out), as in the paper's Figure 2 and Figure 6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twa_cli.core.basis import Basis
from twa_cli.errors import TwaError


@dataclass
class Pca:
    """Principal directions of the checkpoints, in basis coordinates (mean as origin)."""

    mean: torch.Tensor  # (k,) float64: coordinates of the mean of the checkpoints (SWA's trainable weights)
    directions: torch.Tensor  # (k, m) float64: orthonormal columns, by decreasing variance
    variances: torch.Tensor  # (m,) float64: variance along each direction (sum of squares / (n - 1))
    points: torch.Tensor  # (n, m) float64: every checkpoint on every direction

    @property
    def shares(self) -> torch.Tensor:
        """The fraction of the total variance along each direction (sums to 1)."""
        return self.variances / self.variances.sum()

    @property
    def plane_share(self) -> float:
        """The fraction of the variance kept by the first two directions (the plane of the trajectory plot)."""
        return float(self.shares[:2].sum())

    def directions_for(self, fraction: float = 0.99) -> int:
        """How many leading directions hold at least `fraction` of the variance."""
        cumulative = torch.cumsum(self.shares, 0)
        return int((cumulative < fraction - 1e-12).sum()) + 1

    def plane_fraction(self, coords: torch.Tensor) -> float:
        """How much of a point's distance from the mean lies in the plane of the first two directions (0..1)."""
        offset = coords.to(torch.float64) - self.mean
        norm = float(offset.norm())
        return float((offset @ self.directions[:, :2]).norm()) / norm if norm > 0 else 1.0

    def project(self, coords: torch.Tensor) -> torch.Tensor:
        """(k,) or (k, p) coordinates of points of the span -> their positions on the first two directions."""
        coords = coords.to(torch.float64)
        if coords.dim() == 1:
            return (coords - self.mean) @ self.directions[:, :2]
        return ((coords.T - self.mean) @ self.directions[:, :2]).T


def checkpoint_pca(coords: torch.Tensor) -> Pca:
    """PCA of the columns of `coords` (k x n): checkpoints as points, centred on their mean.

    Signs are fixed so that the run moves towards +x and +y from its first to its last checkpoint, which
    makes plots of the same run comparable.
    """
    coords = coords.to(torch.float64)
    n = coords.shape[1]
    if n < 3:
        raise TwaError(f"a PCA of the trajectory needs at least 3 checkpoints (got {n})")
    mean = coords.mean(dim=1)
    centred = (coords.T - mean).T  # (k, n)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    keep = s > s[0] * 1e-12 if s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    if int(keep.sum()) < 2:
        raise TwaError("the checkpoints lie on a line: there is no plane to draw")
    u, s = u[:, keep], s[keep]
    points = centred.T @ u  # (n, m)
    flip = torch.sign(points[-1] - points[0])
    flip[flip == 0] = 1
    u, points = u * flip, points * flip
    return Pca(mean=mean, directions=u, variances=s.pow(2) / (n - 1), points=points)


def pca_of_basis(basis: Basis) -> Pca:
    return checkpoint_pca(basis.coords)


def coordinates_of(basis: Basis, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Basis coordinates of a weight file's trainable tensors, and how far it lies off the span (relative)."""
    missing = [name for name, _ in basis.layout if name not in tensors]
    if missing:
        raise TwaError(f"has no tensor '{missing[0]}' of the basis")
    w = torch.cat([tensors[name].reshape(-1).to(torch.float32) for name, _ in basis.layout])
    coords = basis.coords_of(w)  # fp64 a slice at a time: the basis may be large
    norm2 = float(w.double().pow(2).sum())
    # w = in-span part + residual, orthogonal: |residual|^2 = |w|^2 - |coords|^2
    residual = max(norm2 - float(coords.pow(2).sum()), 0.0) ** 0.5 / max(norm2 ** 0.5, 1e-300)
    return coords, residual
