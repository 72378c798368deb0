"""Readers for the checkpoints other tools write, behind one lazy interface.

What is on disk picks the reader: a `.safetensors` file; a sharded checkpoint (`*.index.json` naming its
shards, each opened only when one of its tensors is asked for); a Hugging Face checkpoint folder
(`checkpoint-500/` holding `model.safetensors`, a sharded safetensors model, or `pytorch_model.bin`); a
pickled state dict (`.pt`, `.pth`, `.bin`, `.ckpt`, `.pth.tar`) loaded with `torch.load(weights_only=True)`,
which never runs pickled code (the one class allowed beyond tensors and containers is `argparse.Namespace`,
which timm's `train.py` saves as `args`, as timm's own loader allows). Pickles are unwrapped (`state_dict`,
`model`, `model_state_dict`, ...) and a prefix shared by every key (`module.` from DistributedDataParallel,
`model.` from Lightning) is stripped, so the keys match the bare model.

Training tools that keep a running average beside the weights (timm's `state_dict_ema`, Lightning's
`WeightAveraging`, whose `state_dict` is the average and `current_model_state` the raw weights) are read as
the raw weights, the trajectory TWA averages, unless `ReadOptions.ema` asks for the tool's average.

A reader answers `keys()`, `shape(name)`, `dtype(name)`, `get(name)` and `metadata()`.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from twa_cli.errors import TwaError
from twa_cli.units import CODE_TO_NAME, first_line, itemsize

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar")
SAFETENSORS = ".safetensors"
INDEX_SUFFIX = ".index.json"
AUTO_PREFIXES = ("module.", "model.", "_orig_mod.")
# Files in a training folder that hold no model weights.
NOT_WEIGHTS = re.compile(r"^(optimizer|scheduler|scaler|training_args|rng_state.*)\.(pt|pth|bin)$")
# Full models first; a PEFT checkpoint holds only its adapter, which is averaged like any other weights.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
SHARD = re.compile(r"^(.*)-\d{5}-of-\d{5}(\.[0-9a-f]{8})?\.(safetensors|bin)$")
# Classes a pickled checkpoint may hold beyond tensors and plain containers (timm train.py's `args`).
SAFE_CLASSES = (argparse.Namespace,)


@dataclass(frozen=True)
class ReadOptions:
    """How to read a checkpoint's tensors: the name prefix to strip (None: `module.`/`model.` when every key
    of a pickle has it; "" strips nothing) and whether to take a training tool's running average (EMA) of the
    weights instead of the raw weights."""

    strip_prefix: str | None = None
    ema: bool = False
    add_prefix: str = ""  # put before every name after stripping: a file averaged without a module's prefix


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
        return sum(math.prod(self.shape(k)) * itemsize(self.dtype(k)) for k in self.keys())

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SafetensorsReader(Reader):
    format = "safetensors"

    def __init__(self, path: Path, options: ReadOptions = ReadOptions()):
        super().__init__(path)
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
            self._handle.__enter__()
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise TwaError(f"{path}: not a readable safetensors file ({first_line(exc)})") from exc
        try:
            self._names = strip_map(list(self._handle.keys()), options, auto=False, where=path)
        except TwaError:
            self.close()
            raise

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(self._raw(name)).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._handle.get_slice(self._raw(name)).get_dtype()
        if code not in CODE_TO_NAME:
            raise TwaError(f"{self.path}: tensor '{name}' has dtype {code}, which the tool does not handle")
        return getattr(torch, CODE_TO_NAME[code])

    def get(self, name: str) -> torch.Tensor:
        raw = self._raw(name)
        try:
            return self._handle.get_tensor(raw)
        except Exception as exc:
            raise self._damaged(name, exc) from exc

    def read_slice(self, name: str, *index: slice) -> torch.Tensor:
        raw = self._raw(name)
        try:
            return self._handle.get_slice(raw)[index]
        except Exception as exc:
            raise self._damaged(name, exc) from exc

    def _damaged(self, name: str, exc: Exception) -> TwaError:
        return TwaError(f"{self.path}: cannot read tensor '{name}'; is the file truncated? ({first_line(exc)})")

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

    def __init__(self, path: Path, options: ReadOptions = ReadOptions()):
        super().__init__(path)
        loaded = torch_load(path)
        state, self.wrapper = find_state_dict(loaded, path, options.ema)
        names = strip_map(list(state), options, auto=True, where=path)
        self._tensors = {new: state[old] for new, old in names.items()}
        self._meta = _pickle_metadata(loaded, self.wrapper)
        averaged = _averaged_by(loaded, state)
        if averaged is not None:
            self._meta["averaged"] = averaged

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

    def __init__(self, index: Path, options: ReadOptions = ReadOptions()):
        super().__init__(index)
        spec = read_index(index)
        weight_map: dict[str, str] = spec["weight_map"]
        self._index_meta = spec.get("metadata") if isinstance(spec.get("metadata"), dict) else {}
        self._names = strip_map(list(weight_map), options, auto=False, where=index)
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

    def read_slice(self, name: str, *index: slice) -> torch.Tensor:
        return self._shard(name).read_slice(self._names[name], *index)

    def metadata(self) -> dict[str, str]:
        # Our own writer puts the metadata in every shard's header; other tools' shards have none worth reading.
        meta: dict[str, str] = {}
        first = sorted(set(self._shard_of.values()))[:1]
        if first and first[0].suffix == SAFETENSORS:
            meta.update(self._reader(first[0]).metadata())
        meta.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in self._index_meta.items()
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
            plain = ReadOptions(strip_prefix="")
            reader = SafetensorsReader if shard.suffix == SAFETENSORS else PickleReader
            self._open[shard] = reader(shard, plain)
        return self._open[shard]


class HFFolderReader(Reader):
    """A Hugging Face checkpoint folder (`checkpoint-500/`): the model weights inside, step and epoch from
    `trainer_state.json`, metrics from its log history."""

    format = "hf-folder"

    def __init__(self, folder: Path, options: ReadOptions = ReadOptions()):
        super().__init__(folder)
        weights = hf_weights(folder)
        if weights is None:
            raise TwaError(f"{folder}: a folder, not a readable safetensors file nor a Hugging Face model folder "
                           f"(no model.safetensors, pytorch_model.bin or shard index in it)")
        self.inner = open_reader(weights, options)
        self.format = "hf" if self.inner.format == "safetensors" else "hf " + self.inner.format

    def keys(self) -> list[str]:
        return self.inner.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(name)

    def read_slice(self, name: str, *index: slice) -> torch.Tensor:
        return self.inner.read_slice(name, *index)

    def metadata(self) -> dict[str, str]:
        meta = self.inner.metadata()
        meta.update(trainer_state_metadata(self.path))
        return meta

    def close(self) -> None:
        self.inner.close()


# ---------------------------------------------------------------------------------------------- picking


def as_written(path: str | Path) -> Path:
    """The checkpoint a user names by the `-o` it was written to: `NAME.safetensors`, which the writer shards
    into `NAME.safetensors.index.json` and its shards when it is large, is that index when only it exists."""
    path = Path(path)
    index = path.with_name(path.name + INDEX_SUFFIX)
    if path.name.endswith(SAFETENSORS) and not path.exists() and index.is_file():
        return index
    return path


def open_reader(path: str | Path, options: ReadOptions = ReadOptions()) -> Reader:
    """The reader for what is at `path`. Files are recognized by their name, and a file without a known
    suffix by its content (a safetensors header), so every file the tool writes reads back."""
    path = as_written(path)
    if not path.exists():
        raise TwaError(f"{path}: no such file or folder")
    if path.is_dir():
        return HFFolderReader(path, options)
    name = path.name
    if name.endswith(INDEX_SUFFIX):
        return ShardedReader(path, options)
    if name.endswith(SAFETENSORS) or looks_like_safetensors(path):
        return SafetensorsReader(path, options)
    if name.endswith(PICKLE_SUFFIXES):
        return PickleReader(path, options)
    raise TwaError(f"{path}: not a checkpoint the tool reads (.safetensors, .pt, .pth, .bin, .ckpt, .pth.tar, "
                   f"a shard index or a Hugging Face checkpoint folder)")


def looks_like_safetensors(path: Path) -> bool:
    """Whether a file starts as a safetensors file does: a header length, then a JSON object."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= path.stat().st_size - 8


@contextmanager
def reading(path: str | Path, options: ReadOptions = ReadOptions()) -> Iterator[Reader]:
    reader = open_reader(path, options)
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


def read_index(index: Path) -> dict[str, Any]:
    """A shard index, checked: a `weight_map` of tensor names to files in the index's own folder."""
    try:
        spec = json.loads(index.read_text())
        weight_map = spec["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TwaError(f"{index}: not a shard index (a JSON object with a 'weight_map')") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise TwaError(f"{index}: its 'weight_map' is not a mapping of tensor names to file names")
    for file in set(weight_map.values()):
        shard_beside(index, file)
    return spec


def shard_beside(index: Path, name: str) -> Path:
    """The file `name` an index names as one of its shards, checked to lie in the index's own folder: a plain
    name, and, symlinks resolved, a file of that folder or of the folder the index itself resolves to (the
    Hugging Face cache links both into one blobs/ folder). A link there to a file elsewhere is refused."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise TwaError(f"{index}: names shard '{name}', which is not a file in the index's own folder")
    path = index.parent / name
    home = {index.parent.resolve(), index.resolve().parent}
    if path.is_symlink() and path.resolve().parent not in home:
        raise TwaError(f"{index}: its shard {name} is a link to {path.resolve()}, outside the index's own folder")
    return path


def shard_files(index: Path) -> list[Path]:
    return [index.parent / s for s in sorted(set(read_index(index)["weight_map"].values()))]


def checkpoint_paths(folder: Path, *, regular_only: bool = True) -> list[Path]:
    """The checkpoints directly in a folder: weight files and shard indexes, and subfolders that are Hugging Face
    checkpoints. A shard is never a checkpoint on its own (it is read through its index), and `NAME.safetensors`
    beside `NAME.safetensors.index.json` is superseded by the index (the writer's order keeps the index current).
    A folder that is itself one model is returned alone. An entry named like a checkpoint that is not a regular
    file (a FIFO, socket or device) is refused, or with `regular_only=False` listed for the caller to judge."""
    entries = sorted(folder.iterdir())
    odd = [p for p in entries if p.exists() and not p.is_file() and not p.is_dir() and is_checkpoint_file(p)]
    if odd and regular_only:  # a FIFO, socket or device: reading it could block forever
        raise TwaError(f"{odd[0]}: is not a regular file (a FIFO, socket or device named like a checkpoint); move it "
                       "out of the folder")
    indexes = [p for p in entries if p.is_file() and p.name.endswith(INDEX_SUFFIX) and is_checkpoint_file(p)]
    superseded = {p.with_name(p.name[: -len(INDEX_SUFFIX)]) for p in indexes}
    files = [p for p in entries if (p.is_file() or p in odd) and is_checkpoint_file(p) and not SHARD.match(p.name)
             and p not in superseded]
    subfolders = [p for p in entries if p.is_dir() and not p.name.startswith(".") and hf_weights(p) is not None]
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
        return [path, *shard_files(path)]
    return [path]


def _one_model(files: list[Path]) -> bool:
    """A Hugging Face model folder holds one set of weights (model.safetensors or an index)."""
    weights = [p for p in files if p.name.endswith((SAFETENSORS, INDEX_SUFFIX, ".bin"))]
    return len(weights) <= 1


# ---------------------------------------------------------------------------------------------- pickles


def torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)` with `argparse.Namespace` allowed; every failure is one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's notes on pickle protocols; the errors matter
        with torch.serialization.safe_globals(list(SAFE_CLASSES)):
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
        if "Weights only load failed" not in str(exc) and "Unsupported global" not in str(exc):
            raise TwaError(f"{path}: not a readable PyTorch checkpoint ({first_line(exc)})") from exc
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise TwaError(
            f"{path}: holds pickled Python objects beyond tensors{what}, which the tool does not load (it would run "
            f"code from the file); re-save it with torch.save(model.state_dict(), ...) or as safetensors"
        ) from exc
    except Exception as exc:  # text, truncation, a damaged zip: torch raises many types for them
        raise TwaError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {first_line(exc)})") from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


# Where the weights are, in the order tried: the raw weights of a run first (the trajectory), then a training
# tool's running average. Lightning's WeightAveraging keeps the raw weights under `current_model_state` and
# its average under `state_dict`, so there `state_dict` is the average.
RAW_KEYS = ("current_model_state", "state_dict", "model_state_dict", "model", "module", "net")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")


def find_state_dict(loaded: Any, path: Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict inside a loaded checkpoint, and the wrapper key it was under (None: the top level)."""
    if _is_state_dict(loaded):
        return dict(loaded), None
    if not isinstance(loaded, Mapping):
        raise TwaError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    averaged_by_lightning = _is_state_dict(loaded.get("current_model_state"))
    if ema:
        keys = ("state_dict", *EMA_KEYS) if averaged_by_lightning else EMA_KEYS
        for key in keys:
            if _is_state_dict(loaded.get(key)):
                return dict(loaded[key]), key
        raise TwaError(f"{path}: --ema: the checkpoint holds no averaged (EMA) weights "
                       f"(looked under {', '.join(EMA_KEYS)}); read it without --ema")
    for key in (*RAW_KEYS, *EMA_KEYS):  # EMA weights only when the raw ones are absent
        if _is_state_dict(loaded.get(key)):
            return dict(loaded[key]), key
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if tensors and len(tensors) >= len(loaded) // 2:
        return tensors, None  # a state dict with a few scalars mixed in
    inner = [k for k, v in loaded.items() if isinstance(v, Mapping)]
    raise TwaError(f"{path}: found no state dict (looked under {', '.join(RAW_KEYS + EMA_KEYS)}; the file has "
                   f"{', '.join(map(str, inner)) or 'no dictionaries'})")


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
    if isinstance(loaded.get("arch"), str):
        meta["timm_arch"] = loaded["arch"]
    callbacks = loaded.get("callbacks")
    if isinstance(callbacks, Mapping) and any("StochasticWeightAveraging" in str(k) for k in callbacks):
        meta["lightning_swa"] = "1"
    if isinstance(loaded.get("current_model_state"), Mapping):
        meta["averaged_beside"] = "current_model_state"
    hparams = loaded.get("hyper_parameters")
    if isinstance(hparams, Mapping):  # Lightning's: what the module was built with (plain values only)
        plain = {str(k): v for k, v in hparams.items() if isinstance(v, (str, int, float, bool, type(None)))}
        meta["hparams"] = json.dumps(plain, sort_keys=True)
    return meta


def _averaged_by(loaded: Any, state: Mapping[str, torch.Tensor]) -> str | None:
    """Which tool averaged these weights, when the file is itself an average: the model Lightning's
    StochasticWeightAveraging leaves after its last epoch (its weights are the callback's average), or a
    torch.optim.swa_utils.AveragedModel's state dict (it counts `n_averaged`)."""
    if "n_averaged" in state or "module.n_averaged" in state:
        count = state.get("n_averaged", state.get("module.n_averaged"))
        return f"torch.optim.swa_utils.AveragedModel (n_averaged={int(count)})"
    callbacks = loaded.get("callbacks") if isinstance(loaded, Mapping) else None
    if not isinstance(callbacks, Mapping):
        return None
    swa = next((v for k, v in callbacks.items() if "StochasticWeightAveraging" in str(k)), None)
    average = swa.get("average_model_state") if isinstance(swa, Mapping) else None
    if not isinstance(average, Mapping):
        return None
    weights = [k for k, v in average.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
               and "running_" not in k and k in state]
    if weights and all(torch.equal(state[k], average[k]) for k in weights):
        return f"Lightning StochasticWeightAveraging (n_averaged={int(swa.get('n_averaged', 0))})"
    return None


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
    if not isinstance(state, dict):
        return meta
    if isinstance(state.get("global_step"), int):
        meta["step"] = str(state["global_step"])
    if isinstance(state.get("epoch"), (int, float)):
        meta["epoch"] = f"{state['epoch']:.10g}"
    step = int(meta["step"]) if "step" in meta else None
    metrics = {}
    for entry in state.get("log_history") or []:
        if isinstance(entry, dict) and entry.get("step") == step:
            metrics.update({k: v for k, v in entry.items()
                            if isinstance(v, (int, float)) and k not in ("step", "epoch")})
    if metrics:
        meta["metrics"] = json.dumps(metrics, sort_keys=True)
    return meta


# ---------------------------------------------------------------------------------------------- helpers


def strip_map(names: list[str], options: ReadOptions, *, auto: bool, where: Path) -> dict[str, str]:
    """{name as read (prefix stripped, then options.add_prefix put before it): name on disk}."""
    out = _stripped(names, options.strip_prefix, auto=auto, where=where)
    return {options.add_prefix + k: v for k, v in out.items()} if options.add_prefix else out


def _stripped(names: list[str], prefix: str | None, *, auto: bool, where: Path) -> dict[str, str]:
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
