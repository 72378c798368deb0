"""Checkpoint folders: the one place that reads and writes weight files.

A checkpoint is a `.safetensors` file holding a whole state_dict, with `__metadata__` saying what made it:
the format version, the architecture and the data set (both JSON), step, epoch and the names of the
trainable parameters. A folder is ordered by step (natural filename order when a file has none) and every
command selects from it by position with the same start/end/every flags.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from twa_cli.errors import TwaError

FORMAT = "twa/1"
SUFFIX = ".safetensors"

# Kinds of file the tool writes; only the first three are checkpoints a folder listing returns.
CHECKPOINT_KINDS = ("checkpoint", "average", "twa")
OTHER_KINDS = ("basis", "train-state")


@dataclass(frozen=True)
class Checkpoint:
    """One weight file and what its metadata says about it."""

    path: Path
    meta: Mapping[str, str] = field(default_factory=dict)

    @property
    def step(self) -> int | None:
        return int(self.meta["step"]) if "step" in self.meta else None

    @property
    def epoch(self) -> float | None:
        return float(self.meta["epoch"]) if "epoch" in self.meta else None

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "checkpoint")

    @property
    def arch(self) -> dict[str, Any] | None:
        return _json_field(self, "arch")

    @property
    def data(self) -> dict[str, Any] | None:
        return _json_field(self, "data")

    @property
    def trainable(self) -> list[str] | None:
        return _json_field(self, "trainable")

    def json_field(self, key: str) -> Any:
        return _json_field(self, key)


def _json_field(ckpt: Checkpoint, key: str) -> Any:
    raw = ckpt.meta.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TwaError(f"{ckpt.path}: metadata field '{key}' is not valid JSON ({exc.msg})") from exc


def make_metadata(kind: str, **fields: Any) -> dict[str, str]:
    """Metadata for a file the tool writes: strings stay strings, everything else becomes JSON."""
    meta = {"format": FORMAT, "kind": kind}
    for key, value in fields.items():
        if value is None:
            continue
        meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return meta


# ---------------------------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Open a file's header (not its tensors) and return it with its metadata."""
    path = Path(path)
    if not path.exists():
        raise TwaError(f"{path}: no such file")
    with open_tensors(path) as handle:
        meta = handle.metadata() or {}
    return Checkpoint(path, dict(meta))


@contextmanager
def open_tensors(path: Path) -> Iterator[Any]:
    """A lazy, memory-mapped view of a safetensors file; a damaged file becomes a one-line error."""
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise TwaError(f"{path}: not a readable safetensors file ({_short(exc)})") from exc
    with handle as opened:
        yield opened


def load_tensors(path: str | Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a file (all, or the given names), checked to be finite."""
    path = Path(path)
    with open_tensors(path) as handle:
        keys = list(handle.keys()) if names is None else list(names)
        missing = [k for k in keys if k not in set(handle.keys())]
        if missing:
            raise TwaError(f"{path}: has no tensor '{missing[0]}'")
        try:
            tensors = {k: handle.get_tensor(k) for k in keys}
        except Exception as exc:
            raise TwaError(f"{path}: cannot read tensor data ({_short(exc)}); is the file truncated?") from exc
    for name, tensor in tensors.items():
        check_finite(tensor, f"{path}: tensor '{name}'")
    return tensors


# safetensors dtype names -> (numpy dtype of the same width to map the bytes with, torch dtype to view them as)
_MAPPABLE = {
    "F32": ("<f4", torch.float32), "F64": ("<f8", torch.float64),
    "F16": ("<i2", torch.float16), "BF16": ("<i2", torch.bfloat16),
}


def map_tensor(path: str | Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, memory-mapped (copy-on-write) rather than read: its pages come from
    the page cache as they are first touched, with no second copy in memory.

    The file is 8 bytes of little-endian header length, a JSON header giving each tensor's dtype, shape and
    byte range (after the header), then the data.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        entry = header[name]
        begin, end = entry["data_offsets"]
        np_dtype, dtype = _MAPPABLE[entry["dtype"]]
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise TwaError(f"{path}: cannot map tensor '{name}' ({_short(exc)})") from exc
    shape = tuple(entry["shape"])
    count = (end - begin) // np.dtype(np_dtype).itemsize
    if count != math.prod(shape) or path.stat().st_size < 8 + length + end:
        raise TwaError(f"{path}: tensor '{name}' does not fit the file; is it truncated?")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    array = np.memmap(path, dtype=np_dtype, mode="c", offset=8 + length + begin, shape=(count,))
    return torch.from_numpy(array).view(dtype).view(shape)


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise TwaError(f"{what} contains NaN or Inf")


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with open_tensors(path) as handle:
        return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}


def _natural_key(name: str) -> list[Any]:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def list_folder(folder: str | Path) -> list[Checkpoint]:
    """The checkpoints in a folder, in training order (by step, else natural filename order)."""
    folder = Path(folder)
    if not folder.exists():
        raise TwaError(f"{folder}: no such file or folder")
    if folder.is_file():
        return [read_checkpoint(folder)]
    files = sorted(folder.glob(f"*{SUFFIX}"), key=lambda p: _natural_key(p.name))
    ckpts = [c for c in (read_checkpoint(f) for f in files) if c.kind not in OTHER_KINDS]
    if not ckpts:
        raise TwaError(f"{folder}: no {SUFFIX} checkpoints in this folder")
    if all(c.step is not None for c in ckpts):
        ckpts.sort(key=lambda c: c.step)  # stable: equal steps keep filename order
    return ckpts


def select(ckpts: list[Checkpoint], start: int = 0, end: int | None = None, every: int = 1) -> list[Checkpoint]:
    """Positional selection, as the paper takes "the first 100 epochs": ckpts[start:end:every]."""
    if every < 1:
        raise TwaError(f"--every must be at least 1 (got {every})")
    chosen = ckpts[start:end:every]
    if not chosen:
        raise TwaError(
            f"--start {start} --end {end} --every {every} selects no checkpoint out of {len(ckpts)}"
        )
    return chosen


def check_compatible(ckpts: list[Checkpoint]) -> dict[str, tuple[int, ...]]:
    """Every checkpoint has the same tensor names and shapes as the first; returns those shapes."""
    reference = tensor_shapes(ckpts[0].path)
    for ckpt in ckpts[1:]:
        shapes = tensor_shapes(ckpt.path)
        for key in sorted(set(reference) | set(shapes)):
            if key not in shapes or key not in reference:
                has, lacks = (ckpts[0].path, ckpt.path) if key in reference else (ckpt.path, ckpts[0].path)
                raise TwaError(f"checkpoints differ: '{key}' is in {has} but not in {lacks}")
            if shapes[key] != reference[key]:
                raise TwaError(
                    f"checkpoints differ: '{key}' has shape {list(reference[key])} in {ckpts[0].path} "
                    f"but {list(shapes[key])} in {ckpt.path}"
                )
    return reference


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- writing


def check_output(path: Path, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse to overwrite a result without --force, and never write into an input folder."""
    if path.exists() and not force:
        raise TwaError(f"{path}: already exists (pass --force to overwrite it)")
    target = path.resolve().parent
    for src in inputs:
        src = Path(src).resolve()
        folder = src if src.is_dir() else src.parent
        if src.is_dir() and (target == folder or folder in target.parents):
            raise TwaError(f"{path}: will not write inside the input folder {src}; choose another output")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` that is renamed onto it only when the block finishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write a safetensors file atomically (callers check overwriting with `check_output`)."""
    path = Path(path)
    owned = {k: _owned(v, tensors.values()) for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(owned, str(tmp), metadata=dict(metadata))
    return path


def _owned(tensor: torch.Tensor, others: Iterable[torch.Tensor]) -> torch.Tensor:
    """The tensor itself when safetensors can write it as it is, else a copy: safetensors refuses views
    sharing storage (our flat parameter buffer). A large basis is written without a second copy in memory."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return tensor.to("cpu").contiguous().clone()
    storage = tensor.untyped_storage().data_ptr()
    shared = sum(1 for t in others if t.device.type == "cpu" and t.untyped_storage().data_ptr() == storage)
    return tensor.clone() if shared > 1 else tensor


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
