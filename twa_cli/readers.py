"""Readers for the checkpoints other tools write, behind one lazy interface.

What is on disk picks the reader: a `.safetensors` file; a sharded checkpoint (`*.index.json` naming its
shards, each opened only when one of its tensors is asked for); a Hugging Face checkpoint folder
(`checkpoint-500/` holding `model.safetensors`, a sharded safetensors model, or `pytorch_model.bin`); a
pickled state dict (`.pt`, `.pth`, `.bin`, `.ckpt`, `.pth.tar`) loaded with `torch.load(weights_only=True)`,
which never runs pickled code. Pickles are unwrapped (`state_dict`, `model`, `model_state_dict`,
`state_dict_ema`) and a prefix shared by every key (`module.` from DistributedDataParallel, `model.` from
Lightning) is stripped, so the keys match the bare model.

A reader answers `keys()`, `shape(name)`, `dtype(name)`, `get(name)` and `metadata()`; it also answers the
safetensors handle calls (`get_tensor`, `get_slice(name).get_shape()/.get_dtype()`) so code written against
`safe_open` works unchanged on every format.
"""

from __future__ import annotations

import math

from abc import ABC, abstractmethod

import json
import pickle
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from twa_cli.errors import TwaError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar")
SAFETENSORS = ".safetensors"
INDEX_SUFFIX = ".index.json"
# Wrappers around a state dict, in the order they are tried. Like timm's averaging script (without --use-ema),
# the raw weights win over the EMA copy when a checkpoint has both.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "state_dict_ema", "model_ema")
AUTO_PREFIXES = ("module.", "model.", "_orig_mod.")
# Files in a training folder that hold no model weights.
NOT_WEIGHTS = re.compile(r"^(optimizer|scheduler|scaler|training_args|rng_state.*)\.(pt|pth|bin)$")
# Full models first; a PEFT checkpoint holds only its adapter, which is averaged like any other weights.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
SHARD = re.compile(r"^(.*)-\d{5}-of-\d{5}\.(safetensors|bin)$")

TORCH_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}


class _Slice:
    """What `safe_open(...).get_slice(name)` answers about a tensor, for code written against it."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        self._shape, self._dtype = shape, dtype

    def get_shape(self) -> list[int]:
        return list(self._shape)

    def get_dtype(self) -> str:
        return TORCH_TO_ST.get(self._dtype, str(self._dtype))


class Reader(ABC):
    """One checkpoint, whatever its format; tensors are read only when asked for."""

    format = "unknown"

    def __init__(self, path: Path):
        self.path = path

    @abstractmethod
    def keys(self) -> list[str]:
        """The tensor names (prefix stripped)."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the header alone."""

    @abstractmethod
    def dtype(self, name: str) -> torch.dtype:
        """A tensor's dtype, from the header alone."""

    @abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """A whole tensor."""

    def read_slice(self, name: str, *index: slice) -> torch.Tensor:
        """tensor[index] (formats that can read part of a tensor read only that part)."""
        return self.get(name)[index]

    def metadata(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        return None

    def numel(self) -> int:
        return sum(math.prod(self.shape(k)) for k in self.keys())

    def nbytes(self) -> int:
        return sum(math.prod(self.shape(k)) * _itemsize(self.dtype(k)) for k in self.keys())

    # safetensors-handle compatibility
    def get_tensor(self, name: str) -> torch.Tensor:
        return self.get(name)

    def get_slice(self, name: str) -> _Slice:
        return _Slice(self.shape(name), self.dtype(name))

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SafetensorsReader(Reader):
    format = "safetensors"

    def __init__(self, path: Path, strip_prefix: str | None = None):
        super().__init__(path)
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
            self._handle.__enter__()
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise TwaError(f"{path}: not a readable safetensors file ({_short(exc)})") from exc
        try:
            self._names = _strip_map(list(self._handle.keys()), strip_prefix, auto=False, where=path)
        except TwaError:
            self.close()
            raise

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(self._raw(name)).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._handle.get_slice(self._raw(name)).get_dtype()
        if code not in ST_TO_TORCH:
            raise TwaError(f"{self.path}: tensor '{name}' has dtype {code}, which the tool does not handle")
        return ST_TO_TORCH[code]

    def get(self, name: str) -> torch.Tensor:
        raw = self._raw(name)
        try:
            return self._handle.get_tensor(raw)
        except Exception as exc:
            raise TwaError(f"{self.path}: cannot read tensor '{name}'; is the file truncated? ({_short(exc)})") from exc

    def read_slice(self, name: str, *index: slice) -> torch.Tensor:
        try:
            return self._handle.get_slice(self._raw(name))[index]
        except TwaError:
            raise
        except Exception as exc:
            raise TwaError(f"{self.path}: cannot read tensor '{name}'; is the file truncated? ({_short(exc)})") from exc

    def metadata(self) -> dict[str, str]:
        return dict(self._handle.metadata() or {})

    def close(self) -> None:
        self._handle.__exit__(None, None, None)

    def _raw(self, name: str) -> str:
        if name not in self._names:
            raise TwaError(f"{self.path}: has no tensor '{name}'")
        return self._names[name]


class PickleReader(Reader):
    """A `torch.save`d state dict. Loaded memory-mapped where the file allows, so only read tensors cost RAM."""

    format = "torch"

    def __init__(self, path: Path, strip_prefix: str | None = None):
        super().__init__(path)
        loaded = _torch_load(path)
        state, self.wrapper = find_state_dict(loaded, path)
        names = _strip_map(list(state), strip_prefix, auto=True, where=path)
        self._tensors = {new: state[old] for new, old in names.items()}
        self._meta = _pickle_metadata(loaded, self.wrapper)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensor(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensor(name).dtype

    def get(self, name: str) -> torch.Tensor:
        return self._tensor(name)

    def metadata(self) -> dict[str, str]:
        return dict(self._meta)

    def _tensor(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise TwaError(f"{self.path}: has no tensor '{name}'")
        return self._tensors[name]


class ShardedReader(Reader):
    """A model split over shard files named by an index (`weight_map`); each shard is opened on first use."""

    def __init__(self, index: Path, strip_prefix: str | None = None):
        super().__init__(index)
        try:
            spec = json.loads(index.read_text())
            weight_map: dict[str, str] = spec["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TwaError(f"{index}: not a shard index (a JSON object with a 'weight_map')") from exc
        self._index_meta = spec.get("metadata") or {}
        self._names = _strip_map(list(weight_map), strip_prefix, auto=False, where=index)
        self._shard_of = {new: index.parent / weight_map[old] for new, old in self._names.items()}
        self._open: dict[Path, Reader] = {}
        first = next(iter(self._shard_of.values()), None)
        self.format = "sharded" if first is None or first.suffix == SAFETENSORS else "sharded torch"
        for shard in set(self._shard_of.values()):
            if not shard.exists():
                raise TwaError(f"{index}: names shard {shard.name}, which is missing")

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shard(name).shape(self._names[name])

    def dtype(self, name: str) -> torch.dtype:
        return self._shard(name).dtype(self._names[name])

    def get(self, name: str) -> torch.Tensor:
        return self._shard(name).get(self._names[name])

    def metadata(self) -> dict[str, str]:
        # Our own writer puts the metadata in every shard's header; other tools' shards have none worth reading.
        meta: dict[str, str] = {}
        first = sorted(set(self._shard_of.values()))[:1]
        if first and first[0].suffix == SAFETENSORS:
            meta.update(self._reader(first[0]).metadata())
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in self._index_meta.items()
                     if k != "total_size"})
        return meta

    def shards(self) -> list[Path]:
        return sorted(set(self._shard_of.values()))

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()

    def _shard(self, name: str) -> Reader:
        if name not in self._shard_of:
            raise TwaError(f"{self.path}: has no tensor '{name}'")
        return self._reader(self._shard_of[name])

    def _reader(self, shard: Path) -> Reader:
        if shard not in self._open:
            # names in the index are the shard's own; prefix stripping was applied to the index
            self._open[shard] = SafetensorsReader(shard) if shard.suffix == SAFETENSORS else PickleReader(shard, "")
        return self._open[shard]


class HFFolderReader(Reader):
    """A Hugging Face checkpoint folder (`checkpoint-500/`): the model weights inside, step and epoch from
    `trainer_state.json`, metrics from its log history."""

    format = "hf-folder"

    def __init__(self, folder: Path, strip_prefix: str | None = None):
        super().__init__(folder)
        weights = hf_weights(folder)
        if weights is None:
            raise TwaError(f"{folder}: a folder, not a readable safetensors file nor a Hugging Face model folder "
                           f"(no model.safetensors, pytorch_model.bin or shard index in it)")
        self.inner = open_reader(weights, strip_prefix)
        self.format = "hf" if self.inner.format == "safetensors" else "hf " + self.inner.format

    def keys(self) -> list[str]:
        return self.inner.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(name)

    def metadata(self) -> dict[str, str]:
        meta = self.inner.metadata()
        meta.update(trainer_state_metadata(self.path))
        return meta

    def close(self) -> None:
        self.inner.close()


# ---------------------------------------------------------------------------------------------- picking


def open_reader(path: str | Path, strip_prefix: str | None = None) -> Reader:
    """The reader for what is at `path`. `strip_prefix`: None strips `module.`/`model.` from pickles when
    every key has it; a string strips exactly that prefix (from every key that has it); "" strips nothing."""
    path = Path(path)
    if not path.exists():
        raise TwaError(f"{path}: no such file or folder")
    if path.is_dir():
        return HFFolderReader(path, strip_prefix)
    name = path.name
    if name.endswith(INDEX_SUFFIX):
        return ShardedReader(path, strip_prefix)
    if name.endswith(SAFETENSORS):
        return SafetensorsReader(path, strip_prefix)
    if name.endswith(PICKLE_SUFFIXES):
        return PickleReader(path, strip_prefix)
    raise TwaError(f"{path}: not a checkpoint the tool reads (.safetensors, .pt, .pth, .bin, .ckpt, .pth.tar, "
                   f"a shard index or a Hugging Face checkpoint folder)")


@contextmanager
def reading(path: str | Path, strip_prefix: str | None = None) -> Iterator[Reader]:
    reader = open_reader(path, strip_prefix)
    try:
        yield reader
    finally:
        reader.close()


def is_checkpoint_file(path: Path) -> bool:
    name = path.name
    if name.startswith("."):
        return False
    if name.endswith(INDEX_SUFFIX):
        return name[: -len(INDEX_SUFFIX)].endswith((SAFETENSORS, ".bin"))
    return name.endswith((SAFETENSORS, *PICKLE_SUFFIXES)) and not NOT_WEIGHTS.match(name)


def hf_weights(folder: Path) -> Path | None:
    """The weights of a Hugging Face model folder, or None when it is not one."""
    for name in HF_WEIGHT_FILES:
        candidate = folder / name
        if candidate.exists():
            return candidate
    indexes = sorted(folder.glob(f"*{SAFETENSORS}{INDEX_SUFFIX}")) + sorted(folder.glob(f"*.bin{INDEX_SUFFIX}"))
    return indexes[0] if indexes else None


def checkpoint_paths(folder: Path) -> list[Path]:
    """The checkpoints directly in a folder: weight files and shard indexes (not the shards they name), and
    subfolders that are Hugging Face checkpoints. A folder that is itself one model is returned alone."""
    entries = sorted(folder.iterdir())
    indexes = [p for p in entries if p.is_file() and p.name.endswith(INDEX_SUFFIX) and is_checkpoint_file(p)]
    shard_files: set[Path] = set()
    for index in indexes:
        try:
            shard_files |= {folder / s for s in json.loads(index.read_text()).get("weight_map", {}).values()}
        except (OSError, ValueError, AttributeError) as exc:
            raise TwaError(f"{index}: not a shard index ({exc})") from exc
    files = [p for p in entries if p.is_file() and is_checkpoint_file(p) and p not in shard_files]
    subfolders = [p for p in entries if p.is_dir() and hf_weights(p) is not None]
    if not subfolders and hf_weights(folder) is not None and _one_model(files):
        return [folder]
    return files + subfolders


def checkpoint_files(path: Path) -> list[Path]:
    """The files that make up a checkpoint: itself, an index and its shards, or a folder's weights."""
    if path.is_dir():
        weights = hf_weights(path)
        if weights is None:
            raise TwaError(f"{path}: no model weights in this folder")
        return checkpoint_files(weights)
    if path.name.endswith(INDEX_SUFFIX):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TwaError(f"{path}: not a shard index ({_short(exc)})") from exc
        return [path, *(path.parent / s for s in shards)]
    return [path]


def _one_model(files: list[Path]) -> bool:
    """A Hugging Face model folder holds one set of weights (model.safetensors or an index)."""
    weights = [p for p in files if p.name.endswith((SAFETENSORS, INDEX_SUFFIX, ".bin"))]
    return len(weights) <= 1


# ---------------------------------------------------------------------------------------------- pickles


def _torch_load(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's notes on pickle protocols; the errors matter
        return _torch_load_checked(path)


def _torch_load_checked(path: Path) -> Any:
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)  # the pre-1.6 format, no mmap
    except pickle.UnpicklingError as exc:
        raise TwaError(
            f"{path}: holds pickled Python objects beyond tensors, which the tool does not load (it would run "
            f"code from the file); re-save it with torch.save(model.state_dict(), ...) or as safetensors"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise TwaError(f"{path}: not a readable PyTorch checkpoint ({_short(exc)})") from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def find_state_dict(loaded: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict inside a loaded checkpoint, and the wrapper key it was under (None: the top level)."""
    if _is_state_dict(loaded):
        return dict(loaded), None
    if isinstance(loaded, Mapping):
        for key in WRAPPER_KEYS:
            if _is_state_dict(loaded.get(key)):
                return dict(loaded[key]), key
        tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(loaded) // 2:
            return tensors, None  # a state dict with a few scalars mixed in
        inner = [k for k, v in loaded.items() if isinstance(v, Mapping)]
        raise TwaError(f"{path}: found no state dict (looked under {', '.join(WRAPPER_KEYS)}; the file has "
                       f"{', '.join(map(str, inner)) or 'no dictionaries'})")
    raise TwaError(f"{path}: holds a {type(loaded).__name__}, not a state dict")


def _pickle_metadata(loaded: Any, wrapper: str | None) -> dict[str, str]:
    """Step, epoch and metric that timm, Lightning and plain loops save beside the weights."""
    meta: dict[str, str] = {}
    if wrapper:
        meta["wrapper"] = wrapper
    if not isinstance(loaded, Mapping):
        return meta
    for key, target in (("global_step", "step"), ("step", "step"), ("epoch", "epoch"), ("metric", "metric")):
        value = loaded.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and target not in meta:
            meta[target] = str(int(value)) if target == "step" else f"{value:.10g}"
    return meta


# ---------------------------------------------------------------------------------------------- metadata


def trainer_state_metadata(folder: Path) -> dict[str, str]:
    """Step, epoch and the metrics logged at that step, from a Hugging Face `trainer_state.json`."""
    meta: dict[str, str] = {}
    match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
    if match:
        meta["step"] = match.group(1)
    state_file = folder / "trainer_state.json"
    if not state_file.exists():
        return meta
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return meta
    if isinstance(state.get("global_step"), int):
        meta["step"] = str(state["global_step"])
    if isinstance(state.get("epoch"), (int, float)):
        meta["epoch"] = f"{state['epoch']:.10g}"
    step = int(meta["step"]) if "step" in meta else None
    metrics = {}
    for entry in state.get("log_history") or []:
        if isinstance(entry, dict) and entry.get("step") == step:
            metrics.update({k: v for k, v in entry.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")})
    if metrics:
        meta["metrics"] = json.dumps(metrics, sort_keys=True)
    return meta


# ---------------------------------------------------------------------------------------------- helpers


def _strip_map(names: list[str], prefix: str | None, *, auto: bool, where: Path) -> dict[str, str]:
    """{name without prefix: name on disk}."""
    if prefix is None:
        prefix = ""
        if auto:
            for candidate in AUTO_PREFIXES:
                if names and all(n.startswith(candidate) for n in names):
                    prefix = candidate
                    break
    if not prefix:
        return {n: n for n in names}
    out = {(n[len(prefix):] if n.startswith(prefix) else n): n for n in names}
    if len(out) != len(names):
        raise TwaError(f"{where}: stripping '{prefix}' makes two tensor names equal; choose another --strip-prefix")
    return out



def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
