"""An orthonormal basis of the span of checkpoint files (the first half of Algorithm 1).

The files are streamed from disk in blocks and handed to the tensor core's `Orthogonalizer`
(`twa_cli.engine.orthogonalizer`: block Gram-Schmidt with reorthogonalization, inner products in fp64, a
checkpoint adding no direction dropped); this module reads, names and hashes the files around it.

Only the trainable parameters are in the subspace; buffers (BatchNorm statistics) are averaged and stored
beside the basis, to be recomputed after training anyway.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from twa_cli.core.averaging import checked, mean_of, stored
from twa_cli.engine.mean import RunningMean
from twa_cli.engine.orthogonalizer import (
    ORTHOGONALITY_BOUND,
    NotFiniteRows,
    Orthogonalizer,
    Reduce,
    combine,
    inner_products,
    orthogonality_error,
)
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import (
    Checkpoint,
    Layout,
    Source,
    check_compatible,
    no_floating_tensor,
    open_tensors,
    tensor_specs,
)
from twa_cli.io.through import read_through
from twa_cli.units import STORAGE_DTYPES, layout_size, torch_dtype

log = logging.getLogger("twa")



@dataclass
class Basis:
    """Rows of `vectors` are orthonormal; checkpoint i is `vectors.T @ coords[:, i]` on the trainable params."""

    vectors: torch.Tensor  # (k, D)
    coords: torch.Tensor  # (k, n) float64
    layout: list[tuple[str, tuple[int, ...]]]  # the trainable tensors, in the order they fill D
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: list[Source] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    # What the checkpoints record about the task that made them (arch, data, task), for later commands.
    recorded: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        """The columns held here: D, or a torchrun rank's share of it (see `size`)."""
        return int(self.vectors.shape[1])

    @property
    def size(self) -> int:
        """D, the number of trained weights, wherever the columns of the basis are held."""
        return layout_size(self.layout)

    def center_coords(self) -> torch.Tensor:
        """Coordinates of the mean of the checkpoints, TWA's default starting point."""
        return self.coords.mean(dim=1)

    def coefficients(self, coords: torch.Tensor) -> torch.Tensor:
        """Averaging coefficients alpha (one per source checkpoint) with sum_i alpha_i w_i = vectors.T @ coords.

        When checkpoints were dropped as duplicates the alpha are not unique; this is the smallest-norm choice,
        which splits a weight evenly between identical checkpoints.
        """
        return torch.linalg.pinv(self.coords) @ coords.to(torch.float64).cpu()

    def coords_of(self, vector: torch.Tensor) -> torch.Tensor:
        """vectors @ vector in fp64, chunk by chunk (no fp64 copy of the basis)."""
        return inner_products(self.vectors, vector.reshape(1, -1))[:, 0]

    def point(self, coords: torch.Tensor) -> torch.Tensor:
        return combine(self.vectors, coords).float()

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for name, shape in self.layout:
            size = math.prod(shape)
            out[name] = vector[offset : offset + size].view(shape)
            offset += size
        return out



def floating_tensors(ckpt: Checkpoint) -> list[str]:
    """Every floating tensor of a checkpoint: the subspace when no architecture says which ones train."""
    return [k for k, (_, dtype) in tensor_specs(ckpt).items() if dtype.is_floating_point]




def subspace_layout(ckpts: list[Checkpoint], names: list[str] | None, *, warn: bool = True,
                    layout: Layout | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors that span the subspace (`names`, else every floating tensor), with their shapes."""
    layout = layout or check_compatible(ckpts)
    shapes = layout.shapes
    if names is None:
        names = floating_tensors(ckpts[0])
        if not names:
            raise TwaError(no_floating_tensor(ckpts[0], layout))
        if warn:
            log.warning("%s: no architecture known; every floating tensor (BatchNorm statistics too) spans the "
                        "subspace", ckpts[0].path)
    missing = [n for n in names if n not in shapes]
    if missing:
        raise TwaError(f"{ckpts[0].path}: has no tensor '{missing[0]}' that the model trains; does --model fit?")
    return [(name, shapes[name]) for name in names]


def block_size(n: int) -> int:
    """Checkpoints read and orthogonalized together: a quarter of them, at least 1 and at most 32. They are read
    into the basis's own free rows, so a block costs no memory; each block sweeps the basis so far a fixed number
    of times, so larger blocks sweep it less often (20 checkpoints of 14.7M parameters: 2.2 s in blocks of 4 or
    5, 3.0 s in blocks of 2), until the rows of a block, projected out of each other one by one, cost more."""
    return max(1, min(32, n // 4))


def check_tol(tol: float) -> None:
    if not (math.isfinite(tol) and 0.0 <= tol < 1.0):
        raise TwaError(f"--tol must be a number in [0, 1) (got {tol})")


def read_flat(
    ckpt: Checkpoint, layout: list[tuple[str, tuple[int, ...]]], out: torch.Tensor,
    columns: tuple[int, int] | None = None,
) -> None:
    """Fill `out` with entries [lo, hi) (default: all D) of the flattened trainable tensors of a file.

    One tensor at a time (memory of one tensor); a tensor cut by the range is read by rows, so a rank that owns
    a slice of the parameter vector reads little more than its slice.
    """
    lo, hi = columns if columns is not None else (0, out.shape[0])
    offset = 0
    path = ckpt.path
    with open_tensors(ckpt) as handle:
        for name, shape in layout:
            size = math.prod(shape)
            a, b = max(lo, offset), min(hi, offset + size)
            if a < b:
                try:
                    piece = _read_range(handle, name, shape, a - offset, b - offset)
                except TwaError:
                    raise
                except Exception as exc:
                    raise TwaError(f"{path}: cannot read tensor '{name}'; is the file truncated? ({exc})") from exc
                out[a - lo : b - lo].copy_(piece)  # NaN and Inf: see `orthogonalize`
            offset += size


@dataclass
class Whole:
    """What one pass over a checkpoint gave besides the trained tensors (`read_whole`)."""

    source: Source  # hashed from the bytes read
    others: list[tuple[str, torch.Tensor]]  # every tensor not trained, checked finite
    dtypes: dict[str, torch.dtype]  # the precision each trained tensor is stored in


def read_whole(ckpt: Checkpoint, layout: list[tuple[str, tuple[int, ...]]], out: torch.Tensor,
               with_hash: bool = True) -> Whole:
    """One pass over a checkpoint (`read_through`): its trained tensors flattened into `out` in `layout`'s
    order (read straight into place where stored as `out` is), and the rest. NaN and Inf in the trained tensors
    are left to the orthogonalizer, which finds them from the norms it takes anyway (`NotFiniteRows`)."""
    offsets, at = {}, 0
    for name, shape in layout:
        offsets[name] = (at, shape)
        at += math.prod(shape)

    def in_out(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        start, expected = offsets.get(name, (0, None))
        return out[start : start + math.prod(shape)].view(shape) if shape == expected and dtype == out.dtype else None

    digest = hashlib.sha256() if with_hash else None
    path, others, dtypes = ckpt.path, [], {}
    for name, tensor in read_through(path, ckpt.options, digest, place=in_out):
        if name not in offsets:
            others.append((name, checked(tensor, f"{path}: tensor '{name}'")))
            continue
        start, shape = offsets[name]
        if tuple(tensor.shape) != shape:
            raise TwaError(f"{path}: tensor '{name}' has shape {list(tensor.shape)} now, {list(shape)} when the "
                           "folder was listed; was the file rewritten?")
        target = out[start : start + tensor.numel()]
        if tensor.data_ptr() != target.data_ptr():  # not read in place: another dtype, or a pickle
            target.copy_(tensor.reshape(-1))
        dtypes[name] = tensor.dtype
    if len(dtypes) != len(offsets):
        raise TwaError(f"{path}: has no tensor '{next(n for n, _ in layout if n not in dtypes)}' that the model "
                       "trains; was the file rewritten?")
    return Whole(Source.hashed(ckpt, digest.hexdigest() if digest else None), others, dtypes)


def not_finite_tensor(row: torch.Tensor, layout: list[tuple[str, tuple[int, ...]]], lo: int = 0) -> str:
    """Which trained tensor of a row (entries lo.. of the parameter vector) holds NaN or Inf, for a message."""
    offset = 0
    for name, shape in layout:
        size = math.prod(shape)
        a, b = max(lo, offset), min(lo + row.shape[0], offset + size)
        if a < b and not bool(torch.isfinite(row[a - lo : b - lo]).all()):
            return f"tensor '{name}'"
        offset += size
    return "a trained tensor"  # in columns another rank holds


def _read_range(handle: Any, name: str, shape: tuple[int, ...], a: int, b: int) -> torch.Tensor:
    """Entries [a, b) of a tensor flattened, reading only the rows that hold them."""
    size = math.prod(shape)
    if (a, b) == (0, size) or len(shape) == 0:
        return handle.get(name).reshape(-1)[a:b]
    row = size // shape[0]
    first, last = a // row, -(-b // row)
    rows = handle.read_slice(name, slice(first, last)).reshape(-1)
    return rows[a - first * row : b - first * row]


Progress = Callable[[int, int], None]


def orthogonalize(
    ckpts: list[Checkpoint],
    *,
    names: list[str] | None = None,
    tol: float = 1e-6,
    dtype: str = "float32",
    block: int | None = None,
    hashes: bool = True,
    progress: Progress | None = None,
    warn: bool = True,
    columns: tuple[int, int] | None = None,
    reduce: Reduce | None = None,
    recorded: dict[str, Any] | None = None,
) -> Basis:
    """Build an orthonormal basis of span{w_i} from checkpoint files, streaming them block by block.

    `names`: the tensors that span the subspace (the model's trainable parameters; default every floating
    tensor). Peak memory is the fp32 basis (n x D) and one model's other tensors: each block of checkpoints
    (`block_size`) is read into the basis's free rows, and the stacked checkpoints are never held. A
    half-precision basis is converted in place at the end.
    With `columns` (lo, hi) only those entries of the parameter vector are read and returned, and `reduce`
    sums the inner products over the ranks holding the other columns (`twa_cli.core.placement`).
    `recorded`: what the checkpoints say about their task, kept with the basis (default: the first's).
    """
    if not ckpts:
        raise TwaError("no checkpoints to orthogonalize")
    if dtype not in STORAGE_DTYPES:
        raise TwaError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)} (got '{dtype}')")
    check_tol(tol)
    layout = subspace_layout(ckpts, names, warn=warn)
    dim = layout_size(layout)
    n = len(ckpts)
    block = block or block_size(n)
    lo, hi = columns if columns is not None else (0, dim)
    grower = Orthogonalizer(hi - lo, tol=tol, capacity=n, reduce=reduce)
    # One process reads each file once: its trained tensors, its buffers and its hash in one pass. A rank
    # holding some columns reads only the rows that hold them, and the buffers and hashes in passes of their own.
    whole = columns is None
    buffers, sources = RunningMean(), []
    for b0 in range(0, n, block):
        cols = list(range(b0, min(n, b0 + block)))
        xb = grower.free_rows(len(cols))  # read straight into the rows they become: no block of their own
        for j, i in enumerate(cols):
            if whole:
                got = read_whole(ckpts[i], layout, xb[j], hashes)
                buffers.add(got.others, where=f"{ckpts[i].path}: ")
                sources.append(got.source)
            else:
                read_flat(ckpts[i], layout, xb[j], (lo, hi))
        try:
            grower.add_block(xb)
        except NotFiniteRows as exc:  # on every rank alike: the norms are summed over the ranks
            i = cols[exc.rows[0]]
            raise TwaError(f"{ckpts[i].path}: {not_finite_tensor(xb[exc.rows[0]], layout, lo)} contains NaN or "
                           "Inf") from exc
        if progress is not None:
            progress(cols[-1] + 1, n)
    dropped = [{"index": d.index, "path": str(ckpts[d.index].path), "relative_residual": d.relative_residual}
               for d in grower.dropped]
    for d in dropped:
        (log.warning if warn else log.debug)(
            "%s: dropped, it adds no direction (residual %.1e of its norm, below --tol %.0e): "
            "a duplicate or near-duplicate of earlier checkpoints", d["path"], d["relative_residual"], tol,
        )
    if grower.rank == 0:
        raise TwaError(f"{ckpts[0].path.parent}: the selected checkpoints are all zero on the trained tensors; "
                       "they span no direction")
    vectors = grower.vectors  # a view: copying would hold the basis twice
    coords = grower.coords.clone()
    del grower
    basis = Basis(
        vectors=vectors,
        coords=coords,
        layout=layout,
        buffers=stored(buffers) if whole else mean_of(ckpts, skip={name for name, _ in layout}),
        sources=sources if whole else [Source.of(c, hashes) for c in ckpts],
        dropped=dropped,
        recorded=recorded if recorded is not None else ckpts[0].task_fields(),
    )
    basis.errors["orthogonality"] = orthogonality_error(basis.vectors, reduce)
    if not basis.errors["orthogonality"] <= ORTHOGONALITY_BOUND:
        raise TwaError(f"{ckpts[0].path.parent}: the basis came out {basis.errors['orthogonality']:.1e} from "
                       f"orthonormal (bound {ORTHOGONALITY_BOUND:.0e}); nothing was written")
    if dtype != "float32":
        basis.vectors = _narrow_in_place(basis.vectors, torch_dtype(dtype))
        basis.errors["orthogonality_stored"] = orthogonality_error(basis.vectors, reduce)
    return basis


def _narrow_in_place(vectors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rows converted to a 2-byte dtype inside the fp32 tensor's own memory, row by row.

    Row i is written at half the offset it is read from, so it never overwrites a row not yet converted.
    """
    k, dim = vectors.shape
    out = torch.empty(0, dtype=dtype).set_(vectors.untyped_storage(), 0, (k, dim))
    row = torch.empty(dim, dtype=dtype)
    for i in range(k):
        row.copy_(vectors[i])
        out[i].copy_(row)
    return out


def reconstruction_errors(basis: Basis, ckpts: list[Checkpoint]) -> list[float]:
    """Relative error of each checkpoint rebuilt from the basis (a second pass over the files)."""
    flat = torch.empty(basis.dim, dtype=torch.float32)
    out = []
    for i, ckpt in enumerate(ckpts):
        read_flat(ckpt, basis.layout, flat)
        rebuilt = combine(basis.vectors, basis.coords[:, i])
        out.append(float((flat.double() - rebuilt).norm() / flat.double().norm()))
    return out


FINGERPRINT_PRIME = 2**31 - 1


def fingerprint(vectors: torch.Tensor, offset: int = 0, block: int = 1 << 20) -> list[int]:
    """Per basis vector, the sum over entries j of bits(v_j) * w(offset + j) mod a prime: exact, and the same
    whether the columns are fingerprinted at once or in slices whose fingerprints are added (mod the prime), so a
    basis split over N ranks has the fingerprint it has in one process. Bits, not values: any change shows."""
    p = FINGERPRINT_PRIME
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[vectors.element_size()]
    total = torch.zeros(vectors.shape[0], dtype=torch.int64)
    for lo in range(0, vectors.shape[1], block):  # in blocks: a whole int64 copy would double the basis
        bits = vectors[:, lo:lo + block].detach().cpu().contiguous().view(as_int).to(torch.int64).remainder(p)
        j = torch.arange(offset + lo, offset + lo + bits.shape[1], dtype=torch.int64)
        weight = ((j * 1_000_003 + 7).remainder(p) * (j * 69_069 + 1).remainder(p)).remainder(p)
        total = (total + (bits * weight).remainder(p).sum(dim=1)).remainder(p)
    return [int(v) for v in total]
