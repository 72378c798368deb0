"""A resume state that is damaged, forged or of another command is refused in one line naming it (issue 21, F4,
F5, F6): every field a resumed run trusts is checked before anything is written, and the run folder is left
as it was."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import snapshot

from twa_cli.io.checkpoints import load_tensors, read_checkpoint
from twa_cli.io.safetensors import save_tensors

STATE = "train-state.safetensors"
SAMPLE = ["--model", "mlp", "--data", "digits", "--batch-size", "64", "--per-epoch", "2", "--lr", "0.05",
          "--device", "cpu", "--no-eval-every-epoch"]
SUBSPACE = ["--batch-size", "64", "--lr", "0.5", "--device", "cpu", "--no-eval-every-epoch", "--no-lr-check"]


def _interrupt_after_first_state(module: str):
    """save_train_state that saves, then stops the run as Ctrl-C would: the folder keeps a resumable state."""
    import importlib

    from twa_cli.cli.signals import Interrupted

    target = importlib.import_module(module)
    real = target.save_train_state

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        raise Interrupted()

    return target, save_then_stop


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, mlp_run: Path, twa) -> dict[str, Path]:
    """A `sample` run and a `train-subspace` run, each stopped after its first epoch (state saved)."""
    root = tmp_path_factory.mktemp("interrupted")
    made = {}
    for name, module, args in (
        ("sample", "twa_cli.commands.sample", ["sample", root / "sample", *SAMPLE, "--epochs", "3"]),
        ("subspace", "twa_cli.commands.train_subspace",
         ["train-subspace", mlp_run, "-o", root / "subspace", *SUBSPACE, "--epochs", "3"]),
    ):
        target, stop = _interrupt_after_first_state(module)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(target, "save_train_state", stop)
            result = twa(*args, check=False)
        assert result.returncode == 130 and (root / name / STATE).exists(), result.stderr
        made[name] = root / name
    return made


def _resume_command(kind: str, folder: Path, mlp_run: Path) -> list[object]:
    if kind == "sample":
        return ["sample", folder, *SAMPLE, "--epochs", "3", "--resume"]
    return ["train-subspace", mlp_run, "-o", folder, *SUBSPACE, "--epochs", "3", "--resume"]


def _edit_info(**changes: object) -> Callable[[Path], None]:
    def edit(state: Path) -> None:
        meta = dict(read_checkpoint(state).meta)
        info = json.loads(meta["state"])
        info.update(changes)
        meta["state"] = json.dumps(info)
        save_tensors(state, load_tensors(state), meta)

    return edit


def _edit_tensor(name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def edit(state: Path) -> None:
        tensors = load_tensors(state)
        tensors[name] = change(tensors[name])
        save_tensors(state, tensors, read_checkpoint(state).meta)

    return edit


def _first_momentum(state: Path) -> str:
    return sorted(k for k in load_tensors(state) if k.startswith("momentum."))[0]


def _cut_first_momentum(state: Path) -> None:
    _edit_tensor(_first_momentum(state), lambda t: t.reshape(-1)[:3].clone())(state)


def _rename_first_momentum(state: Path) -> None:
    tensors = load_tensors(state)
    tensors["momentum.nosuchparameter"] = tensors.pop(_first_momentum(state))
    save_tensors(state, tensors, read_checkpoint(state).meta)


def _edit_history(**changes: object) -> Callable[[Path], None]:
    """Change figures in the first row of the state's history."""
    def edit(state: Path) -> None:
        meta = dict(read_checkpoint(state).meta)
        info = json.loads(meta["state"])
        assert set(changes) <= set(info["history"][0]), info["history"][0]  # figures the run did write
        info["history"][0].update(changes)
        meta["state"] = json.dumps(info)
        save_tensors(state, load_tensors(state), meta)

    return edit


def _drop_tensor(pick: Callable[[Path], str]) -> Callable[[Path], None]:
    """Delete one tensor from the state (its record of what it holds left as it was)."""
    def edit(state: Path) -> None:
        tensors = load_tensors(state)
        del tensors[pick(state)]
        save_tensors(state, tensors, read_checkpoint(state).meta)

    return edit


def _first_model_tensor(state: Path) -> str:
    return sorted(k for k in load_tensors(state) if k.startswith("model."))[0]


def _drop_record(state: Path) -> None:
    meta = dict(read_checkpoint(state).meta)
    info = json.loads(meta["state"])
    info.pop("tensors", None)
    meta["state"] = json.dumps(info)
    save_tensors(state, load_tensors(state), meta)


# (id, which run, damage, fragments of the one error line besides the state's path)
DAMAGE = [
    ("epochs-negative", "sample", _edit_info(epochs_done=-5), ["epochs_done"]),
    ("epochs-fraction", "sample", _edit_info(epochs_done=3.5), ["epochs_done"]),
    ("epochs-string", "sample", _edit_info(epochs_done="3"), ["epochs_done"]),
    ("epochs-huge", "sample", _edit_info(epochs_done=10**30), ["epochs_done"]),
    ("epochs-bool", "sample", _edit_info(epochs_done=True), ["epochs_done"]),
    ("step-negative", "sample", _edit_info(step=-1), ["step"]),
    ("step-mismatch", "sample", _edit_info(step=7), ["step"]),
    ("history-null", "sample", _edit_info(history=None), ["history"]),
    ("history-rows", "sample", _edit_info(history=[1, 2]), ["history"]),
    ("config-null", "sample", _edit_info(config=None), ["config"]),
    ("rng-cut", "sample", _edit_tensor("rng.torch", lambda t: t[:100].clone()), ["rng.torch"]),
    ("rng-float", "sample", _edit_tensor("rng.torch", lambda t: t.float()), ["rng.torch"]),
    ("momentum-cut", "sample", _cut_first_momentum, ["momentum."]),
    ("momentum-unknown", "sample", _rename_first_momentum, ["momentum.nosuchparameter"]),
    ("coords-cut", "subspace", _edit_tensor("optim.coords", lambda t: t[:3].clone()), ["optim.coords"]),
    ("momentum-int", "subspace", _edit_tensor("optim.momentum", lambda t: t.long()), ["optim.momentum"]),
    ("offspan-cut", "subspace", _edit_tensor("optim.offspan", lambda t: t[:1].clone()), ["optim.offspan"]),
    ("subspace-rng-cut", "subspace", _edit_tensor("rng.torch", lambda t: t[:100].clone()), ["rng.torch"]),
    ("subspace-history-null", "subspace", _edit_info(history=None), ["history"]),
    ("subspace-lr-string", "subspace", _edit_info(config={"lr": "fast"}), []),
    # A tensor deleted from the file: the state records what it holds (momentum restarting silently was the bug).
    ("momentum-deleted", "sample", _drop_tensor(_first_momentum), ["no tensor", "momentum."]),
    ("model-deleted", "sample", _drop_tensor(_first_model_tensor), ["no tensor", "model."]),
    ("subspace-momentum-deleted", "subspace", _drop_tensor(lambda state: "optim.momentum"),
     ["no tensor", "optim.momentum"]),
    ("record-deleted", "sample", _drop_record, ["record"]),
    ("record-not-names", "sample", _edit_info(tensors=[1, 2]), ["tensors"]),
    # Figures of training a saved epoch cannot have: its loss was finite, or the run stopped as diverged.
    ("history-nan-train-loss", "sample", _edit_history(train_loss=float("nan")), ["history", "train_loss", "NaN"]),
    ("history-nan-lr", "sample", _edit_history(lr=float("nan")), ["history", "lr"]),
    ("history-inf-seconds", "subspace", _edit_history(seconds=float("inf")), ["history", "seconds"]),
    ("history-string-figure", "subspace", _edit_history(train_loss="low"), ["history", "train_loss"]),
]


@pytest.mark.parametrize("kind, damage, expect", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_a_damaged_state_is_one_line_naming_it(kind, damage, expect, runs, mlp_run, tmp_path, twa):
    folder = shutil.copytree(runs[kind], tmp_path / kind)
    damage(folder / STATE)
    before = snapshot(tmp_path)
    result = twa(*_resume_command(kind, folder, mlp_run), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(folder / STATE) in lines[0], lines[0]
    for fragment in expect:
        assert fragment in lines[0], lines[0]
    assert snapshot(tmp_path) == before


def test_the_undamaged_states_resume(runs, mlp_run, tmp_path, twa):
    """The fixtures themselves resume (else every refusal above could be for another reason)."""
    for kind in ("sample", "subspace"):
        folder = shutil.copytree(runs[kind], tmp_path / kind)
        twa(*_resume_command(kind, folder, mlp_run))
        assert (folder / "metrics.jsonl").read_text().count("\n") == 3


def test_a_held_out_figure_that_is_nan_resumes(runs, mlp_run, tmp_path, twa):
    """NaN is legitimate among held-out figures: weights that are finite (so the epoch is saved) can still score
    a NaN loss on other examples when their logits overflow, and `--resume` with a smaller --lr must then
    recover from that state."""
    folder = shutil.copytree(runs["subspace"], tmp_path / "subspace")
    _edit_history(val_loss=float("nan"))(folder / STATE)
    twa(*_resume_command("subspace", folder, mlp_run))
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["val_loss"] is None  # NaN, written as standard JSON's null


def test_resume_with_fewer_epochs_than_done_is_refused(runs, mlp_run, tmp_path, twa):
    """--epochs below the epochs a sample run has done (its state stays for more) ran nothing and said the run
    was complete; an epoch done cannot be undone, so it is refused in one line."""
    folder = shutil.copytree(runs["sample"], tmp_path / "sample")

    def with_epochs(n: int) -> list[object]:
        command = _resume_command("sample", folder, mlp_run)
        command[command.index("--epochs") + 1] = str(n)
        return command

    twa(*with_epochs(2))  # 2 epochs done
    before = snapshot(tmp_path)
    result = twa(*with_epochs(1), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "--epochs 1" in lines[0] and "2 epochs" in lines[0], lines
    assert snapshot(tmp_path) == before
    twa(*with_epochs(2))  # as many as done: nothing to do, and no error


def _points(edit: Callable[[list], object]) -> Callable[[Path], None]:
    def change(record: Path) -> None:
        body = json.loads(record.read_text())
        result = edit(body["points"])
        body["points"] = body["points"] if result is None else result
        record.write_text(json.dumps(body))

    return change


@pytest.mark.parametrize("damage", [
    lambda record: record.unlink(),
    _points(lambda points: [{"label": 5}]),
    _points(lambda points: points[0].pop("step")),
    _points(lambda points: points[0].update(figures=None)),
    _points(lambda points: points[0].update(kept="yes")),
    _points(lambda points: [dict(p, kept=False) for p in points]),
    lambda record: record.write_text('{"points": 3}'),
], ids=["deleted", "no-step-label-number", "no-step", "figures-null", "kept-string", "none-kept", "points-number"])
def test_a_lost_or_damaged_validation_record_is_one_line_naming_it(damage, runs, mlp_run, tmp_path, twa):
    """The state keeps the best point scored so far, validation.json says which one it is: deleted, the resumed
    run silently forgot its choice (and could end worse than what it had kept); damaged, a KeyError."""
    folder = shutil.copytree(runs["subspace"], tmp_path / "subspace")
    record = folder / "validation.json"
    assert any(p["kept"] for p in json.loads(record.read_text())["points"])
    damage(record)
    before = snapshot(tmp_path)
    result = twa(*_resume_command("subspace", folder, mlp_run), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(record) in lines[0], lines[0]
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def checked_run(tmp_path_factory: pytest.TempPathFactory, mlp_run: Path, twa) -> Path:
    """A train-subspace run with its lr check, stopped after its first epoch."""
    out = tmp_path_factory.mktemp("checked") / "run"
    target, stop = _interrupt_after_first_state("twa_cli.commands.train_subspace")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(target, "save_train_state", stop)
        result = twa(*_checked_command(out, mlp_run), check=False)
    assert result.returncode == 130 and (out / "lr-check.json").exists(), result.stderr
    return out


def _checked_command(folder: Path, mlp_run: Path, *extra: object) -> list[object]:
    flags = [f for f in SUBSPACE if f != "--no-lr-check"]
    return ["train-subspace", mlp_run, "-o", folder, *flags, "--epochs", "3", *extra]


def _lr_check(**changes: object) -> Callable[[Path], None]:
    def edit(record: Path) -> None:
        body = json.loads(record.read_text())
        body.update(changes)
        record.write_text(json.dumps(body))

    return edit


@pytest.mark.parametrize("damage", [
    lambda record: record.unlink(),
    _lr_check(used="fast"),
    _lr_check(used=1e9),
    _lr_check(used=-0.1),
    _lr_check(requested=0.25),
    lambda record: record.write_text('{"lr": 0.5}'),
    lambda record: record.write_text("[]"),
], ids=["deleted", "used-string", "used-above-requested", "used-negative", "requested-other", "other-keys",
        "not-a-table"])
def test_a_lost_or_damaged_lr_check_is_one_line_naming_it(damage, checked_run, mlp_run, tmp_path, twa):
    """A resumed run trains at the lr its check chose, read back from lr-check.json: other keys were a TypeError
    traceback, any number was trained at, and a deleted record was measured again at the resumed point (another
    lr, mid-run, silently)."""
    folder = shutil.copytree(checked_run, tmp_path / "run")
    record = folder / "lr-check.json"
    damage(record)
    before = snapshot(tmp_path)
    result = twa(*_checked_command(folder, mlp_run, "--resume"), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(record) in lines[0], lines[0]
    assert snapshot(tmp_path) == before


def test_the_undamaged_lr_check_resumes_at_the_lr_it_chose(checked_run, mlp_run, tmp_path, twa):
    folder = shutil.copytree(checked_run, tmp_path / "run")
    used = json.loads((folder / "lr-check.json").read_text())["used"]
    twa(*_checked_command(folder, mlp_run, "--resume"))
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[1]["lr"] <= used * (1 + 1e-9)


def test_the_state_of_another_command_says_so(runs, mlp_run, tmp_path, twa):
    folder = shutil.copytree(runs["subspace"], tmp_path / "subspace")
    shutil.copy(runs["sample"] / STATE, folder / STATE)
    result = twa(*_resume_command("subspace", folder, mlp_run), check=False)
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip()
    assert str(folder / STATE) in line and "twa sample" in line and "was None" not in line, line


def test_a_run_killed_before_its_first_epoch_is_not_offered_resume(tmp_path, twa):
    out = tmp_path / "run"
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    args = ["sample", out, "--model", "mlp", "--data", "digits", "--batch-size", "1", "--epochs", "1",
            "--device", "cpu", "--no-eval-every-epoch"]
    proc = subprocess.Popen([sys.executable, "-m", "twa_cli", *map(str, args)], stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 300
    while not (out / "ckpt-00000000.safetensors").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / STATE).exists(), "the first epoch completed before the kill"

    rerun = twa(*args, check=False)
    assert rerun.returncode == 1 and "--force" in rerun.stderr and "--resume" not in rerun.stderr, rerun.stderr
    resumed = twa(*args, "--resume", check=False)
    assert resumed.returncode == 1 and "--force" in resumed.stderr, resumed.stderr
    assert "run without --resume" not in resumed.stderr, resumed.stderr
    twa(*args, "--force")
    assert (out / STATE).exists()
