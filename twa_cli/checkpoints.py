"""Checkpoint folders: the one place that reads and writes weight files.

A checkpoint is a `.safetensors` file holding a whole state_dict, with `__metadata__` saying what made it:
the format version, the architecture and the data set (both JSON), step, epoch and the names of the
trainable parameters. A folder is ordered by step (natural filename order when a file has none) and every
command selects from it by position with the same start/end/every flags.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import os
import re
import shutil
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open

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
        return _number_field(self, "step", int)

    @property
    def epoch(self) -> float | None:
        return _number_field(self, "epoch", float)

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "checkpoint")

    @property
    def arch(self) -> dict[str, Any] | None:
        return _json_field(self, "arch", dict)

    @property
    def data(self) -> dict[str, Any] | None:
        return _json_field(self, "data", dict)

    @property
    def trainable(self) -> list[str] | None:
        names = _json_field(self, "trainable", list)
        if names is not None and not all(isinstance(n, str) for n in names):
            raise TwaError(f"{self.path}: metadata field 'trainable' is not a list of tensor names")
        return names

    def json_field(self, key: str) -> Any:
        return _json_field(self, key)


def _json_field(ckpt: Checkpoint, key: str, kind: type | None = None) -> Any:
    raw = ckpt.meta.get(key)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TwaError(f"{ckpt.path}: metadata field '{key}' is not valid JSON ({exc.msg})") from exc
    if kind is not None and not isinstance(value, kind):
        raise TwaError(f"{ckpt.path}: metadata field '{key}' is not a JSON {kind.__name__}")
    return value


def _number_field(ckpt: Checkpoint, key: str, kind: type) -> Any:
    raw = ckpt.meta.get(key)
    if raw is None:
        return None
    try:
        return kind(raw)
    except ValueError as exc:
        raise TwaError(f"{ckpt.path}: metadata field '{key}' is not a number ({raw!r})") from exc


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
        flags = f"--start {start}" + (f" --end {end}" if end is not None else "") + f" --every {every}"
        raise TwaError(f"{flags} selects no checkpoint out of the {len(ckpts)} in the folder")
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


def check_output(path: Path, force: bool, inputs: Iterable[Path] = (), folder: bool = False) -> None:
    """Refuse to overwrite a result without --force, and never write into an input folder.

    `folder`: the output is a folder of files (else a single file).
    """
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise TwaError(f"{path}: cannot be created, {blocking} is a file")
    if folder and path.is_file():
        raise TwaError(f"{path}: is a file; the output is a folder")
    if not folder and path.is_dir():
        raise TwaError(f"{path}: is a folder; give the output file's name")
    if path.exists() and not force:
        raise TwaError(f"{path}: already exists (pass --force to overwrite it)")
    target = path.resolve().parent
    for src in inputs:
        src = Path(src).resolve()
        folder = src if src.is_dir() else src.parent
        if src.is_dir() and (target == folder or folder in target.parents):
            raise TwaError(f"{path}: will not write inside the input folder {src}; choose another output")


# A file being written has no name until it is complete (an O_TMPFILE, linked into the folder at the end),
# so a process killed mid-write leaves nothing behind. Where the system cannot do that, a dot-named
# temporary beside the target is used, and removed by the next write of the same file.
_UNNAMED_TEMPS = hasattr(os, "O_TMPFILE") and sys.platform.startswith("linux")
_UMASK = os.umask(0)
os.umask(_UMASK)


def _temp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.urandom(4).hex()}.tmp"


def _remove_stale_temps(path: Path) -> None:
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)


def _open_unnamed(folder: Path) -> int:
    if not _UNNAMED_TEMPS:
        return -1
    try:
        return os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o666)
    except OSError:  # a file system without unnamed files
        return -1


def _name_unnamed(fd: int, name: Path) -> None:
    """Give an O_TMPFILE a name (os.link would link the /proc symlink itself, hence linkat)."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, at_symlink_follow = -100, 0x400
    if libc.linkat(at_fdcwd, f"/proc/self/fd/{fd}".encode(), at_fdcwd, os.fsencode(name), at_symlink_follow):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(name))


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file whose content appears at `path`, complete, only when the block finishes without error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    named: Path | None = None
    fd = _open_unnamed(path.parent)
    if fd < 0:
        named = _temp_name(path)
        fd = os.open(named, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666 & ~_UMASK)
    try:
        with os.fdopen(fd, "w+b") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
            if named is None:
                named = _temp_name(path)
                try:
                    _name_unnamed(fh.fileno(), named)
                except OSError:  # no /proc: copy into a named temporary after all
                    fh.seek(0)
                    with open(named, "xb") as copy:
                        shutil.copyfileobj(fh, copy)
                        copy.flush()
                        os.fsync(copy.fileno())
            os.replace(named, path)
    finally:
        if named is not None and named.exists():
            named.unlink()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` that is renamed onto it only when the block finishes without error
    (for writers that want a path, not a file object)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write a safetensors file atomically (callers check overwriting with `check_output`).

    Streamed tensor by tensor into the (unnamed) temporary file: no second copy of the model in memory, and
    views sharing one storage (the flat parameter buffer) are fine.
    """
    path = Path(path)
    # Largest items first, as safetensors does, so every tensor starts aligned for memory-mapped reading.
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise TypeError(f"cannot store tensor '{name}' of dtype {t.dtype} in a safetensors file")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with atomic_file(path) as fh:
        fh.write(struct.pack("<Q", len(encoded)))
        fh.write(encoded)
        for name in order:
            t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            fh.write(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return path


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    with atomic_file(path) as fh:
        fh.write(text.encode())
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
