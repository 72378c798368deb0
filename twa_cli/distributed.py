"""Several processes (torchrun): the data split by batch, the basis split by columns.

Each rank owns a contiguous slice of the parameter vector (D entries, padded to a multiple of the world size
N) and the same columns of the basis P (n x D), so it holds n*D/N numbers of it. A step:

    reduce-scatter g         each rank receives the summed gradient on its own slice    (N-1)/N * D per rank
                             (on gloo an all-reduce, see ColumnShardedSGD)
    c_r = P_r g_r            a partial projection, n numbers
    all-reduce c             n numbers: nothing, next to D
    a <- eq. 8 on c          the same n-vector update on every rank
    w_r = P_r^T a            each rank rebuilds its slice of the weights
    all-gather w             every rank gets the whole weights for its next forward    (N-1)/N * D per rank

That is the traffic of one all-reduce of D numbers, as for plain data parallelism (DistributedDataParallel
all-reduces g), where sharding the basis by rows would cost two: the gradient's all-reduce plus an all-reduce
of the D-sized partial sums P_r^T a_r. The same column split lets `twa orthogonalize` read only each rank's
slice of every checkpoint (`twa_cli.basis_shards`).

Backend: nccl when the device is a GPU, gloo otherwise. Collectives on tensors that live elsewhere than the
backend wants (the CPU fp64 sums of the orthogonalization under nccl) go through the device.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, TensorDataset

from twa_cli.data import epoch_generator
from twa_cli.errors import TwaError
from twa_cli.subspace import FlatParameters, SubspaceSGD


def launched() -> bool:
    """Whether this process is one of several (started by torchrun, or a group the caller set up)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


@dataclass
class Group:
    """This process's place among the ranks, and the few collectives the commands need."""

    rank: int
    world: int
    backend: str
    device: str  # where this rank computes: cpu, or cuda:<local rank>
    weight: float = field(default=1.0)  # N * (this rank's part of the current batch) / (the batch)

    # ------------------------------------------------------------------------------------ columns
    def width(self, dim: int) -> int:
        """Columns per rank: D padded up to a multiple of N, split evenly."""
        return -(-dim // self.world)

    def columns(self, dim: int) -> tuple[int, int]:
        """The slice [lo, hi) of the parameter vector that this rank owns (the last one may be short)."""
        width = self.width(dim)
        return min(dim, self.rank * width), min(dim, (self.rank + 1) * width)

    # ------------------------------------------------------------------------------------ collectives
    def sum_(self, tensor: torch.Tensor) -> None:
        self._all_reduce(tensor, dist.ReduceOp.SUM)

    def min_(self, tensor: torch.Tensor) -> None:
        self._all_reduce(tensor, dist.ReduceOp.MIN)

    def _all_reduce(self, tensor: torch.Tensor, op: Any) -> None:
        if self.backend == "nccl" and tensor.device.type != "cuda":
            moved = tensor.to(self.device)
            dist.all_reduce(moved, op=op)
            tensor.copy_(moved)
        else:
            dist.all_reduce(tensor, op=op)

    def barrier(self) -> None:
        dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    # ------------------------------------------------------------------------------------ data
    def batches(
        self, dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's part of each global batch of `twa_cli.data.batches` (same order, same batches).

        A global batch is cut into N nearly equal contiguous parts, so the ranks together see exactly what one
        process sees, and `weight` says how this rank's mean loss counts in the batch's mean.
        """
        parts, weights = self._parts(len(dataset), batch_size, shuffle, seed, epoch)  # type: ignore[arg-type]
        if isinstance(dataset, TensorDataset):
            x, y = dataset.tensors[:2]
            loaded: Any = ((x[part], y[part]) for part in parts)
        else:
            loaded = DataLoader(dataset, batch_sampler=[part.tolist() for part in parts], num_workers=0)
        for (xb, yb), weight in zip(loaded, weights):
            self.weight = weight
            yield xb, yb

    def _parts(
        self, n: int, batch_size: int, shuffle: bool, seed: int, epoch: int
    ) -> tuple[list[torch.Tensor], list[float]]:
        order = torch.randperm(n, generator=epoch_generator(seed, epoch)) if shuffle else torch.arange(n)
        parts, weights = [], []
        for i in range(0, n, batch_size):
            batch = order[i : i + batch_size]
            part = torch.tensor_split(batch, self.world)[self.rank]
            weights.append(self.world * len(part) / len(batch))
            if len(part) == 0:  # a last batch smaller than N: run one sample that counts for nothing
                part = batch[:1]
            parts.append(part)
        return parts, weights


def init_group(device: str = "cpu") -> Group | None:
    """Join the process group torchrun describes (None in a single process); nccl for GPUs, else gloo."""
    if not launched():
        return None
    if not dist.is_available():
        raise TwaError("this PyTorch build has no torch.distributed; run without torchrun")
    cuda = device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if not torch.cuda.is_available():
            raise TwaError("--device cuda: no CUDA device is available")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_shutdown)
    backend = str(dist.get_backend()).lower()
    if cuda and "nccl" not in backend:
        raise TwaError(f"--device cuda: the process group uses {backend}; GPUs need nccl")
    return Group(dist.get_rank(), dist.get_world_size(), "nccl" if "nccl" in backend else "gloo", device)


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """After a command succeeded on every rank: wait for all of them, then leave the group. Without the barrier a
    rank that tears its connections down first can make gloo abort a peer still closing its own."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- optimizer


@dataclass
class _Slice:
    """What SubspaceSGD reads and writes: this rank's slice of the weights and of the summed gradient."""

    params: torch.Tensor
    grads: torch.Tensor


class ColumnShardedSGD(SubspaceSGD):
    """SubspaceSGD on this rank's columns of the basis; see the module docstring for the step.

    `flat` must be padded to a multiple of N (`FlatParameters(..., multiple_of=N)`), `shard` is this rank's
    columns of the basis, zero-padded to the shard width, and `offspan` (if any) the same slice of r.
    """

    def __init__(
        self,
        flat: FlatParameters,
        shard: torch.Tensor,
        coords: torch.Tensor,
        group: Group,
        *,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-5,
        offspan: torch.Tensor | None = None,
    ):
        width = flat.params.numel() // group.world
        if width * group.world != flat.params.numel() or shard.shape[1] != width:
            raise TwaError(f"internal: a basis shard of {shard.shape[1]} columns for a slice of {width}")
        self.group = group
        self.full = flat
        lo = group.rank * width
        # nccl's reduce-scatter costs half its all-reduce; gloo's is slower than its all-reduce on CPU
        # (scripts/bench_distributed.py), so there every rank sums the whole gradient and reads its slice.
        self.scatter = group.backend == "nccl"
        grads = torch.zeros_like(flat.grads[lo : lo + width]) if self.scatter else flat.grads[lo : lo + width]
        local = _Slice(flat.params[lo : lo + width], grads)
        super().__init__(
            local, shard, coords, lr=lr, momentum=momentum, weight_decay=weight_decay,  # type: ignore[arg-type]
            offspan=offspan, reduce=self._sum_coords,
        )

    def _sum_coords(self, coords: torch.Tensor) -> None:
        self.group.sum_(coords)
        coords.div_(self.group.world)  # the ranks' gradients are each a mean over their part of the batch

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if self.group.weight != 1.0:  # uneven parts (the last batch of an epoch): weigh before summing
            self.full.grads.mul_(self.group.weight)
        if self.scatter:
            _reduce_scatter(self.flat.grads, self.full.grads)
        else:
            dist.all_reduce(self.full.grads)
        return super().step()

    def zero_grad(self, set_to_none: bool = False) -> None:
        self.full.grads.zero_()

    @torch.no_grad()
    def _write_params(self) -> None:
        super()._write_params()  # w_r = P_r^T a (+ s r_r) into this rank's slice
        _all_gather(self.full.params, self.flat.params)


# torch 2.14 renamed these collectives; the older names still work back to torch 2.1.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def resident_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
