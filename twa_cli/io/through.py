"""Reading a checkpoint through, once: every tensor in the order the files store them, with the files' hash
taken from the same bytes.

A command that needs all of a checkpoint's tensors (the basis, the buffers beside it, the hash its sources
record) reads it here in one pass instead of opening it once per need. A safetensors file is read from
start to end, each tensor straight into its own memory, and the hash is updated from that memory: the bytes
leave the disk once and are never copied to be hashed. A pickle cannot be parsed as it streams (its index
sits at the end of a zip), so its bytes are hashed as they are read and its tensors then mapped from the
same pages, which the read just brought into the page cache. The hash is `sha256_file`'s: an index, then
its shards in order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from twa_cli.errors import TwaError
from twa_cli.io import readers
from twa_cli.io.readers import INDEX_SUFFIX, SAFETENSORS, ReadOptions
from twa_cli.units import CODE_TO_NAME

CHUNK = 1 << 22


class Digest(Protocol):
    def update(self, data: Any, /) -> None: ...


class _NoDigest:
    def update(self, data: Any, /) -> None:
        return None


# Where a caller wants a tensor read: `place(name, shape, dtype)` returns memory of that shape and dtype (a view
# of the caller's own buffer), or None for memory of the tensor's own.
Place = Callable[[str, tuple[int, ...], torch.dtype], "torch.Tensor | None"]


def read_through(path: str | Path, options: ReadOptions = ReadOptions(), digest: Digest | None = None,
                 skip: Collection[str] = (), place: Place | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint at `path` (names as its reader gives them) but those
    in `skip`, reading each of its files once; `digest` has seen every byte of them, in `sha256_file`'s order,
    once the iterator is exhausted. A tensor is yielded whole, in memory of its own or, for a safetensors file,
    read straight into the memory `place` gives (no copy, no fresh pages). Without a digest the skipped tensors
    are not read at all."""
    path = readers.as_written(Path(path))
    if path.is_dir():
        weights = readers.hf_weights(path)
        if weights is None:
            raise TwaError(f"{path}: no model weights in this folder")
        yield from read_through(weights, options, digest, skip, place)
    elif path.name.endswith(INDEX_SUFFIX):
        yield from _sharded(path, options, digest, skip, place)
    elif path.name.endswith(SAFETENSORS) or readers.looks_like_safetensors(path):
        yield from _safetensors(path, options, digest, skip, place)
    else:
        yield from _pickle(path, options, digest, skip)


def _sharded(index: Path, options: ReadOptions, digest: Digest | None, skip: Collection[str],
             place: Place | None) -> Iterator[tuple[str, torch.Tensor]]:
    if digest is not None:
        digest.update(index.read_bytes())
    weight_map: dict[str, str] = readers.read_index(index)["weight_map"]
    read_name = {disk: name for name, disk in
                 readers.strip_map(list(weight_map), options, auto=False, where=index).items()}
    plain = ReadOptions(strip_prefix="")  # the index's names are the shards' own; stripping applied to them
    skip_disk = {disk for disk, name in read_name.items() if name in skip}
    for shard in readers.shard_files(index):
        if not shard.exists():
            raise TwaError(f"{index}: names shard {shard.name}, which is missing")
        at_disk = None if place is None else (lambda disk, shape, dtype: place(read_name[disk], shape, dtype)
                                              if disk in read_name else None)
        for disk, tensor in read_through(shard, plain, digest, skip_disk, at_disk):
            if weight_map.get(disk) == shard.name:
                yield read_name[disk], tensor


def _safetensors(path: Path, options: ReadOptions, digest: Digest | None, skip: Collection[str],
                 place: Place | None) -> Iterator[tuple[str, torch.Tensor]]:
    hashing = digest is not None
    digest = digest if digest is not None else _NoDigest()
    with open(path, "rb") as fh:
        head = _exactly(fh, 8, path, digest)
        header_bytes = _exactly(fh, int.from_bytes(head, "little"), path, digest)
        header_end = fh.tell()
        try:
            header = json.loads(header_bytes)
            header.pop("__metadata__", None)
            entries = sorted(header.items(), key=lambda kv: int(kv[1]["data_offsets"][0]))
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise TwaError(f"{path}: not a readable safetensors file (its header is damaged)") from exc
        read_name = {disk: name for name, disk in
                     readers.strip_map([k for k, _ in entries], options, auto=False, where=path).items()}
        at = 0
        for disk, info in entries:
            name = read_name[disk]
            shape, dtype = _entry(path, disk, info)
            start, end = (int(v) for v in info["data_offsets"])
            if start < at or end - start != math.prod(shape) * dtype.itemsize:
                raise TwaError(f"{path}: tensor '{disk}' has offsets that do not fit its shape and dtype; the "
                               "header is damaged")
            if start > at:
                _exactly(fh, start - at, path, digest)  # padding between tensors: hashed like every byte
            at = end
            if name in skip and not hashing:
                fh.seek(header_end + end)
                continue
            given = place(name, shape, dtype) if place is not None and name not in skip else None
            tensor = torch.empty(shape, dtype=dtype) if given is None else _checked_place(given, shape, dtype)
            _read_into(fh, tensor, path, disk, digest)
            if name not in skip:
                yield name, tensor
        while hashing and (block := fh.read(CHUNK)):
            digest.update(block)


def _pickle(path: Path, options: ReadOptions, digest: Digest | None,
            skip: Collection[str]) -> Iterator[tuple[str, torch.Tensor]]:
    if digest is not None:
        with open(path, "rb") as fh:
            while block := fh.read(CHUNK):
                digest.update(block)
    with readers.PickleReader(path, options) as reader:
        for name in reader.keys():
            if name not in skip:
                yield name, reader.get(name)


def _entry(path: Path, disk: str, info: Any) -> tuple[tuple[int, ...], torch.dtype]:
    code = info.get("dtype") if isinstance(info, dict) else None
    if code not in CODE_TO_NAME:
        raise TwaError(f"{path}: tensor '{disk}' has dtype {code}, which the tool does not handle")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise TwaError(f"{path}: tensor '{disk}' has no valid shape in the header")
    return tuple(shape), getattr(torch, CODE_TO_NAME[code])


def _checked_place(given: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if tuple(given.shape) != shape or given.dtype != dtype or not given.is_contiguous() or given.device.type != "cpu":
        raise ValueError(f"place() gave {given.dtype} {list(given.shape)} memory for {dtype} {list(shape)}")
    return given


def _read_into(fh: Any, tensor: torch.Tensor, path: Path, disk: str, digest: Digest) -> None:
    if not tensor.numel():
        return
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        got = fh.readinto(view[done:])
        if not got:
            raise TwaError(f"{path}: cannot read tensor '{disk}'; is the file truncated? (it ends inside it)")
        done += got
    digest.update(view)


def _exactly(fh: Any, size: int, path: Path, digest: Digest) -> bytes:
    data = fh.read(size)
    if len(data) != size:
        raise TwaError(f"{path}: ends early; is the file truncated?")
    digest.update(data)
    return data
