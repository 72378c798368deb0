"""`twa inspect`: the checkpoints the tool sees, in the order it uses them, and whether they fit together."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from twa_cli.core.selection import Selection, metric_direction, metric_value, select_indices
from twa_cli.errors import TwaError
from twa_cli.io import readers
from twa_cli.io.checkpoints import Checkpoint, check_compatible, scan_folder
from twa_cli.io.readers import ReadOptions
from twa_cli.units import dtype_name

# Tensors that are statistics, not parameters, when no model says which are which.
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "n_averaged")


@dataclass
class Entry:
    index: int
    path: str
    format: str
    step: int | None
    epoch: float | None
    parameters: int  # elements of the trainable tensors (or of every tensor that is not a statistic)
    buffers: int  # elements of the rest (BatchNorm statistics, counters)
    dtype: str
    tensor_bytes: int
    file_bytes: int
    selected: bool
    metric: float | None = None


@dataclass
class Inspection:
    source: str
    entries: list[Entry]
    selection: dict[str, Any]
    compatible: bool
    problem: str | None
    architecture: str | None
    data: str | None
    metric: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def selected(self) -> list[Entry]:
        return [e for e in self.entries if e.selected]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["selected"] = len(self.selected)
        return out


def inspect(path: str | Path, selection: Selection = Selection(), read: ReadOptions = ReadOptions()) -> Inspection:
    """Describe every checkpoint at `path`, mark the ones the selection picks, and check they share tensor names
    and shapes."""
    listing = scan_folder(path, read)
    ckpts = listing.checkpoints
    chosen = set(select_indices(ckpts, selection))
    metric = metric_direction(selection.by)[0] if selection.by else None
    entries = [_entry(i, c, i in chosen, metric) for i, c in enumerate(ckpts)]
    compatible, problem, notes = True, None, listing.notes()
    try:
        layout = check_compatible([ckpts[i] for i in sorted(chosen)])
        if layout.mixed:
            name, dtypes = next(iter(layout.mixed.items()))
            notes.append(f"mixed precisions: '{name}' is {'/'.join(sorted(set(dtypes)))} (and {len(layout.mixed) - 1} "
                         "more tensors differ); an average is written in the widest unless --dtype says otherwise")
    except TwaError as exc:
        compatible, problem = False, str(exc)
    architecture = _architecture(ckpts[0])
    data = ckpts[0].data
    if architecture is None:
        notes.append("no architecture recorded: `twa swa` averages every floating tensor (BatchNorm statistics "
                     "averaged, not recomputed); pass --model (and --data) to recompute them or to train")
    return Inspection(str(path), entries, selection.describe(), compatible, problem, architecture,
                      data.get("name") if isinstance(data, dict) else None, metric, notes)


def _architecture(ckpt: Checkpoint) -> str | None:
    """The architecture the checkpoint says it is: in the tool's metadata, its Hugging Face config.json (read as
    JSON, without transformers) or timm's `arch`."""
    arch = ckpt.arch
    if isinstance(arch, dict) and isinstance(arch.get("name"), str):
        return arch["name"]
    for folder in (ckpt.path, ckpt.path.parent):
        config = folder / "config.json"
        if config.is_file():
            try:
                names = json.loads(config.read_text()).get("architectures") or []
            except (OSError, ValueError, AttributeError):
                names = []
            if names and isinstance(names[0], str):
                return f"hf:{names[0]}"
    return f"timm:{ckpt.meta['timm_arch']}" if "timm_arch" in ckpt.meta else None


def _entry(index: int, ckpt: Checkpoint, selected: bool, metric: str | None) -> Entry:
    trainable = set(ckpt.trainable or [])
    with ckpt.open() as reader:
        keys = reader.keys()
        dtypes = {reader.dtype(k) for k in keys}
        floating = sorted({dtype_name(d) for d in dtypes if d.is_floating_point})
        sizes = {k: math.prod(reader.shape(k)) for k in keys}
        tensor_bytes = reader.nbytes()
    if trainable:
        params = sum(n for k, n in sizes.items() if k in trainable)
    else:
        params = sum(n for k, n in sizes.items() if not k.endswith(BUFFER_SUFFIXES))
    file_bytes = sum(p.stat().st_size for p in readers.checkpoint_files(ckpt.path))
    return Entry(index, str(ckpt.path), ckpt.format, ckpt.step, ckpt.epoch, params, sum(sizes.values()) - params,
                 "/".join(floating) or "-", tensor_bytes, file_bytes, selected,
                 metric_value(ckpt, metric) if metric else None)
