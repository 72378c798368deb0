"""The names of the files in the folders `sample` and `train-subspace` write, and their per-epoch log.

A `sample` folder: `ckpt-<step>.safetensors` per sample, `metrics.jsonl`, and while it runs
`train-state.safetensors`. A `train-subspace` folder: `twa.safetensors` (or `model.safetensors` with the
configuration files, for a Hugging Face model), `coefficients.json`, `metrics.jsonl`, `basis.safetensors`
(when the basis was made from a folder), `lr-check.json`, and while it runs `train-state.safetensors`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from twa_cli.errors import TwaError
from twa_cli.io.writers import write_text
from twa_cli.units import json_dumps

RESULT_FILE = "twa.safetensors"
COEFFICIENTS_FILE = "coefficients.json"
METRICS_FILE = "metrics.jsonl"
BASIS_FILE = "basis.safetensors"
STATE_FILE = "train-state.safetensors"
LR_CHECK_FILE = "lr-check.json"
VALIDATION_FILE = "validation.json"  # the points train-subspace scored on the validation split, and the one kept
# A Hugging Face result in a train-subspace folder: the weights under their usual name, beside config.json.
HF_RESULT_FILE = "model.safetensors"
# Beside a run folder being replaced with --force: where the new run is built until it completes.
PARTIAL_SUFFIX = ".partial"


def partial_folder(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def state_of(path: Path) -> Path | None:
    """The resume state of a run writing `path` (in it, or in its `.partial` folder), if there is one. A link to a
    folder stands for that folder (its `.partial` lies beside it)."""
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    return next((f / STATE_FILE for f in (partial_folder(path), path) if (f / STATE_FILE).exists()), None)


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.safetensors"


def step_of_sample(path: Path) -> int | None:
    """The step in a name `checkpoint_name` wrote; None for any other name."""
    match = re.fullmatch(r"ckpt-(\d{8,})\.safetensors", path.name)
    return int(match.group(1)) if match else None


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """The per-epoch figures as JSON lines, rewritten whole (atomically) after each epoch and on resuming,
    so the file always matches the saved state, and a temporary left by a killed write is cleared."""
    write_text(path, "".join(json_dumps(h) + "\n" for h in history))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TwaError(f"{path}: line {number} is not JSON ({exc.msg})") from exc
            if isinstance(row, dict):
                rows.append(row)
    return rows


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TwaError(f"{path}: not readable JSON ({exc})") from exc
