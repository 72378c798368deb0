"""Names and sizes shared by every layer: the one dtype table, the one size formatter and parser, and the one
way a number that is not finite is written in JSON.

Torch-free, so the command line can list choices without importing torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

# dtype name -> (safetensors code, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8), "float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2),
    "int64": ("I64", 8), "int32": ("I32", 4), "int16": ("I16", 2), "int8": ("I8", 1), "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}
# Precisions a basis or a written result may be stored in.
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
CODE_TO_NAME = {code: name for name, (code, _) in DTYPES.items()}
# How training saw the images of a data set (twa_cli.tasks.images): `standard` is each registry set's own.
AUGMENTATIONS = ("standard", "none", "crop-flip", "resized-crop-flip")
NORMALIZATIONS = ("standard", "cifar10", "cifar100", "mnist", "fashion-mnist", "imagenet", "half", "none")


def dtype_name(dtype: Any) -> str:
    """'float32' for torch.float32 (or for the string 'float32')."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}'")
    return getattr(torch, name)


def itemsize(dtype: Any) -> int:
    return DTYPES[dtype_name(dtype)][1]


def layout_size(layout: Iterable[tuple[str, tuple[int, ...]]]) -> int:
    """D: how many weights the tensors of a layout (name, shape pairs, in the order they fill the parameter
    vector) hold together."""
    return sum(math.prod(shape) for _, shape in layout)


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (powers of 1000, as disks and `--max-shard-size` count)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    from twa_cli.errors import TwaError

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise TwaError(f"{flag}: cannot read '{text}' as a size (examples: 5GB, 500MB, 2GiB, 1000000)")
    value = int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])
    if value < 1:
        raise TwaError(f"{flag}: must be at least one byte")
    return value


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def json_dumps(obj: Any, *, indent: int | None = None, default: Any = None) -> str:
    """`json.dumps` of `standard_json(obj)`: what every JSON text twa writes goes through."""
    return json.dumps(standard_json(obj), indent=indent, default=default, allow_nan=False)


def standard_json(obj: Any) -> Any:
    """`obj` with every non-finite float (an unbounded lr limit, a diverged loss) as null: Python's json would
    write Infinity and NaN, which no standard parser (JavaScript's, jq's) reads."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: standard_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [standard_json(v) for v in obj]
    return obj


def launched_by_torchrun() -> bool:
    """Whether the launcher started this process as one of several (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
