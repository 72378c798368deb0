"""Where the basis lives and who does what: one process, or the ranks of a torchrun job, behind one interface.

`SingleProcess` holds the whole basis, takes whole batches and writes. `ColumnShards` (torchrun) splits the
data by batch and the basis by columns. Each rank owns a contiguous slice of the parameter vector (D entries,
padded to a multiple of the world size N) and the same columns of the basis P (n x D), so it holds n*D/N
numbers of it. A step:

    reduce-scatter g         each rank receives the summed gradient on its own slice    (N-1)/N * D per rank
                             (on gloo an all-reduce, see ColumnShard)
    c_r = P_r g_r            a partial projection, n numbers
    all-reduce c             n numbers: nothing, next to D
    a <- eq. 8 on c          the same n-vector update on every rank
    w_r = P_r^T a            each rank rebuilds its slice of the weights
    all-gather w             every rank gets the whole weights for its next forward    (N-1)/N * D per rank

That is the traffic of one all-reduce of D numbers, as for plain data parallelism, where sharding the basis by
rows would cost two. The same column split lets `orthogonalize` read only each rank's slice of every
checkpoint. Backend: nccl when the device is a GPU, gloo otherwise; collectives on tensors that live elsewhere
than the backend wants (the CPU fp64 sums of the orthogonalization under nccl) go through the device.

The commands hold no torchrun logic: they take a Placement and run one straight path.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from twa_cli.core.basis import Basis, orthogonalize
from twa_cli.core.basis_files import load_basis, save_basis, save_columns, save_index
from twa_cli.engine.parallel import all_reduce
from twa_cli.engine.subspace import FlatParameters, Projection, Projector, SubspaceSGD
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import Checkpoint
from twa_cli.units import launched_by_torchrun, layout_size

log = logging.getLogger("twa")


def resident_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Placement(ABC):
    """This process's share of the work; see the module docstring."""

    rank: int = 0
    world: int = 1
    backend: str = "none"
    device: str = "cpu"

    @property
    def lead(self) -> bool:
        """Whether this process writes the results (rank 0)."""
        return self.rank == 0

    # ------------------------------------------------------------------------------------ columns
    def columns(self, dim: int) -> tuple[int, int]:
        """The slice [lo, hi) of the parameter vector this process owns (the last rank's may be short)."""
        width = -(-dim // self.world)
        return min(dim, self.rank * width), min(dim, (self.rank + 1) * width)

    # ------------------------------------------------------------------------------------ collectives
    @abstractmethod
    def sum_(self, tensor: torch.Tensor) -> None:
        """Sum a tensor in place over the ranks."""

    @abstractmethod
    def min_(self, tensor: torch.Tensor) -> None:
        """Minimum of a tensor in place over the ranks."""

    @abstractmethod
    def barrier(self) -> None:
        """Wait for every rank."""

    @abstractmethod
    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""

    # ------------------------------------------------------------------------------------ data
    @abstractmethod
    def part(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's part of a global batch (its example indices), and how its mean loss counts in the
        batch's mean: N * part / batch."""

    # ------------------------------------------------------------------------------------ basis
    def orthogonalize(self, ckpts: list[Checkpoint], *, names: list[str] | None, **kwargs: Any) -> Basis:
        """This process's columns of the basis of the checkpoints' span."""
        return orthogonalize(ckpts, names=names, **kwargs)

    def load_basis(self, path: Path) -> Basis:
        """This process's columns of a basis file (whole or sharded)."""
        return load_basis(path)

    @abstractmethod
    def save_basis(self, basis: Basis, path: Path, *, invocation: dict[str, Any] | None, exclusive: bool) -> Path:
        """Write the basis (each rank its columns); returns the file to read it back from."""

    def holdings(self, basis: Basis) -> list[dict[str, Any]]:
        """What each rank holds of the basis (empty in one process)."""
        return []

    # ------------------------------------------------------------------------------------ training
    def flat_parameters(self, model: nn.Module, names: list[str]) -> FlatParameters:
        return FlatParameters(model, names)

    @abstractmethod
    def subspace_sgd(self, flat: FlatParameters, basis: Basis, coords: torch.Tensor, *, dtype: torch.dtype,
                     offspan: torch.Tensor | None, **hyper: float) -> SubspaceSGD:
        """Eq. 8 on this process's columns of the basis, stored in `dtype` for the projection."""

    def sync_batchnorm(self, model: nn.Module, wanted: bool | None) -> bool:
        """Whether BatchNorm layers see whole batches across the ranks (then recalibration passes parts)."""
        return False

    @abstractmethod
    def close(self) -> None:
        """After a command succeeded: wait for every rank, then leave the group."""

    def __enter__(self) -> Placement:
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if kind is None:
            self.close()


class SingleProcess(Placement):
    """The whole basis, whole batches, and nothing to wait for."""

    def __init__(self, device: str = "cpu"):
        self.device = device

    def sum_(self, tensor: torch.Tensor) -> None:
        return None

    def min_(self, tensor: torch.Tensor) -> None:
        return None

    def barrier(self) -> None:
        return None

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def part(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        return batch, 1.0

    def close(self) -> None:
        return None

    def save_basis(self, basis: Basis, path: Path, *, invocation: dict[str, Any] | None, exclusive: bool) -> Path:
        return save_basis(basis, path, invocation=invocation, exclusive=exclusive)

    def subspace_sgd(self, flat: FlatParameters, basis: Basis, coords: torch.Tensor, *, dtype: torch.dtype,
                     offspan: torch.Tensor | None, **hyper: float) -> SubspaceSGD:
        # The basis keeps its stored precision (a half-precision one is widened slab by slab inside the
        # projection); on the CPU a mapped basis file is used in place.
        vectors = basis.vectors.to(device=self.device, dtype=dtype)
        return SubspaceSGD(flat, vectors, coords, offspan=None if offspan is None else offspan.to(self.device),
                           **hyper)


@dataclass
class ColumnShards(Placement):
    """A rank of a torchrun job (see the module docstring)."""

    rank: int
    world: int
    backend: str
    device: str
    owns_group: bool = False

    # ------------------------------------------------------------------------------------ collectives
    def sum_(self, tensor: torch.Tensor) -> None:
        self._all_reduce(tensor, dist.ReduceOp.SUM)

    def min_(self, tensor: torch.Tensor) -> None:
        self._all_reduce(tensor, dist.ReduceOp.MIN)

    def _all_reduce(self, tensor: torch.Tensor, op: Any) -> None:
        all_reduce(tensor, op, via=self.device if self.backend == "nccl" else None)

    def barrier(self) -> None:
        dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    # ------------------------------------------------------------------------------------ data
    def part(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        """A global batch is cut into N nearly equal contiguous parts, so the ranks together see exactly what
        one process sees."""
        part = torch.tensor_split(batch, self.world)[self.rank]
        weight = self.world * len(part) / len(batch)
        if len(part) == 0:  # a last batch smaller than N: run one example that counts for nothing
            part = batch[:1]
        return part, weight

    # ------------------------------------------------------------------------------------ basis
    def orthogonalize(self, ckpts: list[Checkpoint], *, names: list[str] | None, **kwargs: Any) -> Basis:
        """Every rank reads only its slice of each checkpoint; the inner products and norms (n x b numbers) are
        summed over the ranks, so every rank drops the same checkpoints and ends with the same coordinates as a
        single process would."""
        from twa_cli.core.basis import subspace_layout

        layout = subspace_layout(ckpts, names, warn=self.lead)
        columns = self.columns(layout_size(layout))
        if not self.lead:
            kwargs["progress"] = None
        return orthogonalize(ckpts, names=[n for n, _ in layout], hashes=self.lead, warn=self.lead,
                             columns=columns, reduce=self.sum_, **kwargs)

    def load_basis(self, path: Path) -> Basis:
        from twa_cli.core.basis_files import basis_layout
        from twa_cli.io.checkpoints import read_checkpoint

        layout = basis_layout(read_checkpoint(path))
        return load_basis(path, self.columns(layout_size(layout)))

    def save_basis(self, basis: Basis, path: Path, *, invocation: dict[str, Any] | None, exclusive: bool) -> Path:
        """Each rank writes its columns; rank 0 then writes the index, so the index appears only when complete."""
        self.barrier()  # every rank has checked the output before any writes
        dim = basis.size
        shards = self.gather(save_columns(basis, self.columns(dim), path, self.rank, self.world))
        self.barrier()
        if self.lead:
            save_index(basis, path, shards, invocation=invocation, exclusive=exclusive)
        self.barrier()
        return path

    def holdings(self, basis: Basis) -> list[dict[str, Any]]:
        dim = basis.size
        own = {"rank": self.rank, "columns": list(self.columns(dim)), "bytes": resident_bytes(basis.vectors)}
        return self.gather(own)

    # ------------------------------------------------------------------------------------ training
    def flat_parameters(self, model: nn.Module, names: list[str]) -> FlatParameters:
        return FlatParameters(model, names, multiple_of=self.world)

    def subspace_sgd(self, flat: FlatParameters, basis: Basis, coords: torch.Tensor, *, dtype: torch.dtype,
                     offspan: torch.Tensor | None, **hyper: float) -> SubspaceSGD:
        width = flat.params.numel() // self.world
        columns = basis.vectors.to(device=self.device, dtype=dtype)  # the basis itself where it is already there
        pad = None if offspan is None else _padded(offspan[None], width)[0].to(self.device)
        return SubspaceSGD(flat, ColumnShard(columns, flat, self), coords, offspan=pad, **hyper)

    def sync_batchnorm(self, model: nn.Module, wanted: bool | None) -> bool:
        """SyncBatchNorm where torch has it (nccl); on gloo say once why results differ from one process."""
        from twa_cli.engine.batchnorm import has_batchnorm

        if not has_batchnorm(model):
            return False
        wanted = wanted if wanted is not None else self.backend == "nccl"
        if wanted and self.backend != "nccl":
            raise TwaError("--sync-bn: PyTorch's SyncBatchNorm runs on GPUs only (nccl); use --no-sync-bn on CPU")
        if wanted:
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return True
        if self.lead:
            log.warning(
                "BatchNorm under %s without SyncBatchNorm: each rank normalizes over its own %d-th of every batch, "
                "so training differs slightly from one process (recalibration and evaluation still see whole "
                "batches)", self.backend, self.world,
            )
        return False

    def close(self) -> None:
        """Without the barrier a rank that tears its connections down first can make gloo abort a peer still
        closing its own."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _padded(matrix: torch.Tensor, width: int) -> torch.Tensor:
    """A rank's columns, zero-padded to the common shard width (only the last rank's are short)."""
    out = torch.zeros(matrix.shape[0], width, dtype=matrix.dtype)
    out[:, : matrix.shape[1]] = matrix
    return out


def launched() -> bool:
    """Whether this process is one of several (started by torchrun, or a group the caller set up)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return launched_by_torchrun()


def placement_for(device: str = "cpu") -> Placement:
    """One process, or this rank of the torchrun job that started it (joining its process group: nccl for
    GPUs, else gloo)."""
    if not launched():
        return SingleProcess(device)
    if not dist.is_available():
        raise TwaError("this PyTorch build has no torch.distributed; run without torchrun")
    cuda = device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if not torch.cuda.is_available():
            raise TwaError("--device cuda: no CUDA device is available")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    backend = str(dist.get_backend()).lower()
    if cuda and "nccl" not in backend:
        raise TwaError(f"--device cuda: the process group uses {backend}; GPUs need nccl")
    return ColumnShards(dist.get_rank(), dist.get_world_size(), "nccl" if "nccl" in backend else "gloo", device, owns)


# ---------------------------------------------------------------------------------------------- optimizer


class ColumnShard(Projector):
    """This rank's columns of the basis, as SubspaceSGD's projector; see the module docstring for the step.

    The flat buffers are padded to a multiple of N, so every rank writes and gathers a slice of the same width;
    `columns` is this rank's columns of the basis as they are (the last rank's may be fewer than that width: the
    padding's weights stay 0 and its gradient is never read, so no padded copy of the basis is made). Each rank's
    gradient is its weighted mean over its part of the batch (the training loop scales the loss by
    `Placement.part`'s weight), so the sum over ranks divided by N is the batch's mean.
    """

    def __init__(self, columns: torch.Tensor, flat: FlatParameters, group: ColumnShards):
        width = flat.params.numel() // group.world
        if width * group.world != flat.params.numel() or columns.shape[1] > width:
            raise TwaError(f"internal: a basis shard of {columns.shape[1]} columns for a slice of {width}")
        self.products = Projection(columns, flat.params.dtype)
        self.held = columns.shape[1]
        self.rank = self.products.rank
        self.group = group
        self.lo, self.width = group.rank * width, width
        # nccl's reduce-scatter costs half its all-reduce; gloo's is slower than its all-reduce on CPU
        # (scripts/bench_distributed.py), so there every rank sums the whole gradient and reads its slice.
        self.scatter = group.backend == "nccl"
        self.summed = torch.zeros(width, dtype=flat.grads.dtype, device=flat.grads.device) if self.scatter else None

    def coords_of(self, vector: torch.Tensor, out: torch.Tensor) -> None:
        self.products.coords_of(vector[: self.held], out)

    def point_of(self, coords: torch.Tensor, out: torch.Tensor) -> None:
        self.products.point_of(coords, out[: self.held])  # the padding after them stays 0

    def gradient(self, grads: torch.Tensor) -> torch.Tensor:
        if self.summed is not None:
            _reduce_scatter(self.summed, grads)
            return self.summed
        dist.all_reduce(grads)
        return self.own(grads)

    def reduce(self, coords: torch.Tensor) -> None:
        self.group.sum_(coords)
        coords.div_(self.group.world)

    def own(self, params: torch.Tensor) -> torch.Tensor:
        return params[self.lo : self.lo + self.width]

    def share(self, params: torch.Tensor) -> None:
        _all_gather(params, self.own(params))  # in place: this rank's part is a view of the whole


# torch 2.14 renamed these collectives; the older names still work back to torch 2.1.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
