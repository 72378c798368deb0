"""Variants of TWA beyond the paper's basic method: the affine hull, and layer-wise coefficients.

Affine: the paper relaxes the constraint sum(alpha) = 1 and trains in the whole span. Here the network trains in
the affine hull instead, w = c + P_d^T b, where c is the center of the checkpoints and P_d an orthonormal basis
of the differences w_i - c; weight decay pulls b towards 0, i.e. towards the uniform average (SWA). The
coefficients then sum to exactly 1. P_d comes from the span's basis without rereading a file: the differences
are coords - mean(coords) in subspace coordinates, so P_d = U^T P with U from their SVD.

Layer-wise: every group of parameter tensors gets its own averaging coefficients. The subspace is the direct sum
of the per-group spans, with one basis per group; memory and step cost are those of one basis of the same size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from twa_cli.core.basis import Basis, orthogonalize
from twa_cli.core.coefficients import LayerGroup
from twa_cli.engine.subspace import FlatParameters, Projector, SubspaceSGD
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import Checkpoint

GRANULARITIES = ("model", "layer")
# Final coordinates -> (one alpha per checkpoint, or None; per group of tensors, or None).
Report = Callable[[torch.Tensor], tuple[list[float] | None, list[LayerGroup] | None]]


# ---------------------------------------------------------------------------------------------- affine


def affine_basis(basis: Basis, tol: float = 1e-7) -> tuple[Basis, torch.Tensor]:
    """The directions of the checkpoints' affine hull (a Basis whose coords are the centered checkpoints),
    and the center c as a flat parameter vector."""
    center = basis.center_coords()
    delta = basis.coords - center[:, None]  # (k, n): w_i - c in subspace coordinates
    u, s, _ = torch.linalg.svd(delta, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        raise TwaError("--affine needs at least two distinct checkpoints")
    rank = int((s > tol * s[0]).sum())
    u = u[:, :rank]  # (k, r), orthonormal columns
    vectors = torch.empty(rank, basis.dim, dtype=torch.float32)
    step = 1 << 16  # fp64 a slice of columns at a time: the basis may be large
    for start in range(0, basis.dim, step):
        chunk = basis.vectors[:, start : start + step].double()
        vectors[:, start : start + step] = (u.t() @ chunk).float()
    directions = Basis(
        vectors=vectors, coords=u.t() @ delta, layout=basis.layout, buffers=basis.buffers, sources=basis.sources,
        dropped=basis.dropped, recorded=basis.recorded, errors=dict(basis.errors),
    )
    return directions, basis.point(center)


def affine_coefficients(directions: Basis, coords: torch.Tensor) -> torch.Tensor:
    """alpha with sum(alpha) = 1 and sum_i alpha_i w_i = c + P_d^T b.

    The centered checkpoints sum to zero, so the all-ones vector is in the null space of their coordinates and
    the smallest-norm solution of coords beta = b is orthogonal to it: alpha = 1/n + beta sums to 1 exactly.
    """
    n = directions.coords.shape[1]
    return torch.full((n,), 1.0 / n, dtype=torch.float64) + directions.coefficients(coords)


# ---------------------------------------------------------------------------------------------- layer-wise


def layer_groups(layout: list[tuple[str, tuple[int, ...]]], group_size: int = 1) -> list[list[str]]:
    """Consecutive groups of `group_size` parameter tensors, in the order they fill the parameter vector."""
    if group_size < 1:
        raise TwaError(f"--group-size must be at least 1 (got {group_size})")
    names = [name for name, _ in layout]
    return [names[i : i + group_size] for i in range(0, len(names), group_size)]


def layerwise_bases(ckpts: list[Checkpoint], groups: list[list[str]], *, tol: float = 1e-6) -> list[Basis]:
    """One basis per group of tensors (each group's span is orthogonalized on its own). The sources and their
    hashes are the global basis's; hashing every file again per group would only reread them."""
    return [orthogonalize(ckpts, names=group, tol=tol, hashes=False, warn=False) for group in groups]


@dataclass
class _Block:
    params: slice  # where the group sits in the flat parameter vector
    coords: slice  # where its coordinates sit in the concatenated coordinate vector
    vectors: torch.Tensor  # (k_g, D_g)


class Blocks(Projector):
    """The direct sum of per-group subspaces: a block-diagonal P, one pair of matrix-vector products per
    group. SubspaceSGD runs eq. 8 on the concatenated coordinates with it."""

    def __init__(self, bases: list[Basis], dim: int, device: torch.device):
        self.blocks: list[_Block] = []
        p0 = c0 = 0
        for basis in bases:
            k, d = basis.vectors.shape
            self.blocks.append(_Block(slice(p0, p0 + d), slice(c0, c0 + k), basis.vectors.to(device, torch.float32)))
            p0, c0 = p0 + d, c0 + k
        if p0 != dim:
            raise TwaError("the layer-wise bases do not cover every trainable parameter")
        self.rank = c0

    def coords_of(self, vector: torch.Tensor, out: torch.Tensor) -> None:
        for b in self.blocks:
            torch.mv(b.vectors, vector[b.params], out=out[b.coords])

    def point_of(self, coords: torch.Tensor, out: torch.Tensor) -> None:
        for b in self.blocks:
            torch.mv(b.vectors.t(), coords[b.coords], out=out[b.params])


def layerwise_coefficients(bases: list[Basis], coords: torch.Tensor) -> list[list[float]]:
    """One row of averaging coefficients per group."""
    rows, c0 = [], 0
    for basis in bases:
        rows.append([float(a) for a in basis.coefficients(coords[c0 : c0 + basis.rank])])
        c0 += basis.rank
    return rows


# ---------------------------------------------------------------------------------------------- wiring


def build_variant(
    basis: Basis,
    ckpts: list[Checkpoint],
    flat: FlatParameters,
    start: tuple[torch.Tensor, torch.Tensor | None],
    *,
    affine: bool,
    granularity: str,
    group_size: int,
    tol: float,
    hyper: dict[str, float],
) -> tuple[SubspaceSGD, Report]:
    """The optimizer of a variant, and a function from its final coordinates to the coefficients to report
    (per checkpoint, or per group of tensors and checkpoint). `ckpts`: the checkpoints the basis was made of
    (the layer-wise bases are made from them again)."""
    start_coords, offspan = start
    w0 = basis.point(start_coords).double()  # the starting point as a parameter vector
    if offspan is not None:
        w0 += offspan.double().cpu()
    device = flat.params.device
    if granularity not in GRANULARITIES:
        raise TwaError(f"--granularity must be one of {', '.join(GRANULARITIES)} (got '{granularity}')")
    if affine and granularity != "model":
        raise TwaError("--affine works with --granularity model only")
    if affine:
        directions, center = affine_basis(basis)
        coords = directions.vectors.double() @ (w0 - center.double())  # a start off the hull is projected onto it
        optimizer = SubspaceSGD(flat, directions.vectors.to(device), coords, offspan=center.to(device),
                                offspan_decays=False, **hyper)
        return optimizer, lambda b: ([float(a) for a in affine_coefficients(directions, b)], None)
    bases = layerwise_bases(ckpts, layer_groups(basis.layout, group_size), tol=tol)
    pieces, offset = [], 0
    for b in bases:
        pieces.append(b.vectors.double() @ w0[offset : offset + b.dim])
        offset += b.dim
    optimizer = SubspaceSGD(flat, Blocks(bases, flat.params.numel(), device), torch.cat(pieces), **hyper)

    def table(coords: torch.Tensor) -> tuple[None, list[LayerGroup]]:
        rows = layerwise_coefficients(bases, coords)
        return None, [LayerGroup([n for n, _ in b.layout], b.rank, r) for b, r in zip(bases, rows, strict=True)]

    return optimizer, table
