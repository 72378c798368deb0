"""A learning rate that stays stable in the subspace: the sharpness check behind `train-subspace --lr-check`.

The paper trains in the subspace at lr 2, twenty times SGD's. Whether that is stable depends on the span:
heavy-ball SGD on a quadratic diverges along a direction of curvature lambda once lr * lambda > 2 (1 + momentum).
The span of checkpoints sampled densely, or of a few early ones, contains the sharp directions SGD was
bouncing along, and there lr 2 throws the weights out of the basin (test accuracy falls to chance and does not
come back). So before training, the largest eigenvalue of the training loss's Hessian restricted to the span is
estimated by power iteration on Hessian-vector products (a few fixed batches, BatchNorm in training mode as
during the steps), and a learning rate above half the stability limit is lowered to that, with a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Half the stability limit: the estimate comes from a few batches at the start point, and the curvature
# seen along the way is larger than at the start (the steps go where the loss is lower and sharper).
MARGIN = 0.5


@dataclass
class LrCheck:
    requested: float
    sharpness: float
    limit: float  # 2 (1 + momentum) / sharpness: the largest stable learning rate
    used: float

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def subspace_sharpness(
    model: nn.Module, params: list[nn.Parameter], basis: torch.Tensor, data: list[tuple[torch.Tensor, torch.Tensor]],
    *, iters: int = 10, device: torch.device | str = "cpu",
) -> float:
    """Largest eigenvalue of P H P^T (H: the training loss's Hessian on `data` with respect to `params`, in the
    order the basis rows lay them out; P: the basis rows). BatchNorm statistics are left as they were."""
    buffers = {k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point() or "running" in k}
    was_training = model.training
    model.train()
    v = torch.ones(basis.shape[0], dtype=basis.dtype, device=device)  # deterministic start
    v /= v.norm()
    value = 0.0
    try:
        for _ in range(iters):
            direction = torch.mv(basis.t(), v)
            hv = torch.zeros_like(v)
            for x, y in data:
                x, y = x.to(device), y.to(device)
                grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
                flat = torch.cat([g.reshape(-1) for g in grads])
                hvp = torch.autograd.grad(flat @ direction, params)
                hv += torch.mv(basis, torch.cat([h.reshape(-1) for h in hvp])) / len(data)
            value = float(v @ hv)
            norm = float(hv.norm())
            if norm == 0.0 or not math.isfinite(norm):
                break
            v = hv / norm
    finally:
        with torch.no_grad():
            state = model.state_dict()
            for k, saved in buffers.items():
                state[k].copy_(saved)
        model.train(was_training)
    return value


def check_lr(lr: float, momentum: float, sharpness: float) -> LrCheck:
    """The learning rate to use: `lr`, or MARGIN times the stability limit when `lr` is above that."""
    limit = 2.0 * (1.0 + momentum) / sharpness if sharpness > 0 else math.inf
    used = lr if lr <= MARGIN * limit else MARGIN * limit
    return LrCheck(lr, sharpness, limit, used)
