"""The one writer of results: a single `.safetensors` file, a sharded set beside an index, or a folder in
Hugging Face's layout with the source's configuration and tokenizer files, chosen by the output path.

`-o NAME.safetensors` is one file, or, above `max_shard_size` bytes, shards `NAME-0000k-of-0000n.safetensors`
and an index `NAME.safetensors.index.json`, as Hugging Face shards a model. Any other `-o` is a folder:
`model.safetensors` (or its shards and index) plus `config.json` and the tokenizer files of the checkpoint
it came from, so `from_pretrained(folder)` loads it. Every shard carries the metadata.

A result replaces an earlier one whole or not at all. A folder is built beside the old one and swapped in. A
sharded set is written under names the old set does not use, the index (which readers go by) is switched
last, and the old shards are removed after; a failure removes what it wrote and leaves the old result as it
was.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from twa_cli.errors import TwaError
from twa_cli.io import readers
from twa_cli.io.atomic import (
    already_written,
    parents_made,
    place_new,
    remove_stale_temps,
    reported_as,
    staged_folder,
    temp_name,
    through_link,
    write_bytes,
)
from twa_cli.io.outputs import check_not_replacing, check_output
from twa_cli.io.safetensors import save_tensors
from twa_cli.units import json_dumps

SUFFIX = ".safetensors"
HF_STEM = "model"
# Files of a Hugging Face checkpoint folder that describe the model (not its weights or training state).
MODEL_FILE_SUFFIXES = (".json", ".txt", ".model")
NOT_MODEL_FILES = ("trainer_state.json",)


def is_folder_output(path: Path) -> bool:
    """An output path not naming a .safetensors file (or its index) is a folder in Hugging Face's layout."""
    return not (path.name.endswith(SUFFIX) or path.name.endswith(SUFFIX + readers.INDEX_SUFFIX))


def result_file(path: Path) -> Path:
    """`NAME.safetensors` for `NAME.safetensors` or its index."""
    if path.name.endswith(readers.INDEX_SUFFIX):
        return path.with_name(path.name[: -len(readers.INDEX_SUFFIX)])
    return path


@dataclass(frozen=True)
class ResultTarget:
    """Where and how a result is written. `model_files`: a Hugging Face checkpoint folder whose configuration
    and tokenizer files are copied beside the weights (folder outputs only)."""

    path: Path
    max_shard_size: int | None = None
    model_files: Path | None = None

    @property
    def folder(self) -> bool:
        return is_folder_output(self.path)

    def check(self, force: bool, inputs: list[Path]) -> None:
        """Before any work: the output is not in the way of an input, nor of a result without --force, and no
        file it would replace or remove is an input."""
        if self.folder and self.path.name.endswith(readers.PICKLE_SUFFIXES):
            raise TwaError(f"{self.path}: a result is a .safetensors file or a Hugging Face folder, not a pickle; "
                           "name it NAME.safetensors (or a folder)")
        path = self.path if self.folder else result_file(self.path)
        check_output(path, force, inputs, folder=self.folder)
        if self.folder:
            _check_replaceable_folder(through_link(path), force)
            return
        if path.is_symlink():
            named = through_link(path)
            if self.max_shard_size is not None:
                raise TwaError(f"{self.path}: is a symbolic link to a file; shards and an index beside that file "
                               "would leave the link naming a removed file: write it without --max-shard-size, or "
                               "elsewhere")
            if not named.name.endswith(SUFFIX):
                raise TwaError(f"{self.path}: is a symbolic link to {named}, not a {SUFFIX} file; write the result "
                               "elsewhere")
        index = path.with_name(path.name + readers.INDEX_SUFFIX)
        check_output(index, force, inputs)
        old_index, old_shards = _existing_set(path, index)
        replaced = [p for p in (path, old_index, *old_shards) if p is not None and p.exists()]
        check_not_replacing(self.path, replaced, inputs)


def write_result(target: ResultTarget, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                 *, force: bool) -> Path:
    """Write a result as `target` says; returns the path to read it back from (a file, an index or a folder)."""
    exclusive = not force
    if target.folder:
        copied = [p.name for p in model_files(target.model_files)] if target.model_files is not None else []
        metadata = {**metadata, FOLDER_FILES: json.dumps(copied)}
        with staged_folder(target.path, exclusive=exclusive) as staging:
            write_weights(staging, HF_STEM, tensors, metadata, target.max_shard_size, exclusive=True)
            if target.model_files is not None:
                copy_model_files(target.model_files, staging)
        return target.path
    path = result_file(target.path)
    if path.is_symlink():  # the file the link names is replaced, the link stays (checked: one file, .safetensors)
        named = through_link(path)
        write_weights(named.parent, named.name[: -len(SUFFIX)], tensors, metadata, None, exclusive=exclusive)
        return path
    with parents_made(path):
        return write_weights(path.parent, path.name[: -len(SUFFIX)], tensors, metadata, target.max_shard_size,
                             exclusive=exclusive)


def write_weights(folder: Path, stem: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                  max_shard_size: int | None, *, exclusive: bool) -> Path:
    """`stem.safetensors`, or shards and `stem.safetensors.index.json`, in `folder`, replacing an earlier set of
    the same name whole. Returns the file or index to read back.

    The order makes every moment readable: an index present is the current result (folder listings skip a
    `stem.safetensors` beside it, and never list a shard on its own). A single file is written first, then the
    old index is removed, then its shards; a sharded set is written under free names (hidden until complete),
    then its index, then the old files are removed. A kill in between leaves, at worst, shards no index names:
    hidden from listings, and removed by the next write of this name (they carry a mark saying they are ours)."""
    single = folder / f"{stem}{SUFFIX}"
    index = folder / f"{stem}{SUFFIX}{readers.INDEX_SUFFIX}"
    remove_stale_temps(single, f"{glob.escape(stem)}-[0-9]*-of-[0-9]*{SUFFIX}")  # shards a kill left unnamed
    old_index, old_shards = _existing_set(single, index)
    groups = split_shards(tensors, max_shard_size) if max_shard_size is not None else [list(tensors)]
    if len(groups) == 1:
        save_tensors(single, tensors, metadata, exclusive=exclusive and old_index is None)
        _remove([old_index] if old_index else [])
        _remove(old_shards)
        return single
    names = _free_shard_names(folder, stem, len(groups))
    temps: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for i, (name, keys) in enumerate(zip(names, groups, strict=True)):
            final = folder / name
            remove_stale_temps(final)
            tmp = temp_name(final)
            temps.append((tmp, final))
            mark = {**dict(metadata), SHARD_MARK: f"{i + 1}/{len(groups)}"}
            with reported_as(final, tmp):
                save_tensors(tmp, {k: tensors[k] for k in keys}, mark, exclusive=True)
        for tmp, final in temps:
            try:
                place_new(tmp, final)  # the names were free: a name taken meanwhile fails here
            except FileExistsError as exc:
                raise already_written(single) from exc  # another writer of this output won
            placed.append(final)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {k: name for name, keys in zip(names, groups, strict=True) for k in keys}
        body = {"metadata": {"total_size": total, **dict(metadata)}, "weight_map": weight_map}
        write_bytes(index, (json_text(body)).encode(), exclusive=exclusive and not single.exists())
    except BaseException:
        _remove([tmp for tmp, _ in temps] + placed)
        raise
    _remove([single] if single.exists() else [])
    _remove([p for p in old_shards if p not in placed])
    return index


def _check_replaceable_folder(path: Path, force: bool) -> None:
    """--force replaces a folder result whole: only a model folder (`model.safetensors` or its shards and index,
    with the configuration and tokenizer files save_pretrained writes or this tool copied there), never a folder
    of checkpoints, notes or results of the user's."""
    if not (force and path.is_dir()):
        return
    present = sorted(p.name for p in path.iterdir())
    if not present:
        return
    weights = readers.hf_weights(path)
    allowed = set(KNOWN_MODEL_FILES)
    if weights is not None and weights.parent == path and weights.name.startswith(f"{HF_STEM}{SUFFIX}"):
        allowed |= {weights.name, *_recorded_files(weights)}
        if weights.name.endswith(readers.INDEX_SUFFIX):
            allowed |= {p.name for p in _existing_set(path / f"{HF_STEM}{SUFFIX}", weights)[1]}
        others = [name for name in present if name not in allowed and not name.endswith(".model")]
    else:
        others = [name for name in present if name not in allowed] or present
    if others:
        raise TwaError(f"{path}: holds {others[0]}, which is not part of a model folder; --force replaces only "
                       "a folder this tool (or save_pretrained) wrote")


# The configuration and tokenizer files save_pretrained writes beside the weights (also `*.model` SentencePiece
# files): a model folder holding only these and its weights is one --force may replace.
KNOWN_MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "preprocessor_config.json", "chat_template.jinja",
    "chat_template.json",
)
# Metadata key of a folder result: the configuration and tokenizer files this tool copied beside its weights.
FOLDER_FILES = "twa_folder_files"


def _recorded_files(weights: Path) -> list[str]:
    try:
        with readers.reading(weights) as reader:
            names = json.loads(reader.metadata().get(FOLDER_FILES, "[]"))
    except (TwaError, ValueError):
        return []
    return [n for n in names if isinstance(n, str) and Path(n).name == n] if isinstance(names, list) else []


# Metadata key marking a shard this tool wrote, so that a shard no index names (left by a kill) can be removed.
SHARD_MARK = "twa_shard"


def _existing_set(single: Path, index: Path) -> tuple[Path | None, list[Path]]:
    """An earlier sharded result of this name: its index (or None) and its shards, plus shards of this name the
    tool wrote that no index names (a kill left them). Files the tool did not write are never in the set."""
    shards: set[Path] = set()
    old_index = index if index.exists() else None
    if old_index is not None:
        try:
            shards |= set(readers.shard_files(index))
        except TwaError:
            pass  # a damaged index: only our own marked shards are found, below
    stem = single.name[: -len(SUFFIX)]
    pattern = re.compile(rf"^{re.escape(stem)}-\d{{5}}-of-\d{{5}}(\.[0-9a-f]{{8}})?{re.escape(SUFFIX)}$")
    for path in single.parent.glob(f"{stem}-*{SUFFIX}"):
        if pattern.match(path.name) and path not in shards and _marked_shard(path):
            shards.add(path)
    return old_index, sorted(shards)


def _marked_shard(path: Path) -> bool:
    try:
        with readers.reading(path) as reader:
            return SHARD_MARK in reader.metadata()
    except TwaError:
        return False


def _free_shard_names(folder: Path, stem: str, count: int) -> list[str]:
    """Hugging Face's shard names, or, where an earlier set still holds them, the same with a random infix."""
    names = [f"{stem}-{i + 1:05d}-of-{count:05d}{SUFFIX}" for i in range(count)]
    if not any((folder / n).exists() for n in names):
        return names
    tag = os.urandom(4).hex()
    return [n[: -len(SUFFIX)] + f".{tag}{SUFFIX}" for n in names]


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def json_text(obj: object) -> str:
    return json_dumps(obj, indent=2) + "\n"


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


def model_files(source: Path) -> list[Path]:
    """The configuration and tokenizer files of a Hugging Face checkpoint folder (not weights, not training
    state)."""
    if not source.is_dir():
        return []
    return [src for src in sorted(source.iterdir())
            if src.is_file() and src.suffix in MODEL_FILE_SUFFIXES and src.name not in NOT_MODEL_FILES
            and not src.name.endswith(readers.INDEX_SUFFIX)]


def copy_model_files(source: Path, folder: Path) -> list[Path]:
    """Beside weights in Hugging Face's layout, the files that let `from_pretrained(folder)` load them, in
    transformers 4.x and 5.x alike."""
    return [write_bytes(folder / src.name, _portable(src)) for src in model_files(source)
            if not (folder / src.name).exists()]


# transformers 5 names its tokenizer class `TokenizersBackend`, which 4.x does not know; both load the same
# tokenizer.json as `PreTrainedTokenizerFast`.
PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _portable(src: Path) -> bytes:
    data = src.read_bytes()
    if src.name != "tokenizer_config.json":
        return data
    try:
        config = json.loads(data)
    except ValueError:
        return data
    if isinstance(config, dict) and config.get("tokenizer_class") in PORTABLE_TOKENIZER_CLASSES:
        config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASSES[config["tokenizer_class"]]
        return json_text(config).encode()
    return data


def write_text(path: str | Path, text: str, *, exclusive: bool = False) -> Path:
    return write_bytes(Path(path), text.encode(), exclusive=exclusive)


def write_json(path: str | Path, obj: object, *, exclusive: bool = False) -> Path:
    return write_text(path, json_text(obj), exclusive=exclusive)

