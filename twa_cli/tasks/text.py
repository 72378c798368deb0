"""Text data from local files, for the models of a Hugging Face checkpoint: nothing is downloaded.

Rows come from a TSV, CSV or JSON Lines file, a plain text file, or a `datasets` dataset saved with
`save_to_disk` (a DatasetDict's `train` and `test`/`validation` splits). They are tokenized with the tokenizer
saved in the checkpoint folder (or `--tokenizer DIR`), as

- text classification: one example per row, `input_ids` (truncated to the model's length) and its label;
  padded per batch by `DataCollatorWithPadding`;
- causal language modelling: the text of every row (or the whole file) tokenized, joined with the end-of-text
  token, and cut into blocks of `block_size` tokens, each its own labels (the model shifts them).

A data spec is JSON (recorded in what the tool writes): `{"kind": "text", "train": path, "eval": path, "val":
path, "text_column", "label_column", "block_size", "tokenizer", "val_split"}`. `val` is the user's validation
text (`--val-data`), which `train-subspace` selects on; `eval` is only ever reported. Paths are read, never
created.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset

from twa_cli.errors import TwaError
from twa_cli.tasks.base import split_indices
from twa_cli.units import first_line

TEXT_SUFFIXES = (".txt",)
EVAL_SPLITS = ("test", "validation", "valid", "dev", "eval")


def _open_text(path: Path) -> io.TextIOBase:
    try:
        if path.name.endswith(".gz"):
            return io.TextIOWrapper(gzip.open(path), encoding="utf-8")
        return open(path, encoding="utf-8")
    except OSError as exc:
        raise TwaError(f"{path}: cannot read ({exc.strerror})") from exc


def _suffix(path: Path) -> str:
    return path.suffixes[-2] if path.name.endswith(".gz") and len(path.suffixes) > 1 else path.suffix


class Rows(list):  # type: ignore[type-arg]
    """The rows of a table file, and the line of the file each one starts on (for errors that name it)."""

    def __init__(self, rows: list[dict[str, Any]], lines: list[int]):
        super().__init__(rows)
        self.lines = lines


def where_in(rows: Sequence[dict[str, Any]], index: int) -> str:
    """`line N` of a file's row (by its 0-based index), or `row N` of a saved dataset."""
    lines = getattr(rows, "lines", None)
    return f"line {lines[index]}" if lines is not None else f"row {index + 1}"


def read_rows(path: Path) -> list[dict[str, Any]] | str:
    """The rows of a table file (dicts, as `Rows`), or the whole text of a plain text file (str)."""
    path = Path(path)
    if not path.exists():
        raise TwaError(f"{path}: no such file or folder")
    if path.is_dir():
        return _saved_dataset(path, "train")
    suffix = _suffix(path).lower()
    try:
        with _open_text(path) as fh:
            if suffix in TEXT_SUFFIXES:
                return fh.read()
            if suffix in (".jsonl", ".json"):
                numbered = [(number, line) for number, line in enumerate(fh, 1) if line.strip()]
                rows, lines = [_json_line(path, number, line) for number, line in numbered], [n for n, _ in numbered]
            elif suffix in (".tsv", ".csv"):
                reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",", quoting=csv.QUOTE_NONE
                                        if suffix == ".tsv" else csv.QUOTE_MINIMAL)
                rows, lines, start = [], [], 2  # the line after the header
                for row in reader:
                    if None in row:  # more fields than the header names: a stray delimiter in the text?
                        raise TwaError(f"{path}: line {start} has {len(reader.fieldnames or []) + len(row[None])} "
                                       f"fields, the header {len(reader.fieldnames or [])}")
                    rows.append(row)
                    lines.append(start)
                    start = reader.line_num + 1
            else:
                raise TwaError(f"{path}: a text data file is .tsv, .csv, .jsonl or .txt (optionally .gz), or a "
                               "folder saved by datasets' save_to_disk")
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error, EOFError, OSError) as exc:
        raise TwaError(f"{path}: not readable as {suffix[1:]} text ({first_line(exc)})") from exc
    if not rows:
        raise TwaError(f"{path}: holds no rows")
    if not all(isinstance(r, dict) for r in rows):
        raise TwaError(f"{path}: each line must be a JSON object with the text (and label) columns")
    return Rows(rows, lines)


def _json_line(path: Path, number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise TwaError(f"{path}: line {number} is not JSON ({exc.msg} at column {exc.colno})") from exc


def _saved_dataset(folder: Path, split: str) -> list[dict[str, Any]]:
    """A split of a dataset saved with `datasets`' save_to_disk."""
    try:
        from datasets import Dataset as HFDataset
        from datasets import DatasetDict, load_from_disk
    except ImportError as exc:
        raise TwaError(f"{folder}: reading a saved dataset needs the datasets package: pip install datasets") from exc
    try:
        loaded = load_from_disk(str(folder))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError ... for a folder it cannot read
        raise TwaError(f"{folder}: not a dataset saved with save_to_disk ({first_line(exc)})") from exc
    if isinstance(loaded, DatasetDict):
        names = [split] if split == "train" else [s for s in EVAL_SPLITS if s in loaded]
        if not names or names[0] not in loaded:
            return []
        loaded = loaded[names[0]]
    elif split != "train":
        return []
    assert isinstance(loaded, HFDataset)
    return [dict(row) for row in loaded]


def eval_rows(spec: dict[str, Any]) -> list[dict[str, Any]] | str | None:
    """The held-out rows: the eval file, a saved DatasetDict's test split, or None."""
    if spec.get("eval"):
        return read_rows(Path(spec["eval"]))
    if not spec.get("train"):  # validation text alone (--val-data): nothing else to score on
        return None
    train = Path(spec["train"])
    if train.is_dir():
        return _saved_dataset(train, "test") or None
    return None


def column(rows: Sequence[dict[str, Any]], named: str | None, other: str | None, where: str, flag: str) -> str:
    """The text column of the rows: `named` (what the user gave with `flag`), which must be there; unnamed,
    `text`, else, when the rows have exactly one column besides `other`, that one (SST-2 names its text column
    `sentence` in one file and `content` in the others)."""
    keys = list(rows[0])
    name = named or "text"
    if name in keys:
        return name
    if named is not None:
        raise TwaError(f"{where}: has no column '{name}' given by {flag} (it has {', '.join(map(str, keys))})")
    rest = [k for k in keys if k != other]
    if len(rest) == 1 and other is not None:
        return rest[0]
    raise TwaError(f"{where}: has no column '{name}' (it has {', '.join(map(str, keys))}); name it with {flag}")


def values(rows: Sequence[dict[str, Any]], name: str, where: str, *, label: bool = False) -> list[Any]:
    """Every row's `name`: a string (a label: a string or a whole number). A row without one (a short CSV line,
    a JSON object without the key, null) or with another JSON value (a list, an object, a number as text, `true`
    as a label) is an error that names its line, not its Python spelling learned from, nor `true` read as 1."""
    out = []
    for index, row in enumerate(rows):
        value = row.get(name)
        if value is None:
            raise TwaError(f"{where}: {where_in(rows, index)} has no '{name}' value")
        wanted = (str, int) if label else (str,)
        if isinstance(value, bool) or not isinstance(value, wanted):
            kind = "a string or a whole number" if label else "a string"
            raise TwaError(f"{where}: {where_in(rows, index)}: '{name}' is {json.dumps(value)[:40]}, not {kind}")
        out.append(value)
    return out


@dataclass
class Examples(Dataset):
    """Tokenized examples (dicts of lists or tensors), collated per batch by the task."""

    rows: list[dict[str, Any]]
    # Already in memory: collating a batch costs less than handing it over from a loading process.
    held_in_memory: ClassVar[bool] = True

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def classification_examples(rows: list[dict[str, Any]], tokenizer: Any, spec: dict[str, Any], label_ids: dict[str, int],
                            max_length: int, where: str) -> Examples:
    text = column(rows, spec.get("text_column"), spec.get("label_column") or "label", where, "--text-column")
    label = spec.get("label_column") or "label"
    if text == label:
        raise TwaError(f"{where}: the column '{text}' is both the text (--text-column) and the label "
                       "(--label-column); name two columns")
    if label not in rows[0]:
        raise TwaError(f"{where}: has no column '{label}' (it has {', '.join(map(str, rows[0]))}); name it with "
                       "--label-column")
    encoded = tokenizer([str(v) for v in values(rows, text, where)], truncation=True, max_length=max_length)
    labels = [_label(v, label_ids, f"{where}: {where_in(rows, i)}")
              for i, v in enumerate(values(rows, label, where, label=True))]
    keys = [k for k in encoded if k in ("input_ids", "attention_mask", "token_type_ids")]
    return Examples([{**{k: encoded[k][i] for k in keys}, "labels": labels[i]} for i in range(len(rows))])


def _label(value: Any, label_ids: dict[str, int], where: str) -> int:
    if isinstance(value, int) and value in label_ids.values():
        return value
    text = str(value).strip()
    if text in label_ids:
        return label_ids[text]
    if text.lstrip("-").isdigit() and int(text) in label_ids.values():
        return int(text)
    raise TwaError(f"{where}: label {value!r} is not one of the model's labels ({', '.join(label_ids)})")


def lm_blocks(source: list[dict[str, Any]] | str, tokenizer: Any, spec: dict[str, Any], block_size: int,
              where: str) -> Examples:
    """Blocks of `block_size` tokens of the whole text (rows joined by the end-of-text token)."""
    if isinstance(source, str):
        texts = [source]
    else:
        name = column(source, spec.get("text_column"), None, where, "--text-column")
        texts = [str(v) for v in values(source, name, where)]
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    # One call for every row: a fast tokenizer encodes the batch in parallel, outside Python.
    for row in tokenizer(texts, verbose=False)["input_ids"]:
        ids += row
        if eos is not None and len(texts) > 1:
            ids.append(eos)
    count = len(ids) // block_size
    if count == 0:
        raise TwaError(f"{where}: {len(ids)} tokens make no block of --block-size {block_size}")
    blocks = torch.tensor(ids[: count * block_size], dtype=torch.long).view(count, block_size)
    return Examples([{"input_ids": b} for b in blocks])


def carve(examples: Examples, fraction: float) -> tuple[Examples, Examples]:
    """(train, held out): a fixed fraction of the examples, the same in every command."""
    keep, out = split_indices(len(examples), fraction)
    return Examples([examples.rows[i] for i in keep.tolist()]), Examples([examples.rows[i] for i in out.tolist()])


def text_spec(train: str | Path | None, eval_path: str | Path | None = None, *, text_column: str | None = None,
              label_column: str | None = None, block_size: int | None = None, tokenizer: str | Path | None = None,
              val_split: float = 0.0, val_path: str | Path | None = None) -> dict[str, Any]:
    """The JSON description of text data (absolute paths, so it reads the same from any folder). Without a
    training file it describes held-out text alone: enough to score a model, not to train one."""
    spec: dict[str, Any] = {"kind": "text"}
    if train is not None:
        spec["train"] = str(Path(train).resolve())
    if eval_path is not None:
        spec["eval"] = str(Path(eval_path).resolve())
    if val_path is not None:
        spec["val"] = str(Path(val_path).resolve())
    for key, value in (("text_column", text_column), ("label_column", label_column), ("block_size", block_size)):
        if value is not None:
            spec[key] = value
    if tokenizer is not None:
        spec["tokenizer"] = str(Path(tokenizer).resolve())
    if val_split:
        spec["val_split"] = val_split
    return spec
