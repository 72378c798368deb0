"""The safetensors format, written by the tool's own streaming writer and mapped for reading in place.

A file is 8 bytes of little-endian header length, a JSON header giving each tensor's dtype, shape and byte
range (after the header) plus `__metadata__` (strings), then the data. The metadata's `format` is `pt`, as
`transformers` requires to load a file; the tool's own tag is `twa` (files of version 0.1 carried it in
`format`, and still read).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
    path = Path(path)
    # Largest items first, as safetensors does, so every tensor starts aligned for memory-mapped reading.
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": st_code(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with atomic_file(path, exclusive=exclusive) as fh:
        fh.write(struct.pack("<Q", len(encoded)))
        fh.write(encoded)
        for name in order:
            t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            fh.write(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return path


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
