"""Checkpoint folders: the one place that reads and writes weight files.

A checkpoint the tool writes is a `.safetensors` file holding a whole state_dict, with `__metadata__` saying
what made it: the format version, the architecture and the data set (both JSON), step, epoch and the names
of the trainable parameters. Checkpoints other tools wrote (Hugging Face folders, sharded models, pickled
state dicts) are read through `twa_cli.readers`, so every command takes them as they are. A folder is
ordered by step (natural filename order when a checkpoint has none) and every command selects from it by
position with the same start/end/every flags.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from twa_cli import readers
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
    format: str = "safetensors"
    strip_prefix: str | None = None

    def open(self) -> readers.Reader:
        """A lazy reader of the tensors (use it in a `with` block)."""
        return readers.open_reader(self.path, self.strip_prefix if self.strip_prefix is not None else _prefix_for(self.path))

    @property
    def name(self) -> str:
        return self.path.name

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


# The command and resolved options of the running CLI invocation, recorded in every file it writes.
_INVOCATION: ContextVar[dict[str, Any] | None] = ContextVar("twa_invocation", default=None)


@contextmanager
def recording(command: str, options: Mapping[str, Any]) -> Iterator[None]:
    """Within the block, every file written records `{"command": ..., "options": ...}` as `invocation`."""
    token = _INVOCATION.set({"command": command, "options": dict(options)})
    try:
        yield
    finally:
        _INVOCATION.reset(token)


def start_recording(command: str, options: Mapping[str, Any]) -> Callable[[], None]:
    """`recording` for a CLI command that runs to the end of the process; returns the function that stops it."""
    token = _INVOCATION.set({"command": command, "options": dict(options)})
    return lambda: _INVOCATION.reset(token)


def make_metadata(kind: str, **fields: Any) -> dict[str, str]:
    """Metadata for a file the tool writes: strings stay strings, everything else becomes JSON."""
    meta = {"format": FORMAT, "kind": kind}
    if _INVOCATION.get() is not None and "invocation" not in fields:
        fields["invocation"] = _INVOCATION.get()
    for key, value in fields.items():
        if value is None:
            continue
        meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return meta


# ---------------------------------------------------------------------------------------------- reading


# `--strip-prefix` chosen for a path, so that code holding only `ckpt.path` reads the same names.
_PREFIXES: dict[Path, str] = {}


def _prefix_for(path: Path) -> str | None:
    return _PREFIXES.get(Path(path).resolve())


def read_checkpoint(path: str | Path, strip_prefix: str | None = None) -> Checkpoint:
    """Open a checkpoint's header (not its tensors), in any format the readers know, with its metadata.

    `strip_prefix` is remembered for the path: later `open_tensors(path)` calls strip the same prefix."""
    path = Path(path)
    if not path.exists():
        raise TwaError(f"{path}: no such file")
    if strip_prefix is not None:
        _PREFIXES[path.resolve()] = strip_prefix
    with readers.reading(path, strip_prefix if strip_prefix is not None else _prefix_for(path)) as reader:
        meta = reader.metadata()
        fmt = reader.format
    return Checkpoint(path, meta, fmt, strip_prefix)


@contextmanager
def open_tensors(path: Path | Checkpoint) -> Iterator[readers.Reader]:
    """A lazy view of a checkpoint's tensors (`keys`, `get_tensor`, `get_slice`, `metadata`, as safe_open),
    whatever its format; a damaged file becomes a one-line error."""
    reader = path.open() if isinstance(path, Checkpoint) else readers.open_reader(path, _prefix_for(Path(path)))
    try:
        yield reader
    finally:
        reader.close()


def load_tensors(path: str | Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a file (all, or the given names), checked to be finite."""
    path = Path(path)
    with open_tensors(path) as handle:
        available = set(handle.keys())
        keys = list(handle.keys()) if names is None else list(names)
        missing = [k for k in keys if k not in available]
        if missing:
            raise TwaError(f"{path}: has no tensor '{missing[0]}'")
        tensors = {k: handle.get(k) for k in keys}
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


def tensor_shapes(path: Path | Checkpoint) -> dict[str, tuple[int, ...]]:
    with open_tensors(path) as handle:
        return {k: tuple(handle.shape(k)) for k in handle.keys()}


def _natural_key(name: str) -> list[Any]:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def list_folder(folder: str | Path, strip_prefix: str | None = None) -> list[Checkpoint]:
    """The checkpoints in a folder, in training order (by step, else natural filename order).

    A folder holds weight files of any format the readers know, or Hugging Face `checkpoint-*` subfolders
    (then the final model saved beside them, a copy of one of them, is left out); a single file, shard
    index or Hugging Face model folder is a list of one."""
    folder = Path(folder)
    if not folder.exists():
        raise TwaError(f"{folder}: no such file or folder")
    if folder.is_file():
        return [read_checkpoint(folder, strip_prefix)]
    paths = readers.checkpoint_paths(folder)
    if any(p.is_dir() for p in paths) and paths != [folder]:
        paths = [p for p in paths if p.is_dir() or not _is_hf_final_model(p)]
    paths.sort(key=lambda p: _natural_key(p.name))
    ckpts = [c for c in (read_checkpoint(p, strip_prefix) for p in paths) if c.kind not in OTHER_KINDS]
    if not ckpts:
        raise TwaError(f"{folder}: no .safetensors checkpoints in this folder (nor .pt, .pth, .bin, .ckpt, .pth.tar "
                       f"files or Hugging Face checkpoint-* folders)")
    if all(c.step is not None for c in ckpts):
        ckpts.sort(key=lambda c: c.step)  # stable: equal steps keep filename order
    return ckpts


def _is_hf_final_model(path: Path) -> bool:
    return path.name in readers.HF_WEIGHT_FILES or bool(readers.SHARD.match(path.name))


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
    reference = tensor_shapes(ckpts[0])
    for ckpt in ckpts[1:]:
        shapes = tensor_shapes(ckpt)
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
    """The hash of a checkpoint's bytes; for a sharded checkpoint or a folder, of its index and shards in turn."""
    digest = hashlib.sha256()
    for part in readers.checkpoint_files(Path(path)):
        with open(part, "rb") as fh:
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
        src_folder = src if src.is_dir() else src.parent
        if src.is_dir() and (target == src_folder or src_folder in target.parents):
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


def save_checkpoint(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    max_shard_size: int | None = None,
) -> Path:
    """Write a result, sharded when it is large; returns the path to read it back from.

    `path` ending in `.safetensors` is one file, or, when the tensors exceed `max_shard_size` bytes, shards
    `NAME-0000k-of-0000n.safetensors` beside an index `NAME.safetensors.index.json` (returned). Any other
    `path` is a folder in Hugging Face's layout: `model.safetensors`, or `model-0000k-of-0000n.safetensors`
    with `model.safetensors.index.json`. Every shard carries the metadata; the index is written last."""
    path = Path(path)
    if path.name.endswith(readers.INDEX_SUFFIX):
        path = path.with_name(path.name[: -len(readers.INDEX_SUFFIX)])
    if not path.name.endswith(SUFFIX):
        path.mkdir(parents=True, exist_ok=True)
        path = path / "model.safetensors"
    shards = split_shards(tensors, max_shard_size) if max_shard_size is not None else [list(tensors)]
    stem = path.name[: -len(SUFFIX)]
    index = path.with_name(path.name + readers.INDEX_SUFFIX)
    if len(shards) == 1:
        save_tensors(path, tensors, metadata)
        _remove_stale(path.parent, stem, keep=set())
        index.unlink(missing_ok=True)
        return path
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}{SUFFIX}" for i in range(len(shards))]
    weight_map = {}
    for name, keys in zip(names, shards):
        save_tensors(path.parent / name, {k: tensors[k] for k in keys}, metadata)
        weight_map.update({k: name for k in keys})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(index, {"metadata": {"total_size": total, **dict(metadata)}, "weight_map": weight_map})
    _remove_stale(path.parent, stem, keep=set(names))
    path.unlink(missing_ok=True)
    return index


def check_result_output(path: Path, force: bool, inputs: Iterable[Path] = ()) -> None:
    """`check_output` for a result that may be sharded: its index counts as the result too. A path not ending in
    .safetensors is a folder in Hugging Face's layout."""
    check_output(path, force, inputs, folder=not path.name.endswith(SUFFIX))
    index = path.with_name(path.name + readers.INDEX_SUFFIX)
    folder_index = path / "model.safetensors.index.json"
    for existing in (index, folder_index):
        if existing.exists() and not force:
            raise TwaError(f"{existing}: already exists (pass --force to overwrite it)")


def copy_model_files(source: Path, folder: Path) -> list[Path]:
    """Beside weights written in Hugging Face's layout, the configuration and tokenizer files of the Hugging Face
    checkpoint folder they came from, so `from_pretrained(folder)` loads them; training state is not copied."""
    if not source.is_dir() or not folder.is_dir():
        return []
    copied = []
    for src in sorted(source.iterdir()):
        if (src.is_file() and src.suffix in (".json", ".txt", ".model") and src.name != "trainer_state.json"
                and not src.name.endswith(readers.INDEX_SUFFIX) and not (folder / src.name).exists()):
            copied.append(write_bytes(folder / src.name, src.read_bytes()))
    return copied


def write_bytes(path: Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def split_shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped in order into shards of at most `max_bytes` (a larger tensor gets a shard alone),
    the way Hugging Face splits a model."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _remove_stale(folder: Path, stem: str, keep: set[str]) -> None:
    """Shards of an earlier result with the same name (overwritten with --force) that the new one does not use."""
    pattern = re.compile(rf"^{re.escape(stem)}-\d{{5}}-of-\d{{5}}{re.escape(SUFFIX)}$")
    for old in folder.glob(f"{stem}-*{SUFFIX}"):
        if pattern.match(old.name) and old.name not in keep:
            old.unlink()


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise TwaError(f"{flag}: cannot read '{text}' as a size (examples: 5GB, 500MB, 2GiB, 1000000)")
    value = int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])
    if value < 1:
        raise TwaError(f"{flag}: must be at least one byte")
    return value


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
