"""What twa writes as JSON (files and --json) is standard JSON: a non-finite number is null, never Infinity or
NaN, which JavaScript's and jq's parsers refuse; and what twa writes that way it reads back."""

from __future__ import annotations

import json
import math
from pathlib import Path

from twa_cli.cli.render import Output
from twa_cli.commands.train_subspace import _recorded_lr_check
from twa_cli.core.sharpness import LrCheck
from twa_cli.io.writers import write_json


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not standard JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_files_write_non_finite_numbers_as_null(tmp_path):
    path = write_json(tmp_path / "x.json", {"limit": math.inf, "loss": [1.0, math.nan], "ok": (2.5, -math.inf)})
    assert _strict(path.read_text()) == {"limit": None, "loss": [1.0, None], "ok": [2.5, None]}


def test_json_output_writes_non_finite_numbers_as_null(capsys):
    Output(json=True).emit_json({"lr_check": {"limit": math.inf}, "path": Path("/some/where")})
    assert _strict(capsys.readouterr().out) == {"lr_check": {"limit": None}, "path": "/some/where"}


def test_an_unbounded_lr_limit_written_as_null_is_read_back_as_unbounded(tmp_path):
    check = LrCheck(requested=2.0, sharpness=0.0, limit=math.inf, used=2.0, method="double backward", start_loss=0.5)
    path = write_json(tmp_path / "lr-check.json", check.to_dict())  # as train-subspace writes it
    assert _strict(path.read_text())["limit"] is None
    assert _recorded_lr_check(path, 2.0).limit == math.inf


def test_metrics_lines_write_non_finite_numbers_as_null(tmp_path):
    from twa_cli.io.runfiles import read_jsonl, write_metrics

    write_metrics(tmp_path / "metrics.jsonl", [{"epoch": 1, "test_perplexity": math.inf}])
    assert [_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"epoch": 1, "test_perplexity": None}]
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"epoch": 1, "test_perplexity": None}]
