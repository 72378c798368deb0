"""Which checkpoints of a folder a command uses: by position, by step, or the best N by a metric.

Filters apply in that order: steps (`start_step <= step < end_step`, `step % every_step == 0`), then
positions (`[start:end:every]`, as the paper takes "the first 100 epochs"), then the `top` N by a metric,
as timm's `avg_checkpoints.py -n N` ranks by the metric saved in each checkpoint. The result keeps training
order.

A metric is looked up in the checkpoint's metadata (timm's `metric`, any field the tool wrote), in the
metrics Hugging Face's `trainer_state.json` logged at that step, in the file name (Lightning's
`epoch=3-val_loss=0.12.ckpt`), and in the folder's `metrics.jsonl` written by `twa sample`, matched by epoch.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import Checkpoint
from twa_cli.io.runfiles import METRICS_FILE

log = logging.getLogger("twa")

LOWER_IS_BETTER = re.compile(r"loss|err|perplexity|ppl|wer|cer", re.IGNORECASE)
NAME_METRIC = re.compile(r"(?:^|[-_ ])([A-Za-z][\w/.]*?)=([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


@dataclass(frozen=True)
class Selection:
    start: int = 0
    end: int | None = None
    every: int = 1
    start_step: int | None = None
    end_step: int | None = None
    every_step: int | None = None
    top: int | None = None
    by: str | None = None

    def describe(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def select_indices(ckpts: list[Checkpoint], sel: Selection) -> list[int]:
    """Positions (in `ckpts`) of the selected checkpoints, in training order."""
    if sel.every < 1:
        raise TwaError(f"--every must be at least 1 (got {sel.every})")
    if sel.every_step is not None and sel.every_step < 1:
        raise TwaError(f"--every-step must be at least 1 (got {sel.every_step})")
    if (sel.top is None) != (sel.by is None):
        raise TwaError("--top N and --by METRIC go together")
    indices = list(range(len(ckpts)))
    if sel.start_step is not None or sel.end_step is not None or sel.every_step is not None:
        unknown = [ckpts[i].path for i in indices if ckpts[i].step is None]
        if unknown:
            raise TwaError(f"{unknown[0]}: has no step, so step-based selection cannot place it; select by position")
        indices = [i for i in indices if _in_steps(ckpts[i].step, sel)]  # type: ignore[arg-type]
    indices = indices[sel.start:sel.end:sel.every]
    if sel.top is not None and sel.by is not None:
        indices = _top(ckpts, indices, sel.top, sel.by)
    if not indices:
        raise TwaError(f"the selection ({_flags(sel)}) selects no checkpoint out of {len(ckpts)}")
    return indices


def select_checkpoints(ckpts: list[Checkpoint], sel: Selection) -> list[Checkpoint]:
    return [ckpts[i] for i in select_indices(ckpts, sel)]


def _in_steps(step: int, sel: Selection) -> bool:
    if sel.start_step is not None and step < sel.start_step:
        return False
    if sel.end_step is not None and step >= sel.end_step:
        return False
    return sel.every_step is None or step % sel.every_step == 0


def metric_direction(by: str) -> tuple[str, bool]:
    """(metric name, higher is better). `min:NAME`/`max:NAME` say it; else losses and errors are minimized."""
    if by.startswith(("min:", "max:")):
        return by[4:], by.startswith("max:")
    return by, not LOWER_IS_BETTER.search(by)


def _top(ckpts: list[Checkpoint], indices: list[int], n: int, by: str) -> list[int]:
    if n < 1:
        raise TwaError(f"--top must be at least 1 (got {n})")
    name, higher = metric_direction(by)
    logs: dict[Path, list[dict]] = {}
    scored = [(i, metric_value(ckpts[i], name, logs)) for i in indices]
    known = [(i, v) for i, v in scored if v is not None]
    if not known:
        available = sorted(metric_names(ckpts[indices[0]], logs)) if indices else []
        if name in available:
            raise TwaError(f"--by {name}: the selected checkpoints record no finite value of it (NaN or Inf)")
        raise TwaError(f"--by {name}: no selected checkpoint records this metric"
                       + (f" (metrics found: {', '.join(available)})" if available else " (no metrics found)"))
    if len(known) < len(scored):
        log.info("%d of %d checkpoints record no %s and are not ranked", len(scored) - len(known), len(scored), name)
    ranked = sorted(known, key=lambda iv: -iv[1] if higher else iv[1])  # stable: ties keep training order
    return sorted(i for i, _ in ranked[:n])


def metric_value(ckpt: Checkpoint, name: str, logs: dict[Path, list[dict]] | None = None) -> float | None:
    """The value of a metric for one checkpoint, from wherever the tool that wrote it keeps it."""
    for source in _metric_sources(ckpt, logs if logs is not None else {}):
        value = source.get(name)
        if isinstance(value, (int, float, str)):
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):
                return number
    return None


def metric_names(ckpt: Checkpoint, logs: dict[Path, list[dict]]) -> set[str]:
    names: set[str] = set()
    for source in _metric_sources(ckpt, logs):
        names |= {k for k, v in source.items() if _numeric(v)}
    return names - {"format", "kind", "step"}


def _metric_sources(ckpt: Checkpoint, logs: dict[Path, list[dict]]) -> list[dict]:
    sources: list[dict] = [dict(ckpt.meta)]
    if "metrics" in ckpt.meta:
        try:
            sources.append(json.loads(ckpt.meta["metrics"]))
        except json.JSONDecodeError:
            pass
    sources.append({m.group(1): m.group(2) for m in NAME_METRIC.finditer(ckpt.path.name)})
    folder = ckpt.path.parent
    if folder not in logs:
        logs[folder] = _read_log(folder / METRICS_FILE)
    if ckpt.epoch is not None:
        sources += [entry for entry in logs[folder] if _numeric(entry.get("epoch"))
                    and abs(float(entry["epoch"]) - ckpt.epoch) < 1e-9]
    return sources


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _numeric(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(str(value))
        return True
    except ValueError:
        return False


def _flags(sel: Selection) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sel.describe().items())
