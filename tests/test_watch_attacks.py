"""`twa watch` against a hostile run folder and a damaged or hand-edited output: what a training job, a flaky
file system or a user may do to either while a watch follows the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import trajectory

from twa_cli.commands.watch import WatchRequest, watch
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import load_tensors, make_metadata
from twa_cli.io.safetensors import save_tensors


def _model_free(polls: int) -> WatchRequest:
    return WatchRequest(every=100, interval=0.01, settle=0, polls=polls)


def _save(path: Path, **tensors: torch.Tensor) -> Path:
    return save_tensors(path, tensors, make_metadata("checkpoint", trainable=["w"]))


def _state(out: Path) -> dict:
    return json.loads((out / "watch-state" / "state.json").read_text())


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Two checkpoints of a trained `w` (300) and an untrained `bn` (3)."""
    folder = tmp_path / "run"
    folder.mkdir()
    for i, row in enumerate(trajectory(2, 300, step=1e-2)):
        _save(folder / f"c{i:04d}.safetensors", w=row.float(), bn=torch.full((3,), float(i)))
    return folder


ODD = ["trained-shape", "other-shape", "other-missing", "other-integer"]


def _odd(run: Path, odd: str) -> None:
    """A checkpoint that does not fit the run (c9000), then one that does (c9001)."""
    w, bn = torch.randn(300), torch.ones(3)
    tensors = {"trained-shape": {"w": torch.randn(7), "bn": bn}, "other-shape": {"w": w, "bn": torch.ones(5)},
               "other-missing": {"w": w}, "other-integer": {"w": w, "bn": torch.ones(3, dtype=torch.int64)}}[odd]
    _save(run / "c9000.safetensors", **tensors)
    _save(run / "c9001.safetensors", w=torch.randn(300), bn=bn)


def _set_aside_then_taken(result, out: Path) -> None:
    reasons = {Path(k).name: v for k, v in result.set_aside.items()}
    assert list(reasons) == ["c9000.safetensors"] and "does not fit" in reasons["c9000.safetensors"], reasons
    assert [Path(s["path"]).name for s in _state(out)["sources"]][-1] == "c9001.safetensors"


@pytest.mark.parametrize("odd", ODD)
def test_a_resumed_watch_sets_aside_a_checkpoint_that_does_not_fit(tmp_path: Path, run: Path, odd):
    out = tmp_path / "out"
    watch(run, out, _model_free(polls=2), sleep=lambda s: None)
    _odd(run, odd)
    _set_aside_then_taken(watch(run, out, _model_free(polls=2), sleep=lambda s: None, resume=True), out)


@pytest.mark.parametrize("odd", ODD)
def test_a_checkpoint_that_does_not_fit_is_set_aside_once_the_first_is_deleted(tmp_path: Path, run: Path, odd):
    out = tmp_path / "out"
    sleeps = []

    def job(_seconds: float) -> None:  # once both are taken in, the first is rotated away and an odd one comes
        sleeps.append(_seconds)
        if len(sleeps) == 2:
            (run / "c0000.safetensors").unlink()
            _odd(run, odd)

    _set_aside_then_taken(watch(run, out, _model_free(polls=4), sleep=job), out)


def test_nan_outside_the_trained_tensors_is_set_aside_not_averaged(tmp_path: Path, run: Path):
    _save(run / "c9000.safetensors", w=torch.randn(300), bn=torch.tensor([float("nan"), 1.0, 1.0]))
    result = watch(run, tmp_path / "out", _model_free(polls=2), sleep=lambda s: None)
    assert result.checkpoints == 2
    assert "NaN" in result.set_aside[str((run / "c9000.safetensors").resolve())]
    swa = load_tensors(tmp_path / "out" / "swa.safetensors")
    assert torch.equal(swa["bn"], torch.full((3,), 0.5))


def test_a_link_beside_the_checkpoint_it_names_is_taken_in_once(tmp_path: Path, run: Path):
    (run / "newest.safetensors").symlink_to(run / "c0001.safetensors")
    result = watch(run, tmp_path / "out", _model_free(polls=3), sleep=lambda s: None)
    assert result.checkpoints == 2
    assert [Path(s["path"]).name for s in _state(tmp_path / "out")["sources"]] == ["c0000.safetensors",
                                                                                  "c0001.safetensors"]


def test_an_output_left_by_a_watch_that_took_nothing_in_can_be_started_over(tmp_path: Path, run: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    watch(empty, out, _model_free(polls=1), sleep=lambda s: None)  # stopped before any checkpoint came
    assert not out.exists()  # nothing is made before the first checkpoint is taken in
    (out / "watch-state").mkdir(parents=True)  # what a watch killed while taking its first one in leaves
    with pytest.raises(TwaError, match="already exists"):
        watch(run, out, _model_free(polls=2), sleep=lambda s: None)
    assert watch(run, out, _model_free(polls=2), sleep=lambda s: None, force=True).checkpoints == 2


def test_force_over_an_output_that_is_a_link_to_a_watch_folder(tmp_path: Path, run: Path):
    real = tmp_path / "real"
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(TwaError, match="does not exist"):  # a link to nothing: refused before anything is made
        watch(run, link, _model_free(polls=2), sleep=lambda s: None)
    real.mkdir()
    watch(run, link, _model_free(polls=2), sleep=lambda s: None)
    assert watch(run, link, _model_free(polls=2), sleep=lambda s: None, force=True).checkpoints == 2
    assert link.is_symlink() and (real / "watch-state" / "state.json").exists()


def test_an_output_under_a_file_is_refused_by_name(tmp_path: Path, run: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TwaError, match=r"cannot be created, .*file is a file"):
        watch(run, tmp_path / "file" / "out", _model_free(polls=1), sleep=lambda s: None)


def _edited(tmp_path: Path, run: Path, edit) -> Path:
    out = tmp_path / "out"
    watch(run, out, _model_free(polls=2), sleep=lambda s: None)
    state = _state(out)
    edit(state)
    (out / "watch-state" / "state.json").write_text(json.dumps(state))
    return out


@pytest.mark.parametrize("edit", [
    lambda s: s.update(rank=10**30),
    lambda s: s.update(count=10**30),  # torch's error for it is many lines
    lambda s: s.update(version=99),
    lambda s: s.update(dropped=[[99, 0.1]]),
    lambda s: s.update(coords=[[float("nan")] * 2] * 2),
    lambda s: s.update(count=2.5),
], ids=["huge-rank", "huge-count", "unknown-version", "dropped-out-of-range", "nan-coords", "fractional-count"])
def test_a_hand_edited_state_is_refused_in_one_line(tmp_path: Path, run: Path, twa, edit):
    out = _edited(tmp_path, run, edit)
    _save(run / "c9000.safetensors", w=torch.randn(300), bn=torch.ones(3))  # a round would be due
    result = twa("watch", run, "-o", out, "--resume", "--polls", "2", "--settle", "0", "--interval", "0.01",
                 check=False)
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot resume" in result.stderr, result.stderr


def test_a_round_that_only_writes_the_basis_says_so_in_plain_words(tmp_path: Path, run: Path, twa):
    result = twa("watch", run, "-o", tmp_path / "out", "--polls", "2", "--settle", "0", "--interval", "0.01")
    said = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("round 1:")]
    assert said == ["round 1: 2 checkpoints (rank 2); held-out: not scored"], result.stderr
