"""`twa inspect`: the checkpoints the tool sees, in the order it uses them, and whether they fit together."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from twa_cli import readers
from twa_cli.checkpoints import Checkpoint, check_compatible, list_folder
from twa_cli.errors import TwaError
from twa_cli.selection import Selection, metric_direction, metric_value, select_indices


@dataclass
class Entry:
    index: int
    path: str
    format: str
    step: int | None
    epoch: float | None
    parameters: int
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


def inspect_checkpoints(path: str | Path, sel: Selection = Selection(), strip_prefix: str | None = None) -> Inspection:
    """Describe every checkpoint at `path`, mark the ones `sel` selects, and check they share keys and shapes."""
    ckpts = list_folder(path, strip_prefix)
    chosen = set(select_indices(ckpts, sel))
    metric = metric_direction(sel.by)[0] if sel.by else None
    entries = [_entry(i, c, i in chosen, metric) for i, c in enumerate(ckpts)]
    compatible, problem = True, None
    try:
        check_compatible([ckpts[i] for i in sorted(chosen)])
    except TwaError as exc:
        compatible, problem = False, str(exc)
    arch = ckpts[0].arch
    data = ckpts[0].data
    notes = []
    if arch is None:
        notes.append("no architecture recorded: `twa swa` averages every floating tensor (BatchNorm statistics "
                     "averaged, not recomputed); pass --model (and --data) to recompute them or to train")
    return Inspection(str(path), entries, sel.describe(), compatible, problem,
                      arch.get("name") if isinstance(arch, dict) else None,
                      data.get("name") if isinstance(data, dict) else None, metric, notes)


def _entry(index: int, ckpt: Checkpoint, selected: bool, metric: str | None) -> Entry:
    with ckpt.open() as reader:
        keys = reader.keys()
        dtypes = {reader.dtype(k) for k in keys}
        floating = sorted({str(d).removeprefix("torch.") for d in dtypes if d.is_floating_point})
        params = sum(_numel(reader.shape(k)) for k in keys)
        tensor_bytes = reader.nbytes()
    file_bytes = sum(p.stat().st_size for p in readers.checkpoint_files(ckpt.path))
    return Entry(index, str(ckpt.path), ckpt.format, ckpt.step, ckpt.epoch, params,
                 "/".join(floating) or "-", tensor_bytes, file_bytes, selected,
                 metric_value(ckpt, metric) if metric else None)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)
