"""The safetensors format, written by the tool's own streaming writer and mapped for reading in place.

A file is 8 bytes of little-endian header length, a JSON header giving each tensor's dtype, shape and byte
range (after the header) plus `__metadata__` (strings), then the data. The metadata's `format` is `pt`, as
`transformers` requires to load a file; the tool's own tag is `twa` (files of version 0.1 carried it in
`format`, and still read).
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from twa_cli.errors import TwaError
from twa_cli.io.atomic import atomic_file
from twa_cli.units import DTYPES, dtype_name, first_line

# safetensors codes of the dtypes that can be memory-mapped: (numpy dtype of the same width, torch dtype)
_MAPPABLE = {"F32": ("<f4", torch.float32), "F64": ("<f8", torch.float64),
             "F16": ("<i2", torch.float16), "BF16": ("<i2", torch.bfloat16)}


def st_code(dtype: torch.dtype) -> str:
    name = dtype_name(dtype)
    if name not in DTYPES:
        raise TwaError(f"cannot store a tensor of dtype {name} in a safetensors file")
    return DTYPES[name][0]


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                 *, exclusive: bool = False) -> Path:
    """Write a safetensors file atomically (callers check overwriting with `check_output`).

    Streamed tensor by tensor into the (unnamed) temporary file: no second copy of the model in memory, and
    views sharing one storage (the flat parameter buffer) are fine. `exclusive`: fail if the file appeared
    meanwhile.
    """
    with atomic_file(Path(path), exclusive=exclusive) as fh:
        write_tensors(fh, tensors, metadata)
    return Path(path)


def write_tensors(fh: BinaryIO, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """The safetensors bytes of `tensors` into an open file, from its current position."""
    # Largest items first, as safetensors does, so every tensor starts aligned for memory-mapped reading.
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t, size = tensors[name], _nbytes(tensors[name])
        header[name] = {"dtype": st_code(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    fh.write(struct.pack("<Q", len(encoded)))
    fh.write(encoded)
    for name in order:
        _write(fh, tensors[name])


class CannotMap(Exception):
    """The file cannot be written through a mapping here (its file system): write it the usual way."""


# posix_fallocate's answers for a file system that cannot reserve space (as opposed to a full disk)
_CANNOT_RESERVE = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


class PlacedRows:
    """A safetensors file whose one large fp32 matrix is computed in place: `rows` is a writable mapping of the
    file where the matrix's bytes will lie, so nothing copies it out at the end and the operating system writes
    it back to disk while the rest is still being computed (`settled` starts that write-back for finished rows).

    The file (an open, still unnamed or temporary file `fh`) is laid out as: 8 bytes of header length, the header
    padded with spaces, the 8-byte tensors, then the matrix at `room` (a page boundary fixed up front, as the
    header is only known at the end), then the rest, largest element first, so every tensor stays aligned.
    `finish` writes the header and the other tensors around the matrix, or returns False when the header does
    not fit before `room` (the caller then writes the file the usual way).
    """

    def __init__(self, fh: BinaryIO, rows: int, cols: int, room: int):
        self.fh, self.room, self.cols = fh, -(-room // mmap.PAGESIZE) * mmap.PAGESIZE, cols
        size = self.room + rows * cols * 4
        try:  # a full disk is an error now, not a crash when a page of the mapping is first written
            os.posix_fallocate(fh.fileno(), 0, size)
        except (AttributeError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in _CANNOT_RESERVE:
                raise
            raise CannotMap(f"this file system cannot reserve the space of a file ({exc})") from exc
        try:
            self._map = mmap.mmap(fh.fileno(), size)
        except OSError as exc:
            os.ftruncate(fh.fileno(), 0)
            raise CannotMap(f"this file system cannot map a file for writing ({exc})") from exc
        self.rows = torch.frombuffer(self._map, dtype=torch.float32, count=rows * cols,
                                     offset=self.room).view(rows, cols)
        self._settled = 0

    def settled(self, count: int) -> None:
        """Rows [0, count) are final: start writing them back to disk (Linux; elsewhere the final flush does)."""
        if count > self._settled and _sync_file_range is not None:
            begin = self.room + self._settled * self.cols * 4
            _sync_file_range(self.fh.fileno(), ctypes.c_int64(begin),
                             ctypes.c_int64((count - self._settled) * self.cols * 4), _SYNC_FILE_RANGE_WRITE)
        self._settled = max(self._settled, count)

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` is the first rows of the mapped matrix, as they lie in the file."""
        return (tensor.dtype == torch.float32 and tensor.dim() == 2 and tensor.shape[1] == self.cols
                and tensor.shape[0] <= self.rows.shape[0] and tensor.is_contiguous()
                and tensor.data_ptr() == self.rows.data_ptr())

    def finish(self, name: str, matrix: torch.Tensor, others: Mapping[str, torch.Tensor],
               metadata: Mapping[str, str]) -> bool:
        """Write the header and `others` around `matrix` (the first rows of `rows`); False if the header does
        not fit in the room left before the matrix (nothing is written then)."""
        if not self.holds(matrix):
            raise ValueError("the matrix to finish is not the rows mapped from this file")
        before = sorted(k for k in others if others[k].element_size() == 8)
        after = sorted((k for k in others if others[k].element_size() != 8),
                       key=lambda k: (-others[k].element_size(), k))
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for key, t in [*((k, others[k]) for k in before), (name, matrix), *((k, others[k]) for k in after)]:
            size = t.numel() * t.element_size()
            header[key] = {"dtype": st_code(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        length = self.room - 8 - sum(_nbytes(others[k]) for k in before)
        if len(encoded) > length:
            return False
        fh = self.fh
        fh.seek(0)
        fh.write(struct.pack("<Q", length))
        fh.write(encoded + b" " * (length - len(encoded)))
        for key in before:
            _write(fh, others[key])
        fh.seek(self.room + _nbytes(matrix))
        for key in after:
            _write(fh, others[key])
        fh.truncate()
        return True


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _write(fh: BinaryIO, t: torch.Tensor) -> None:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    fh.write(flat.view(torch.uint8).numpy().data if flat.numel() else b"")


def _load_sync_file_range() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def map_tensor(path: str | Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, memory-mapped (copy-on-write) rather than read: its pages come from
    the page cache as they are first touched, with no second copy in memory."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        entry = header[name]
        begin, end = entry["data_offsets"]
        np_dtype, dtype = _MAPPABLE[entry["dtype"]]
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise TwaError(f"{path}: cannot map tensor '{name}' ({first_line(exc)})") from exc
    shape = tuple(entry["shape"])
    count = (end - begin) // np.dtype(np_dtype).itemsize
    if count != math.prod(shape) or path.stat().st_size < 8 + length + end:
        raise TwaError(f"{path}: tensor '{name}' does not fit the file; is it truncated?")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    array = np.memmap(path, dtype=np_dtype, mode="c", offset=8 + length + begin, shape=(count,))
    return torch.from_numpy(array).view(dtype).view(shape)
