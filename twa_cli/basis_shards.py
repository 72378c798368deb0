"""A basis split by columns over the ranks of a torchrun job: building it, writing it, reading any columns of it.

On disk a sharded basis is an index file, `basis.safetensors` (kind "basis": the coordinates, the averaged
buffers and all the metadata of a whole basis, plus a `shards` list), and one file per rank beside it,
`basis.00001-of-00002.safetensors`, holding that rank's columns of P. Any process can read any range of
columns back, whatever the number of ranks that wrote it: a single process loads the whole basis, a job with
another world size reads its own slices.
"""

from __future__ import annotations

import math

from pathlib import Path
from typing import Any

import torch

from twa_cli.basis import Basis, basis_from_file, orthogonalize, save_basis, subspace_tensors
from twa_cli.checkpoints import (
    Checkpoint,
    check_compatible,
    load_tensors,
    make_metadata,
    open_tensors,
    read_checkpoint,
    save_tensors,
)
from twa_cli.distributed import Group, resident_bytes
from twa_cli.errors import TwaError


def parameter_count(ckpts: list[Checkpoint], model: dict[str, Any] | None) -> int:
    """D, the length of the trainable parameter vector, from the files' headers."""
    shapes = check_compatible(ckpts)
    return sum(math.prod(shapes[name]) for name in subspace_tensors(ckpts[0], shapes, model))


def orthogonalize_columns(
    ckpts: list[Checkpoint],
    group: Group,
    *,
    tol: float = 1e-6,
    dtype: str = "float32",
    block: int | None = None,
    model: dict[str, Any] | None = None,
    progress: Any = None,
) -> tuple[Basis, tuple[int, int]]:
    """This rank's columns of the basis; every rank reads only its slice of each checkpoint.

    The inner products and norms (n x b numbers) are summed over the ranks, so every rank makes the same
    decisions (which checkpoints to drop) and ends with the same coordinates as a single process would.
    """
    columns = group.columns(parameter_count(ckpts, model))
    basis = orthogonalize(ckpts, tol=tol, dtype=dtype, block=block, model=model, hashes=group.rank == 0,
                          progress=progress if group.rank == 0 else None, columns=columns, reduce=group.sum_)
    return basis, columns


def shard_path(index: Path, rank: int, world: int) -> Path:
    return index.with_name(f"{index.stem}.{rank + 1:05d}-of-{world:05d}{index.suffix}")


def save_sharded(basis: Basis, columns: tuple[int, int], path: str | Path, group: Group, force: bool = False) -> Path:
    """Each rank writes its columns; rank 0 then writes the index, so the index appears only when complete."""
    path = Path(path)
    mine = shard_path(path, group.rank, group.world)
    if mine.exists() and not force:
        raise TwaError(f"{mine}: already exists (pass --force to overwrite it)")
    save_tensors(mine, {"basis": basis.vectors},
                 make_metadata("basis", shard_of=path.name, columns=list(columns)))
    shards = group.gather_objects({"file": mine.name, "columns": list(columns)})
    group.barrier()
    if group.rank == 0:
        _save_index(basis, path, shards)
    group.barrier()
    return path


def _save_index(basis: Basis, path: Path, shards: list[dict[str, Any]]) -> None:
    """The coordinates, buffers and metadata of the whole basis, with an empty (n x 0) matrix of vectors."""
    empty = torch.empty(basis.rank, 0, dtype=basis.vectors.dtype)
    whole = Basis(empty, basis.coords, basis.layout, basis.buffers, basis.sources, basis.dropped, basis.arch,
                  basis.data, basis.errors)
    save_basis(whole, path, shards=shards)


def is_shard(ckpt: Checkpoint) -> bool:
    return "shard_of" in ckpt.meta


def load_basis_columns(path: str | Path, columns: tuple[int, int] | None = None) -> Basis:
    """The basis in `path` (sharded or whole) with only columns [lo, hi) of its vectors (default: all)."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    if is_shard(ckpt):
        raise TwaError(f"{path}: one shard of a basis; pass its index file {path.with_name(ckpt.meta['shard_of'])}")
    layout = [(name, tuple(shape)) for name, shape in ckpt.json_field("layout")]
    dim = sum(math.prod(shape) for _, shape in layout)
    lo, hi = columns if columns is not None else (0, dim)
    tensors = load_tensors(path, [k for k in _keys(path) if k != "basis"])
    if "shards" in ckpt.meta:
        vectors = _read_shards(path, ckpt.json_field("shards"), dim, lo, hi, tensors["coords"].shape[0])
    else:
        with open_tensors(path) as handle:
            vectors = handle.read_slice("basis", slice(None), slice(lo, hi))
    return basis_from_file(ckpt, vectors, tensors["coords"], layout, tensors)


def _keys(path: Path) -> list[str]:
    with open_tensors(path) as handle:
        return list(handle.keys())


def _read_shards(index: Path, shards: list[dict[str, Any]], dim: int, lo: int, hi: int, rank: int) -> torch.Tensor:
    covered = sorted(((s["columns"][0], s["columns"][1], index.with_name(s["file"])) for s in shards))
    if [c[0] for c in covered] + [dim] != [0] + [c[1] for c in covered]:
        raise TwaError(f"{index}: its shards do not cover the {dim} columns of the basis")
    out: torch.Tensor | None = None
    for a, b, file in covered:
        a2, b2 = max(a, lo), min(b, hi)
        if a2 >= b2:
            continue
        if not file.exists():
            raise TwaError(f"{index}: its shard {file.name} is missing")
        with open_tensors(file) as handle:
            piece = handle.read_slice("basis", slice(None), slice(a2 - a, b2 - a))
        if out is None:
            out = torch.empty(rank, hi - lo, dtype=piece.dtype)
        out[:, a2 - lo : b2 - lo] = piece
    return out if out is not None else torch.empty(rank, 0)


def shard_report(vectors: torch.Tensor, columns: tuple[int, int], group: Group) -> list[dict[str, Any]]:
    """What each rank holds of the basis (gathered on every rank), for the summary the commands print."""
    own = {"rank": group.rank, "columns": list(columns), "bytes": resident_bytes(vectors)}
    return group.gather_objects(own)
