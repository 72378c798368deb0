"""Checkpoints: the one place that says what a weight file is, where it came from, and what it records.

A checkpoint the tool writes is a `.safetensors` file holding a whole state_dict, with `__metadata__` saying
what made it (see `make_metadata`). Checkpoints other tools wrote (Hugging Face folders, sharded models,
pickled state dicts) are read through `twa_cli.io.readers`, so every command takes them as they are. A
folder is ordered by step (natural filename order when a checkpoint has none).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from twa_cli.errors import TwaError
from twa_cli.io import readers
from twa_cli.io.readers import ReadOptions
from twa_cli.units import dtype_name

log = logging.getLogger("twa")

TWA_TAG = "twa/1"
# The metadata fields that say which task made a file (JSON objects: see twa_cli.tasks.resolve), carried from the
# checkpoints to a basis and to the results made from them.
TASK_FIELDS = ("arch", "data", "task", "hf")
# Kinds of file the tool writes that are not checkpoints (folder listings skip them).
OTHER_KINDS = ("basis", "train-state")


@dataclass(frozen=True)
class Checkpoint:
    """One weight file (or folder, or shard index) and what its metadata says about it."""

    path: Path
    meta: Mapping[str, str] = field(default_factory=dict)
    format: str = "safetensors"
    options: ReadOptions = field(default_factory=ReadOptions)
    # Read with the header, so that checking a selection does not open every file again: each tensor's shape
    # and dtype, and (for a folder's listing) a hash of the small tensors, to find copies.
    specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = field(default=None, compare=False, repr=False)
    small_hash: str | None = field(default=None, compare=False, repr=False)

    def open(self) -> readers.Reader:
        """A lazy reader of the tensors (use it in a `with` block)."""
        return readers.open_reader(self.path, self.options)

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
        """The architecture the metadata describes (a registry name; never trusted to name code)."""
        return self.json_field("arch", dict)

    @property
    def data(self) -> dict[str, Any] | None:
        return self.json_field("data", dict)

    @property
    def trainable(self) -> list[str] | None:
        names = self.json_field("trainable", list)
        if names is not None and not all(isinstance(n, str) for n in names):
            raise TwaError(f"{self.path}: metadata field 'trainable' is not a list of tensor names")
        return names

    def task_fields(self) -> dict[str, Any]:
        """What the metadata says about the task that made the file (`TASK_FIELDS`, those present)."""
        return {key: self.json_field(key, dict) for key in TASK_FIELDS if key in self.meta}

    def json_field(self, key: str, kind: type | None = None) -> Any:
        raw = self.meta.get(key)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TwaError(f"{self.path}: metadata field '{key}' is not valid JSON ({exc.msg})") from exc
        if kind is not None and not isinstance(value, kind):
            raise TwaError(f"{self.path}: metadata field '{key}' is not a JSON {kind.__name__}")
        return value


def _number_field(ckpt: Checkpoint, key: str, kind: type) -> Any:
    raw = ckpt.meta.get(key)
    if raw is None:
        return None
    try:
        return kind(raw)
    except ValueError as exc:
        raise TwaError(f"{ckpt.path}: metadata field '{key}' is not a number ({raw!r})") from exc


def make_metadata(kind: str, *, invocation: Mapping[str, Any] | None = None, **fields: Any) -> dict[str, str]:
    """Metadata for a file the tool writes: strings stay strings, everything else becomes JSON. `format` is
    `pt` (what `transformers` checks), the tool's tag is `twa`; `invocation` records the command and its
    resolved options, for `--config-from`."""
    meta = {"format": "pt", "twa": TWA_TAG, "kind": kind}
    if invocation is not None:
        fields["invocation"] = dict(invocation)
    for key, value in fields.items():
        if value is None:
            continue
        meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return meta


@dataclass(frozen=True)
class Source:
    """A checkpoint an average or a basis was made of, as every file the tool writes records it."""

    path: str
    step: int | None = None
    epoch: float | None = None
    sha256: str | None = None

    @staticmethod
    def of(ckpt: Checkpoint, with_hash: bool = True) -> Source:
        """The checkpoint as a source, its files hashed in a pass of their own (see `twa_cli.io.through` for a
        hash taken while the tensors are read)."""
        return Source.hashed(ckpt, sha256_file(ckpt.path) if with_hash else None)

    @staticmethod
    def hashed(ckpt: Checkpoint, sha256: str | None) -> Source:
        return Source(str(ckpt.path.resolve()), ckpt.step, ckpt.epoch, sha256)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "step": self.step, "epoch": self.epoch, "sha256": self.sha256}

    @staticmethod
    def from_json(value: Any) -> Source:
        """A source as recorded: a dict (basis files), or a path string (results of version 0.1)."""
        if isinstance(value, str):
            return Source(value)
        if isinstance(value, Mapping) and isinstance(value.get("path"), str):
            step, epoch = value.get("step"), value.get("epoch")
            return Source(value["path"], int(step) if isinstance(step, (int, float)) else None,
                          float(epoch) if isinstance(epoch, (int, float)) else None,
                          value.get("sha256") if isinstance(value.get("sha256"), str) else None)
        raise TwaError(f"not a recorded source checkpoint: {value!r}")


def sources_of(ckpt: Checkpoint) -> list[Source]:
    try:
        return [Source.from_json(s) for s in ckpt.json_field("sources", list) or []]
    except TwaError as exc:
        raise TwaError(f"{ckpt.path}: its 'sources' metadata is damaged ({exc})") from exc


# ---------------------------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path, options: ReadOptions = ReadOptions(), *,
                    fingerprint: bool = False) -> Checkpoint:
    """Open a checkpoint's header (not its tensors), in any format the readers know, with its metadata and
    its tensors' shapes and dtypes; with `fingerprint`, also hash its small tensors (`_fold_copies`)."""
    path = readers.as_written(path)
    if not path.exists():
        raise TwaError(f"{path}: no such file")
    with readers.reading(path, options) as reader:
        meta = reader.metadata()
        try:
            specs = _specs(reader)
            small = _tensor_hash(reader, small_only=True) if fingerprint else None
        except TwaError:  # a damaged tensor is reported where the tensors are read, as for any other file
            specs, small = None, None
        return Checkpoint(path, meta, reader.format, options, specs, small)


@contextmanager
def open_tensors(ckpt: Checkpoint | str | Path) -> Iterator[readers.Reader]:
    """A lazy view of a checkpoint's tensors, whatever its format."""
    reader = ckpt.open() if isinstance(ckpt, Checkpoint) else readers.open_reader(ckpt)
    try:
        yield reader
    finally:
        reader.close()


def load_tensors(ckpt: Checkpoint | str | Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint (all, or the given names), checked to be finite."""
    where = ckpt.path if isinstance(ckpt, Checkpoint) else Path(ckpt)
    with open_tensors(ckpt) as handle:
        available = set(handle.keys())
        keys = list(handle.keys()) if names is None else list(names)
        missing = [k for k in keys if k not in available]
        if missing:
            raise TwaError(f"{where}: has no tensor '{missing[0]}'")
        tensors = {k: handle.get(k) for k in keys}
    for name, tensor in tensors.items():
        check_finite(tensor, f"{where}: tensor '{name}'")
    return tensors


class NotFinite(TwaError):
    """A tensor read from a file holds NaN or Inf."""


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NotFinite(f"{what} contains NaN or Inf")


def to_storage_dtype(tensor: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """`tensor` in `dtype` (a floating one; any other as it is), refused when its finite values do not fit: a
    result is never written with Inf where what it was made of was finite. `what` names the tensor."""
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    out = tensor.to(dtype)
    if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(tensor).all()):
        largest = float(tensor.abs().max())
        raise TwaError(f"{what} has values up to {largest:.4g}, beyond the range of {dtype_name(dtype)} "
                       f"(±{torch.finfo(dtype).max:.4g}); write it as float32 or bfloat16 (--dtype)")
    return out


def tensor_specs(ckpt: Checkpoint) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor's shape and dtype, from the header (as read with the metadata, else read now)."""
    if ckpt.specs is not None:
        return dict(ckpt.specs)
    with open_tensors(ckpt) as handle:
        return _specs(handle)


def _specs(reader: readers.Reader) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(reader.shape(k)), reader.dtype(k)) for k in reader.keys()}


def natural_key(name: str) -> list[Any]:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


@dataclass
class Listing:
    """A folder's checkpoints, and what was not counted as one: aliases folded into the checkpoint they copy
    (alias, kept, why), and models that are themselves averages, left out (path, why)."""

    checkpoints: list[Checkpoint]
    folded: list[tuple[Path, Path, str]] = field(default_factory=list)
    left_out: list[tuple[Path, str]] = field(default_factory=list)

    def notes(self) -> list[str]:
        return ([f"{alias.name}: the same checkpoint as {kept.name} ({why}); counted once" for alias, kept, why in
                 self.folded]
                + [f"{path.name}: left out, it is itself an average ({why})" for path, why in self.left_out])


# Names under which training tools save a second copy of a checkpoint (timm, fairseq, Lightning).
ALIAS = re.compile(r"^(last|best|model_best|checkpoint_best|checkpoint_last|checkpoint\.best_.*)(-v\d+)?"
                   r"\.(ckpt|pth\.tar|pt|pth|bin|safetensors)$")


def list_folder(folder: str | Path, options: ReadOptions = ReadOptions()) -> list[Checkpoint]:
    """The checkpoints in a folder, in training order (by step, else natural filename order); what was folded
    or left out is logged (`scan_folder` says it in full)."""
    listing = scan_folder(folder, options)
    for alias, kept, why in listing.folded:
        log.info("%s: the same checkpoint as %s (%s); counted once", alias.name, kept.name, why)
    for path, why in listing.left_out:
        log.warning("%s: left out, it is itself an average (%s)", path.name, why)
    if any("averaged_beside" in c.meta for c in listing.checkpoints) and not options.ema:
        log.info("reading the raw weights of the run (`current_model_state`) where Lightning's WeightAveraging "
                 "also saved its average; --ema reads the averages")
    return listing.checkpoints


def scan_folder(folder: str | Path, options: ReadOptions = ReadOptions()) -> Listing:
    """The checkpoints in a folder, in training order.

    A folder holds weight files of any format the readers know, or Hugging Face `checkpoint-*` subfolders
    (then the final model saved beside them, a copy of one of them, is left out); a single file, shard
    index or Hugging Face model folder is a list of one. A file that is the same checkpoint as another (a hard
    link, or the same tensors: timm's last and model_best, Lightning's last.ckpt, fairseq's checkpoint_last)
    counts once; a model that is itself an average (an output of this tool, Lightning's SWA model, a
    torch AveragedModel) is left out."""
    folder = readers.as_written(folder)
    if not folder.exists():
        raise TwaError(f"{folder}: no such file or folder")
    if folder.is_file():
        return Listing([read_checkpoint(folder, options)])
    paths = readers.checkpoint_paths(folder)
    if any(p.is_dir() for p in paths) and paths != [folder]:
        paths = [p for p in paths if p.is_dir() or not is_hf_final_model(p)]
    paths.sort(key=lambda p: (bool(ALIAS.match(p.name)), natural_key(p.name)))  # originals before aliases
    ckpts = [c for c in (read_checkpoint(p, options, fingerprint=paths != [folder]) for p in paths)
             if c.kind not in OTHER_KINDS]
    listing = Listing([])
    if paths != [folder]:
        for ckpt in ckpts:
            why = _an_average(ckpt)
            if why is None:
                listing.checkpoints.append(ckpt)
            else:
                listing.left_out.append((ckpt.path, why))
        listing.folded = _fold_copies(listing.checkpoints)
        folded = {alias for alias, _, _ in listing.folded}
        listing.checkpoints = [c for c in listing.checkpoints if c.path not in folded]
    else:
        listing.checkpoints = ckpts
    if not listing.checkpoints:
        if listing.left_out:
            raise TwaError(f"{folder}: holds only averages ({listing.left_out[0][0].name}: {listing.left_out[0][1]}); "
                           "pass the file itself to use it")
        raise TwaError(f"{folder}: no .safetensors checkpoints in this folder (nor .pt, .pth, .bin, .ckpt, .pth.tar "
                       f"files or Hugging Face checkpoint-* folders)")
    if all(c.step is not None for c in listing.checkpoints):
        listing.checkpoints.sort(key=lambda c: c.step)  # stable: equal steps keep filename order
    else:
        listing.checkpoints.sort(key=lambda c: natural_key(c.path.name))
    return listing


def _an_average(ckpt: Checkpoint) -> str | None:
    if ckpt.kind in ("average", "twa"):
        return f"written by `twa {ckpt.meta.get('command', ckpt.kind)}`"
    return ckpt.meta.get("averaged")


def _fold_copies(ckpts: list[Checkpoint]) -> list[tuple[Path, Path, str]]:
    """(alias, kept, why) for every checkpoint that is the same as an earlier one: the same file, else the same
    tensors (compared by a hash of the small tensors first, then of all of them)."""
    folded: list[tuple[Path, Path, str]] = []
    by_file: dict[tuple[int, int], Checkpoint] = {}
    rest = []
    for ckpt in ckpts:
        stat = readers.checkpoint_files(ckpt.path)[-1].stat()
        key = (stat.st_dev, stat.st_ino)
        if key in by_file:
            folded.append((ckpt.path, by_file[key].path, "a hard link to the same file"))
        else:
            by_file[key] = ckpt
            rest.append(ckpt)
    groups: dict[Any, list[Checkpoint]] = {}
    for ckpt in rest:
        specs = tensor_specs(ckpt)
        groups.setdefault(tuple(sorted((k, s, str(d)) for k, (s, d) in specs.items())), []).append(ckpt)
    for group in (g for g in groups.values() if len(g) > 1):
        seen: dict[str, Checkpoint] = {}
        for ckpt in group:
            quick = ckpt.small_hash or _hash_of(ckpt, small_only=True)
            twin = seen.get(quick)
            if twin is not None and _hash_of(twin, small_only=False) == _hash_of(ckpt, small_only=False):
                folded.append((ckpt.path, twin.path, "identical tensors"))
            else:
                seen.setdefault(quick, ckpt)
    return folded


SMALL_TENSOR = 1 << 16


def _hash_of(ckpt: Checkpoint, small_only: bool) -> str:
    with open_tensors(ckpt) as handle:
        return _tensor_hash(handle, small_only)


def _tensor_hash(handle: readers.Reader, small_only: bool) -> str:
    """A hash of a checkpoint's tensors (names and bytes): of the small ones (biases, norms: a cheap first test
    that two checkpoints may be equal), or of all."""
    digest = hashlib.sha256()
    keys = sorted(handle.keys())
    if small_only:
        keys = [k for k in keys if math.prod(handle.shape(k)) <= SMALL_TENSOR] or keys[:1]
    for key in keys:
        tensor = handle.get(key).contiguous()
        digest.update(key.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def is_hf_final_model(path: Path) -> bool:
    return path.name in readers.HF_WEIGHT_FILES or bool(readers.SHARD.match(path.name))


@dataclass
class Layout:
    """The tensors every checkpoint of a selection shares: shapes, and the dtypes seen for each tensor."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, list[torch.dtype]]

    @property
    def widest(self) -> dict[str, torch.dtype]:
        """Each tensor's widest precision among the checkpoints (the dtype an average of them is written in)."""
        out = {}
        for name, dtypes in self.dtypes.items():
            widest = dtypes[0]
            for d in dtypes[1:]:
                widest = torch.promote_types(widest, d)
            out[name] = widest
        return out

    @property
    def mixed(self) -> dict[str, list[str]]:
        """Tensors stored in more than one floating precision across the checkpoints."""
        return {k: [dtype_name(d) for d in v] for k, v in self.dtypes.items() if len(set(v)) > 1}


def no_floating_tensor(ckpt: Checkpoint, layout: Layout) -> str:
    """The message for checkpoints holding only integer tensors (nothing to average, nothing spans a subspace)."""
    some = ", ".join(f"'{name}'" for name in list(layout.shapes)[:3])
    return f"{ckpt.path}: holds no floating-point tensor (only integer ones: {some}); there is nothing to average"


def check_compatible(ckpts: list[Checkpoint]) -> Layout:
    """Every checkpoint has the same tensor names and shapes as the first, and each tensor is floating in all
    of them or in none; returns the shared layout."""
    reference = tensor_specs(ckpts[0])
    layout = Layout({k: s for k, (s, _) in reference.items()}, {k: [d] for k, (_, d) in reference.items()})
    for ckpt in ckpts[1:]:
        specs = tensor_specs(ckpt)
        for key in sorted(set(reference) | set(specs)):
            if key not in specs or key not in reference:
                has, lacks = (ckpts[0].path, ckpt.path) if key in reference else (ckpt.path, ckpts[0].path)
                raise TwaError(f"checkpoints differ: '{key}' is in {has} but not in {lacks}")
            (shape, dtype), (ref_shape, ref_dtype) = specs[key], reference[key]
            if shape != ref_shape:
                raise TwaError(f"checkpoints differ: '{key}' has shape {list(ref_shape)} in {ckpts[0].path} "
                               f"but {list(shape)} in {ckpt.path}")
            if dtype.is_floating_point != ref_dtype.is_floating_point:
                raise TwaError(f"checkpoints differ: '{key}' is {dtype_name(ref_dtype)} in {ckpts[0].path} "
                               f"but {dtype_name(dtype)} in {ckpt.path}")
            if dtype not in layout.dtypes[key]:
                layout.dtypes[key].append(dtype)
    return layout


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The hash of a checkpoint's bytes; for a sharded checkpoint or a folder, of its index and shards in turn."""
    digest = hashlib.sha256()
    for part in readers.checkpoint_files(Path(path)):
        with open(part, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return digest.hexdigest()
