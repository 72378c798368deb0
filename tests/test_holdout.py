"""Held-out selection, `train-subspace`'s default: the split it chooses on, the points it scores, the point it
keeps, and the inputs it refuses (each in one line, with nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import snapshot

from twa_cli.core.holdout import MAX_HELD_OUT, MIN_VAL_EXAMPLES, held_out_count
from twa_cli.tasks.base import Part
from twa_cli.tasks.resolve import TaskRequest, resolve_task

HOOK = "custom_task:digits_as_dicts"


@pytest.fixture(scope="module")
def dict_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import _invoke

    out = tmp_path_factory.mktemp("dict") / "run"
    _invoke("sample", out, "--task", HOOK, "--epochs", "3", "--per-epoch", "2", "--batch-size", "64", "--lr", "0.05",
            "--device", "cpu", "--no-eval-every-epoch")
    return out


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(("train", "held"), [(10, 0), (199, 0), (200, 100), (1437, 144), (10**6, MAX_HELD_OUT)])
def test_the_held_out_count_is_a_tenth_within_its_bounds_or_nothing_when_too_little_is_left(train, held):
    assert held_out_count(train) == held
    assert held == 0 or MIN_VAL_EXAMPLES <= held <= train // 2


def test_the_held_out_split_is_disjoint_from_the_fit_fixed_and_complete():
    parts = []
    for _ in range(2):
        task = resolve_task(TaskRequest(model="mlp", data="digits"))
        whole = len(task.split("train", augment=False))
        task.hold_out(held_out_count(whole) / whole)
        train, val = task.split("train", augment=False), task.split("val", augment=False)
        assert isinstance(train, Part) and isinstance(val, Part)
        parts.append((train.indices, val.indices))
        assert len(val) == held_out_count(whole)
        assert not set(train.indices.tolist()) & set(val.indices.tolist())
        assert sorted(train.indices.tolist() + val.indices.tolist()) == list(range(whole))
        assert task.split("test", augment=False) is not None and len(task.split("test", augment=False)) > 0
    assert all(torch.equal(a, b) for a, b in zip(parts[0], parts[1], strict=True))  # the same split every time


def test_by_default_the_result_is_the_best_point_scored_and_every_point_is_recorded(cnn_run, tmp_path, twa):
    run = twa("train-subspace", cnn_run, "-o", tmp_path / "t", "--epochs", "2", "--json")
    summary = json.loads(run.stdout)
    validation = summary["validation"]
    assert "held out" in validation["split"] and validation["metric"] == "max:accuracy"
    labels = [p["label"] for p in validation["points"]]
    assert labels[:2] == ["center", "last"] and len(labels) >= 2 + 4  # the starts, then the run at least 4 times
    best = max(validation["points"], key=lambda p: (p["figures"]["accuracy"], -p["figures"]["loss"]))
    assert summary["selected"] == validation["kept"] == best["label"]
    assert json.loads((tmp_path / "t" / "validation.json").read_text()) == validation
    assert "held out of the fit" in run.stderr  # said: the choice is made on the run's own training data


def test_a_step_size_that_leaves_the_basin_returns_the_best_start_and_says_so(cnn_run, tmp_path, twa):
    lr = ["--lr", "50", "--no-lr-check", "--epochs", "1"]
    default = twa("train-subspace", cnn_run, "-o", tmp_path / "default", *lr, "--json")
    summary = json.loads(default.stdout)
    starts = {p["label"]: p["figures"] for p in summary["validation"]["points"][:2]}
    assert summary["selected"] in starts
    assert [line for line in default.stderr.splitlines() if "nothing trained in the span" in line] != []
    kept = starts[summary["selected"]]
    assert kept["accuracy"] == max(f["accuracy"] for f in starts.values())
    # The paper's algorithm, with the same step, keeps wherever it ends up: worse, or stopped as diverged.
    paper = twa("train-subspace", cnn_run, "-o", tmp_path / "paper", *lr, "--preset", "paper", "--json", check=False)
    if paper.returncode == 0:
        assert json.loads(paper.stdout)["test"]["accuracy"] < summary["test"]["accuracy"]
    else:
        assert "diverged" in paper.stderr.lower() and not (tmp_path / "paper").exists()


def test_a_split_of_its_own_is_chosen_on_and_the_whole_training_part_is_fitted(dict_run, tmp_path, twa):
    run = twa("train-subspace", dict_run, "-o", tmp_path / "t", "--task", "custom_task:digits_with_val", "--epochs",
              "1", "--json")
    summary = json.loads(run.stdout)
    assert summary["validation"]["split"] == "the data's validation split (200)"
    assert "held out of the fit" not in run.stderr


@pytest.mark.parametrize(("hook", "expected"), [
    ("custom_task:digits_with_small_val", "the validation split has 50 examples; choosing on it needs at least 100"),
    ("custom_task:digits_with_nan_val", "every starting point scores NaN or Inf on the validation split"),
])
def test_a_validation_split_that_cannot_choose_is_one_line_and_writes_nothing(dict_run, tmp_path, twa, hook,
                                                                               expected):
    before = snapshot(tmp_path)
    result = twa("train-subspace", dict_run, "-o", tmp_path / "t", "--task", hook, "--epochs", "1", check=False)
    assert expected in one_line_error(result)
    assert snapshot(tmp_path) == before


def test_without_selection_the_fit_s_end_is_the_result(cnn_run, tmp_path, twa):
    summary = json.loads(twa("train-subspace", cnn_run, "-o", tmp_path / "t", "--epochs", "1", "--select", "none",
                             "--json").stdout)
    assert summary["selected"] is None and summary["validation"] is None
    assert not (tmp_path / "t" / "validation.json").exists()
