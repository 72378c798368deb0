"""`--dry-run`: what a command would read, and the memory and disk it would need, from checkpoint headers only.

The figures follow the allocations each command makes (see the docstrings of `mean_of`, `orthogonalize`
and `train_subspace`); they count tensors, not the Python interpreter or the data set, which are listed as
notes. Files are memory-mapped, so the pages of a checkpoint being read are the operating system's to evict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import Checkpoint
from twa_cli.units import STORAGE_DTYPES, itemsize


@dataclass
class Plan:
    command: str
    reads: list[str]
    read_bytes: int
    peak_ram_bytes: int
    gpu_bytes: int
    disk_bytes: int
    parameters: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Layout:
    """Element counts of one checkpoint, split the way the commands treat tensors."""

    floating: int
    other_bytes: int
    largest_bytes: int
    bytes_on_disk: int
    floating_bytes: int
    trainable: int


def _layout(ckpt: Checkpoint, trainable: list[str] | None) -> _Layout:
    with ckpt.open() as reader:
        floating = other = largest = floating_bytes = train = 0
        names = set(trainable) if trainable is not None else None
        for k in reader.keys():
            dtype, n = reader.dtype(k), math.prod(reader.shape(k))
            size = n * itemsize(dtype)
            largest = max(largest, size)
            if dtype.is_floating_point:
                floating += n
                floating_bytes += size
                if names is None or k in names:
                    train += n
            else:
                other += size
    return _Layout(floating, other, largest, floating_bytes + other, floating_bytes, train)


def plan_swa(ckpts: list[Checkpoint], *, compute_dtype: str, dtype: str | None, model_known: bool, device: str,
             greedy: bool = False) -> Plan:
    """Sums in `compute_dtype` over one checkpoint at a time; then the mean, then the copy safetensors writes.
    The greedy soup holds fp64 sums, one candidate and its average besides the model."""
    lay = _layout(ckpts[0], None)
    out_bytes = lay.floating * itemsize(dtype) if dtype else lay.floating_bytes
    sums = lay.floating * itemsize("float64" if greedy else compute_dtype)
    peak = max(sums + out_bytes, 2 * out_bytes) + lay.other_bytes + lay.largest_bytes
    notes = []
    gpu = 0
    if greedy:
        peak += 2 * lay.floating_bytes
        notes.append(f"greedy soup: each of the {len(ckpts)} checkpoints is read twice and scored on the held-out "
                     "split (BatchNorm recomputed for every candidate)")
    if model_known:
        peak += lay.floating * 4  # the model the average is loaded into (fp32)
        notes.append("plus the training data, read to recompute BatchNorm statistics and to test")
        if device == "cuda":
            gpu = lay.floating * 4
            notes.append("GPU: the model; activations of one batch come on top")
    return Plan("swa --greedy" if greedy else "swa", [str(c.path) for c in ckpts], lay.bytes_on_disk * len(ckpts),
                peak, gpu,
                out_bytes + lay.other_bytes, lay.floating, notes)


def plan_orthogonalize(ckpts: list[Checkpoint], *, dtype: str, trainable: list[str] | None) -> Plan:
    """The basis (n x D fp32; the checkpoints are read into its free rows), plus buffers."""
    if dtype not in STORAGE_DTYPES:
        raise TwaError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)} (got '{dtype}')")
    lay = _layout(ckpts[0], trainable)
    n, dim = len(ckpts), lay.trainable
    buffers = (lay.floating - dim) * 8 + lay.other_bytes
    peak = n * dim * 4 + n * n * 8 + buffers + lay.largest_bytes
    disk = n * dim * itemsize(dtype) + n * n * 8 + (lay.floating - dim) * 4 + lay.other_bytes
    notes = [] if trainable is not None else ["no architecture known: every floating tensor spans the subspace"]
    return Plan("orthogonalize", [str(c.path) for c in ckpts], lay.bytes_on_disk * n, peak, 0, disk, dim, notes)


def plan_train_subspace(ckpts: list[Checkpoint], *, trainable: list[str] | None, device: str,
                        basis_given: bool) -> Plan:
    """Orthogonalizing first (unless given a basis), then the basis, the model with its flat parameter and
    gradient buffers, and the optimizer's n coordinates; writes the basis copy, the result and a resume state."""
    ortho = plan_orthogonalize(ckpts, dtype="float32", trainable=trainable)
    lay = _layout(ckpts[0], trainable)
    n, dim = len(ckpts), lay.trainable
    model = lay.floating * 4 + lay.other_bytes
    training = n * dim * 4 + model + dim * 4 * 2 + n * 8 * 4
    on_gpu = device == "cuda"
    peak = max(0 if basis_given else ortho.peak_ram_bytes, training if not on_gpu else n * dim * 4 + model)
    gpu = n * dim * 4 + model + dim * 4 * 2 if on_gpu else 0
    disk = (0 if basis_given else ortho.disk_bytes) + 2 * model + n * 8 * 4
    notes = ["plus the training data and the activations of one batch"]
    return Plan("train-subspace", [str(c.path) for c in ckpts], lay.bytes_on_disk * n, peak, gpu, disk, dim, notes)


def plan_train_subspace_basis(basis: Checkpoint, *, device: str) -> Plan:
    """Training from a basis file: the basis, the model with its flat buffers, the n coordinates."""
    with basis.open() as reader:
        rank, dim = reader.shape("basis")
        buffers = sum(math.prod(reader.shape(k)) * 4 for k in reader.keys() if k.startswith("buffer."))
        file_bytes = reader.nbytes()
    model = dim * 4 + buffers
    basis_bytes = rank * dim * 4
    gpu = basis_bytes + model + dim * 4 * 2 if device == "cuda" else 0
    peak = basis_bytes + (model + dim * 4 * 2 if device != "cuda" else model) + rank * 8 * 4
    return Plan("train-subspace", [str(basis.path)], file_bytes, peak, gpu, 2 * model + rank * 8 * 4, dim,
                ["plus the training data and the activations of one batch"])

