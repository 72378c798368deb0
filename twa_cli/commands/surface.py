"""Training loss and test error over a grid of the trajectory's plane (the background of the paper's Figure 6).

A point (x, y) of the plane is the network whose trainable weights are `vectors.T @ (mean + x u1 + y u2)`.
BatchNorm statistics are recomputed at every grid point, on the same training batches the loss is measured
on: the statistics any checkpoint carries belong to other weights, and a point scored with them would show
the mismatch, not the weights (SWA and TWA themselves are scored after recalibration). Networks without
BatchNorm skip it. The first `batches` batches, in a fixed order, serve every grid point, so neighbouring
points differ only by their weights. The figures are the task's: training loss, and test error (100 minus
accuracy) where the task measures accuracy, else test loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch

from twa_cli.core.basis import Basis
from twa_cli.core.batching import plain_batches
from twa_cli.core.batchnorm import recalibrate_on
from twa_cli.core.pca import Pca
from twa_cli.engine.batch import move
from twa_cli.engine.batchnorm import has_batchnorm
from twa_cli.errors import TwaError
from twa_cli.tasks.base import Task


@dataclass
class Surface:
    xs: torch.Tensor  # (r,) positions along the first direction
    ys: torch.Tensor  # (r,) positions along the second direction
    train_loss: torch.Tensor  # (r, r): [row j = ys[j], column i = xs[i]]
    test_error: torch.Tensor  # (r, r): percent, or the test loss (see `test_label`)
    batches: int
    bn_recomputed: bool
    test_label: str = "test error (%)"


def grid_extent(points: torch.Tensor, margin: float = 0.2) -> tuple[tuple[float, float], tuple[float, float]]:
    """A box around the given (p, 2) points, `margin` of its size wider on every side."""
    lo, hi = points.min(dim=0).values, points.max(dim=0).values
    pad = (hi - lo).clamp_min(1e-12) * margin
    return (float(lo[0] - pad[0]), float(hi[0] + pad[0])), (float(lo[1] - pad[1]), float(hi[1] + pad[1]))


@torch.no_grad()
def loss_surface(
    basis: Basis,
    pca: Pca,
    extent: tuple[tuple[float, float], tuple[float, float]],
    task: Task,
    *,
    resolution: int = 11,
    num_batches: int = 4,
    batch_size: int = 128,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Surface:
    if resolution < 2:
        raise TwaError(f"--resolution must be at least 2 (got {resolution})")
    net = task.build_model()
    state = net.state_dict()
    for name, value in basis.buffers.items():
        if name in state:
            state[name] = value
    net.load_state_dict(state)
    net.to(device).eval()
    params = dict(net.named_parameters())
    shapes = {name: tuple(params[name].shape) for name, _ in basis.layout}
    # The plane in weight space: origin and two directions, each a D-vector built once.
    vectors = basis.vectors.to(device=device, dtype=torch.float32)
    origin, d1, d2 = (vectors.T @ c.to(device=device, dtype=torch.float32)
                      for c in (pca.mean, pca.directions[:, 0], pca.directions[:, 1]))
    del vectors
    train = _first_batches(task, "train", batch_size, num_batches, device)
    test = _first_batches(task, "test", batch_size, num_batches, device)
    recompute = has_batchnorm(net)
    xs = torch.linspace(*extent[0], resolution, dtype=torch.float64)
    ys = torch.linspace(*extent[1], resolution, dtype=torch.float64)
    loss = torch.empty(resolution, resolution, dtype=torch.float64)
    error = torch.empty(resolution, resolution, dtype=torch.float64)
    label = "test error (%)"
    done = 0
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            _load_flat(params, basis.layout, shapes, origin + float(x) * d1 + float(y) * d2)
            if recompute:
                recalibrate_on(net, task, train, device=device)
            loss[j, i] = task.metrics(net, train, device=device).loss
            scored = task.metrics(net, test, device=device)
            if scored.accuracy is not None:
                error[j, i] = 100.0 - scored.accuracy
            else:
                error[j, i], label = scored.loss, "test loss"
            done += 1
            if progress is not None:
                progress(done, resolution * resolution)
    return Surface(xs, ys, loss, error, len(train), recompute, label)


def _first_batches(task: Task, split: str, batch_size: int, count: int, device: str) -> list[Any]:
    dataset = task.split(split, augment=False)
    if dataset is None:
        raise TwaError(f"--surface: the data has no {split} split")
    return [move(b, device) for b in islice(plain_batches(task, dataset, batch_size), count)]


def _load_flat(params: dict[str, torch.nn.Parameter], layout: list[tuple[str, Any]],
               shapes: dict[str, tuple[int, ...]], flat: torch.Tensor) -> None:
    offset = 0
    for name, _ in layout:
        p = params[name]
        p.copy_(flat[offset : offset + p.numel()].view(shapes[name]))
        offset += p.numel()
