"""Basis files: one `.safetensors` file (kind "basis"), or, written under torchrun, an index and one file of
columns per rank. Any process can read any range of columns back, whatever the number of ranks that wrote it.

A whole basis file holds `basis` (k x D), `coords` (k x n, fp64), `buffer.<name>` (the checkpoints' average
buffers) and the metadata (layout, sources, dropped, rank, errors, dtype, and what the checkpoints recorded
about their task). A sharded one is the same file with an empty (k x 0) `basis` and a `shards` list (file and
column range), beside files `<name>.00001-of-0000N.safetensors` holding the columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from twa_cli.core.basis import Basis
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import (
    Checkpoint,
    check_finite,
    load_tensors,
    make_metadata,
    open_tensors,
    read_checkpoint,
    sources_of,
)
from twa_cli.io.readers import shard_beside
from twa_cli.io.safetensors import map_tensor, save_tensors
from twa_cli.units import dtype_name, layout_size


def basis_metadata(basis: Basis, invocation: dict[str, Any] | None, **extra: Any) -> dict[str, str]:
    return make_metadata(
        "basis", invocation=invocation, **basis.recorded,
        layout=[[name, list(shape)] for name, shape in basis.layout],
        sources=[s.to_dict() for s in basis.sources],
        dropped=basis.dropped,
        rank=str(basis.rank),
        errors=basis.errors,
        dtype=dtype_name(basis.vectors.dtype),
        **extra,
    )


def save_basis(basis: Basis, path: str | Path, *, invocation: dict[str, Any] | None = None,
               exclusive: bool = False, **extra_meta: Any) -> Path:
    tensors = {"basis": basis.vectors, "coords": basis.coords}
    tensors.update({f"buffer.{k}": v for k, v in basis.buffers.items()})
    return save_tensors(path, tensors, basis_metadata(basis, invocation, **extra_meta), exclusive=exclusive)


def shard_path(index: Path, rank: int, world: int) -> Path:
    return index.with_name(f"{index.stem}.{rank + 1:05d}-of-{world:05d}{index.suffix}")


def save_columns(basis: Basis, columns: tuple[int, int], index: Path, rank: int, world: int) -> dict[str, Any]:
    """This rank's columns, beside the index rank 0 writes once every rank is done (`save_index`)."""
    mine = shard_path(index, rank, world)
    save_tensors(mine, {"basis": basis.vectors}, make_metadata("basis", shard_of=index.name, columns=list(columns)))
    return {"file": mine.name, "columns": list(columns)}


def save_index(basis: Basis, index: Path, shards: list[dict[str, Any]], *, invocation: dict[str, Any] | None,
               exclusive: bool) -> Path:
    """The coordinates, buffers and metadata of the whole basis, with an empty (k x 0) matrix of vectors."""
    empty = torch.empty(basis.rank, 0, dtype=basis.vectors.dtype)
    whole = Basis(empty, basis.coords, basis.layout, basis.buffers, basis.sources, basis.dropped, basis.recorded,
                  basis.errors)
    return save_basis(whole, index, invocation=invocation, exclusive=exclusive, shards=shards)


def is_basis_file(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and read_checkpoint(path).kind == "basis"


def basis_layout(ckpt: Checkpoint) -> list[tuple[str, tuple[int, ...]]]:
    try:
        return [(str(name), tuple(int(n) for n in shape)) for name, shape in ckpt.json_field("layout", list)]
    except (TypeError, ValueError) as exc:
        raise TwaError(f"{ckpt.path}: a damaged basis file (its layout is not a list of [name, shape])") from exc


def load_basis(path: str | Path, columns: tuple[int, int] | None = None) -> Basis:
    """The basis in `path` (whole or sharded), with only columns [lo, hi) of its vectors when given. A whole
    basis file read whole is memory-mapped, not read: training uses the file's pages in place."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    if ckpt.kind != "basis":
        raise TwaError(f"{path}: not a basis file (made by `twa orthogonalize`)")
    if "shard_of" in ckpt.meta:
        raise TwaError(f"{path}: one shard of a basis; pass its index file {path.with_name(ckpt.meta['shard_of'])}")
    layout = basis_layout(ckpt)
    dim = layout_size(layout)
    with open_tensors(ckpt) as handle:
        small = [k for k in handle.keys() if k != "basis"]
    tensors = load_tensors(ckpt, small)
    if "coords" not in tensors:
        raise TwaError(f"{path}: a damaged basis file (no coords)")
    coords = tensors["coords"]
    rank = coords.shape[0] if coords.dim() == 2 else -1
    if "shards" in ckpt.meta:
        lo, hi = columns if columns is not None else (0, dim)
        vectors = _read_shards(path, ckpt.json_field("shards", list), dim, lo, hi, rank)
    elif columns is not None:
        with open_tensors(ckpt) as handle:
            vectors = handle.read_slice("basis", slice(None), slice(*columns))
    else:
        vectors = map_tensor(path, "basis")
    width = (columns[1] - columns[0]) if columns is not None else dim
    if vectors.dim() != 2 or vectors.shape[1] != width:
        raise TwaError(f"{path}: the basis has shape {list(vectors.shape)} but its layout describes {dim} columns")
    if coords.dim() != 2 or coords.shape[0] != vectors.shape[0]:
        raise TwaError(f"{path}: coords of shape {list(coords.shape)} do not match {vectors.shape[0]} basis vectors")
    sources = sources_of(ckpt)
    if len(sources) != coords.shape[1]:
        raise TwaError(f"{path}: a damaged basis file ({len(sources)} source checkpoints recorded for "
                       f"{coords.shape[1]} columns of coords)")
    for i, row in enumerate(vectors):  # row by row: a whole-basis isfinite would allocate a quarter of it
        check_finite(row, f"{path}: basis row {i}")
    return Basis(
        vectors=vectors, coords=coords, layout=layout,
        buffers={k[len("buffer."):]: v for k, v in tensors.items() if k.startswith("buffer.")},
        sources=sources,
        dropped=ckpt.json_field("dropped", list) or [],
        recorded=ckpt.task_fields(),
        errors=ckpt.json_field("errors", dict) or {},
    )


def _read_shards(index: Path, shards: Any, dim: int, lo: int, hi: int, rank: int) -> torch.Tensor:
    try:
        covered = sorted((int(s["columns"][0]), int(s["columns"][1]), str(s["file"])) for s in shards)
    except (TypeError, KeyError, ValueError, IndexError) as exc:
        raise TwaError(f"{index}: a damaged basis index (its shards list is not files with column ranges)") from exc
    if [c[0] for c in covered] + [dim] != [0] + [c[1] for c in covered]:
        raise TwaError(f"{index}: its shards do not cover the {dim} columns of the basis")
    out: torch.Tensor | None = None
    for a, b, name in covered:
        file = shard_beside(index, name)
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
    return out if out is not None else torch.empty(max(rank, 0), 0)
