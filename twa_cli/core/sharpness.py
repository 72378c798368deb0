"""A learning rate that stays stable in the subspace: the sharpness check behind `train-subspace --lr-check`.

The paper trains in the subspace at lr 2, twenty times SGD's. Whether that is stable depends on the span:
heavy-ball SGD on a quadratic diverges along a direction of curvature lambda once lr * lambda > 2 (1 + momentum).
The span of checkpoints sampled densely, or of a few early ones, contains the sharp directions SGD was
bouncing along, and there lr 2 throws the weights out of the basin (test accuracy falls to chance and does not
come back). So before training, the largest eigenvalue of the training loss's Hessian restricted to the span is
estimated by Lanczos iteration on Hessian-vector products (a few fixed batches, BatchNorm in training mode as
during the steps), and a learning rate above half the stability limit is lowered to that, with a warning.

A Hessian-vector product is a double backward through the model where the model allows it; fused attention
kernels and other custom operations may not, and then it is a central finite difference of two gradients.
Either way the products are read through the optimizer's own projection (`SubspaceSGD.gradient_coords`), so
the check runs unchanged, and gives the same number, in one process and under torchrun.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from twa_cli.engine.batch import Batch, move
from twa_cli.engine.subspace import SubspaceSGD
from twa_cli.tasks.base import TaskMetrics

# Half the stability limit: the estimate comes from a few batches at the start point, and the curvature
# seen along the way is larger than at the start (the steps go where the loss is lower and sharper).
MARGIN = 0.5
DOUBLE_BACKWARD = "double backward"
FINITE_DIFFERENCES = "finite differences"
# The weight-space step of a finite-difference product (see _finite_difference).
FD_STEP = 1e-4
# Each gradient of the check sees the same random state (dropout masks), so differences are of weights only.
CHECK_SEED = 0


# A run whose last epoch's training loss ends above this multiple of the loss at its start left the basin.
LEFT_BASIN = 1.5


@dataclass
class LrCheck:
    requested: float
    sharpness: float
    limit: float  # 2 (1 + momentum) / sharpness: the largest stable learning rate
    used: float
    method: str = DOUBLE_BACKWARD
    start_loss: float | None = None  # the training loss on the check's batches at the start

    def left_basin(self, end_loss: float | None) -> bool:
        """Whether a run that ended at training loss `end_loss` left the basin it started in: the lr check
        measures at the start only, and a span sharper further on throws the steps out at the allowed lr."""
        return self.start_loss is not None and end_loss is not None and end_loss > LEFT_BASIN * self.start_loss

    def to_dict(self) -> dict[str, float | str]:
        return dict(self.__dict__)


def subspace_sharpness(model: nn.Module, task: TaskMetrics, optimizer: SubspaceSGD,
                       sample: Sequence[tuple[Batch, float]], *, iters: int = 10,
                       device: torch.device | str = "cpu", method: str | None = None) -> tuple[float, str]:
    """(largest eigenvalue of P H P^T, how the products were computed), H the training loss's Hessian on
    `sample` (batches with their weights, as the training loop gets them) at the optimizer's point. The
    weights, BatchNorm statistics and random state are left as they were.

    Lanczos in the n coordinates, fully reorthogonalized (n is small): its largest Ritz value is the most
    positive curvature, where power iteration would find the eigenvalue largest in size, a negative one as
    often as not away from a minimum. With `iters` >= n it is exact."""
    start = optimizer.coords.clone()
    v = torch.ones_like(optimizer.coords)  # deterministic start
    v /= v.norm()
    method = method or DOUBLE_BACKWARD
    basis: list[torch.Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    try:
        with _as_in_training(model, device):
            for _ in range(min(iters, v.numel())):
                if method == DOUBLE_BACKWARD:
                    try:
                        hv = _double_backward(model, task, optimizer, sample, v, device)
                    except RuntimeError:  # an operation without a second derivative
                        method = FINITE_DIFFERENCES
                if method == FINITE_DIFFERENCES:
                    hv = _finite_difference(model, task, optimizer, sample, v, start, device)
                if not bool(torch.isfinite(hv).all()):
                    break
                basis.append(v)
                alphas.append(float(v @ hv))
                done = torch.stack(basis)
                for _ in range(2):  # twice is enough (Kahan): the Krylov vectors stay orthonormal to rounding
                    hv = hv - done.t() @ (done @ hv)
                beta = float(hv.norm())
                if beta <= 1e-10 * max(abs(a) for a in alphas) or len(basis) == v.numel():
                    break  # the Krylov space is invariant: its Ritz values are exact
                betas.append(beta)
                v = hv / beta
    finally:
        optimizer.move_to(start)
        optimizer.zero_grad()
    if not alphas:
        return math.nan, method
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(tridiagonal).max()), method


def sample_loss(model: nn.Module, task: TaskMetrics, sample: Sequence[tuple[Batch, float]], *,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """This process's part of the training loss on `sample` (summed over ranks it is the mean over the sample's
    global batches), BatchNorm in training mode as in the steps; statistics and random state left as they were."""
    total = torch.zeros((), device=device)
    with _as_in_training(model, device), torch.no_grad():
        for batch, weight in sample:
            torch.manual_seed(CHECK_SEED)
            total += task.loss(model, move(batch, device)).float() * (weight / len(sample))
    return total


@contextmanager
def _as_in_training(model: nn.Module, device: torch.device | str) -> Iterator[None]:
    """The model in training mode (BatchNorm normalizing by the batch, as during the steps) in a fork of the
    random state; its BatchNorm statistics, mode and the random state are restored after."""
    buffers = {k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point() or "running" in k}
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=_cuda_devices(device)):
            yield
    finally:
        with torch.no_grad():
            state = model.state_dict()
            for k, saved in buffers.items():
                state[k].copy_(saved)
        model.train(was_training)


def _cuda_devices(device: torch.device | str) -> list[int]:
    device = torch.device(device)
    return [device.index or 0] if device.type == "cuda" else []


def _params(model: nn.Module, optimizer: SubspaceSGD) -> list[nn.Parameter]:
    named = dict(model.named_parameters())
    return [named[n] for n in optimizer.trained_names]


def _double_backward(model: nn.Module, task: TaskMetrics, optimizer: SubspaceSGD, sample: Sequence[tuple[Batch, float]],
                     v: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    params = _params(model, optimizer)
    direction = optimizer.direction(v)
    pieces, offset = [], 0
    for p in params:
        pieces.append(direction[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    optimizer.zero_grad()
    for batch, weight in sample:
        torch.manual_seed(CHECK_SEED)
        loss = task.loss(model, move(batch, device)) * (weight / len(sample))
        grads = torch.autograd.grad(loss, params, create_graph=True)
        slope = sum((g * d).sum() for g, d in zip(grads, pieces, strict=True))
        for p, h in zip(params, torch.autograd.grad(slope, params), strict=True):
            p.grad.add_(h)  # type: ignore[union-attr]  (the views of the flat gradient buffer)
    return optimizer.gradient_coords().clone()


def _gradient_at(model: nn.Module, task: TaskMetrics, optimizer: SubspaceSGD, sample: Sequence[tuple[Batch, float]],
                 coords: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    optimizer.move_to(coords)
    optimizer.zero_grad()
    for batch, weight in sample:
        torch.manual_seed(CHECK_SEED)
        (task.loss(model, move(batch, device)) * (weight / len(sample))).backward()
    return optimizer.gradient_coords().clone()


def _finite_difference(model: nn.Module, task: TaskMetrics, optimizer: SubspaceSGD,
                       sample: Sequence[tuple[Batch, float]], v: torch.Tensor, start: torch.Tensor,
                       device: torch.device | str) -> torch.Tensor:
    """(g(a + eps v) - g(a - eps v)) / (2 eps) in coordinates: first derivatives only. The step moves the weights
    by FD_STEP in norm (the basis is orthonormal): small enough that few ReLUs switch (a piecewise-linear network's
    gradient jumps where they do), large enough for fp32 gradients to resolve the difference."""
    eps = FD_STEP
    plus = _gradient_at(model, task, optimizer, sample, start + eps * v, device)
    minus = _gradient_at(model, task, optimizer, sample, start - eps * v, device)
    return (plus - minus) / (2 * eps)


def check_lr(lr: float, momentum: float, sharpness: float, method: str = DOUBLE_BACKWARD) -> LrCheck:
    """The learning rate to use: `lr`, or MARGIN times the stability limit when `lr` is above that."""
    limit = 2.0 * (1.0 + momentum) / sharpness if sharpness > 0 else math.inf
    used = lr if lr <= MARGIN * limit else MARGIN * limit
    return LrCheck(lr, sharpness, limit, used, method)
