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
from twa_cli.errors import TwaError


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
        all_reduce(tensor, op, via=self.device, group=self.group)


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, *, via: torch.device | str | None,
               group: dist.ProcessGroup | None = None) -> None:
    """dist.all_reduce in place. `via`: the GPU a tensor held elsewhere travels to and back (nccl reduces on a
    GPU only); None where the backend reduces tensors where they are."""
    if via is not None and tensor.device.type != "cuda":
        moved = tensor.to(via)
        dist.all_reduce(moved, op=op, group=group)
        tensor.copy_(moved)
    else:
        dist.all_reduce(tensor, op=op, group=group)


def several() -> bool:
    """Whether this process is one of several that torch.distributed joined."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def joined() -> Processes | None:
    """The default group when this process is one of several, else None."""
    return Processes() if several() else None


class Replicated(Projection):
    """The whole basis in each process; the coordinates of the gradient averaged over the processes."""

    def __init__(self, basis: torch.Tensor, dtype: torch.dtype, processes: Processes):
        super().__init__(basis, dtype)
        self.processes = processes

    def reduce(self, coords: torch.Tensor) -> None:
        self.processes.mean_(coords)


def check_same_batches(processes: Processes, batches: int, what: str) -> None:
    """Refuse, on every process at once, a loader that gives the processes different numbers of batches: each
    step is a collective, and a process with a batch more would wait for the others forever."""
    counts = torch.tensor([batches, -batches], dtype=torch.long)
    processes.min_(counts)
    fewest, most = int(counts[0]), -int(counts[1])
    if fewest != most:
        raise TwaError(f"{what}: the processes have from {fewest} to {most} batches an epoch; fitting together "
                       "needs the same number in each (a DistributedSampler, drop_last, or the loader's even_batches)")


@torch.no_grad()
def average_batchnorm(model: nn.Module, processes: Processes, batches: int) -> None:
    """Each BatchNorm layer's running mean and variance averaged over the processes, each weighted by the
    `batches` it recomputed them on (its own part of the data), and the batch count summed: every process ends
    with the same model. A process that saw no batch counts for nothing."""
    layers = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not layers:
        return
    total = torch.tensor(float(batches), dtype=torch.float64)
    processes.sum_(total)
    if float(total) == 0:
        return
    share = batches / float(total)
    for module in layers:
        for stat in (module.running_mean, module.running_var):
            if stat is not None:
                stat.mul_(share)
                processes.sum_(stat)
        if module.num_batches_tracked is not None:
            module.num_batches_tracked.fill_(int(total))
