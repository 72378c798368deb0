"""Processes that fit together as data-parallel training runs (DDP: the Trainer's, Lightning's, a torchrun loop).

Each process holds the whole model and the whole basis and computes the gradient of its own part of every
global batch. c = P g is linear in g, so averaging the n coordinates over the processes gives the coordinates
of the global batch's mean gradient: a step sends n numbers, where DDP sends D. Every process then takes the
same step and holds the same weights. BatchNorm statistics, recomputed by each process on its own batches, are
averaged the same way at the end.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from twa_cli.engine.batchnorm import _BN
from twa_cli.engine.subspace import Projection


class Processes:
    """A torch.distributed group as the training loop's `Collective`: sums and minima over its processes."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.world = dist.get_world_size(group)
        # nccl reduces tensors on a GPU only; a tally kept on the CPU travels there and back.
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if dist.get_backend(group) == "nccl" else None)

    def sum_(self, tensor: torch.Tensor) -> None:
        self._all_reduce(tensor, dist.ReduceOp.SUM)

    def min_(self, tensor: torch.Tensor) -> None:
        self._all_reduce(tensor, dist.ReduceOp.MIN)

    def mean_(self, tensor: torch.Tensor) -> None:
        self.sum_(tensor)
        tensor.div_(self.world)

    def _all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp) -> None:
        if self.device is not None and tensor.device.type != "cuda":
            moved = tensor.to(self.device)
            dist.all_reduce(moved, op=op, group=self.group)
            tensor.copy_(moved)
        else:
            dist.all_reduce(tensor, op=op, group=self.group)


def joined() -> Processes | None:
    """The default group when this process is one of several that torch.distributed joined, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Processes()
    return None


class Replicated(Projection):
    """The whole basis in each process; the coordinates of the gradient averaged over the processes."""

    def __init__(self, basis: torch.Tensor, dtype: torch.dtype, processes: Processes):
        super().__init__(basis, dtype)
        self.processes = processes

    def reduce(self, coords: torch.Tensor) -> None:
        self.processes.mean_(coords)


@torch.no_grad()
def average_batchnorm(model: nn.Module, processes: Processes) -> None:
    """Each BatchNorm layer's running mean and variance averaged over the processes (each recomputed them on its
    own part of the data), so that every process ends with the same model."""
    for module in model.modules():
        if isinstance(module, _BN) and module.track_running_stats:
            for stat in (module.running_mean, module.running_var):
                if stat is not None:
                    processes.mean_(stat)
