"""Interruption and divergence never cost a result.

A run killed with SIGKILL mid-epoch and resumed ends with exactly the files of an uninterrupted run; Ctrl-C
stops cleanly and says how to resume; a killed write leaves no partial file; a diverged run writes nothing
diverged and keeps its last good state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from twa_cli.commands.sample import SampleConfig, sample
from twa_cli.commands.train_subspace import SubspaceConfig, train_subspace
from twa_cli.core.basis import orthogonalize
from twa_cli.core.basis_files import save_basis
from twa_cli.io import atomic
from twa_cli.io.checkpoints import list_folder, load_tensors, read_checkpoint
from twa_cli.io.safetensors import save_tensors
from twa_cli.tasks.resolve import TaskRequest

STATE = "train-state.safetensors"


# Bit-for-bit holds for a given number of threads (reductions split differently otherwise): the runs here
# all use one, which is also far quicker for these tiny models on a busy machine.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _start(*args: object) -> subprocess.Popen:
    env = {**os.environ, "NO_COLOR": "1", **ONE_THREAD}
    return subprocess.Popen([sys.executable, "-m", "twa_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until `path` exists; the run must still be going (else the test would interrupt nothing)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared:\n{proc.communicate()[1]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.001)


def _kill(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    assert proc.poll() is None, "the run had already finished"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _basis(run: Path, path: Path) -> Path:
    ckpts = list_folder(run)
    return save_basis(orthogonalize(ckpts, names=ckpts[0].trainable), path)


def _same_weights(a: Path, b: Path) -> None:
    ta, tb = load_tensors(a), load_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), f"{a.name}: '{name}' differs"


def _same_checkpoint(a: Path, b: Path) -> None:
    """The same tensors, bit for bit, and the same metadata but for the record of how each run was invoked."""
    _same_weights(a, b)
    meta_a, meta_b = (dict(read_checkpoint(f).meta) for f in (a, b))
    meta_a.pop("invocation", None)
    meta_b.pop("invocation", None)
    assert meta_a == meta_b, a.name


def _epochs_done(state: Path) -> int:
    return json.loads(read_checkpoint(state).meta["state"])["epochs_done"]


def _no_temporaries(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_sample_killed_mid_epoch_resumes_bit_for_bit(tmp_path: Path, one_thread, twa):
    args = ["--model", "mlp", "--data", "digits", "--epochs", "3", "--batch-size", "8", "--per-epoch", "3",
            "--lr", "0.05", "--seed", "3", "--device", "cpu"]
    killed = tmp_path / "killed"
    proc = _start("sample", killed, *args)
    _wait_for(killed / STATE, proc)  # epoch 1 is saved ...
    _wait_for(killed / "ckpt-00000225.safetensors", proc)  # ... and epoch 2 is a third done
    code, _ = _kill(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert _epochs_done(killed / STATE) < 3, "killed after the last epoch: nothing left to resume"
    twa("sample", killed, *args, "--resume")
    _no_temporaries(killed)  # a temporary a kill can leave (between naming and renaming) is cleared on resuming

    reference = tmp_path / "reference"
    sample(reference, SampleConfig(TaskRequest(model="mlp", data="digits"), epochs=3, lr=0.05, batch_size=8,
                                   per_epoch=3, seed=3, device="cpu"))
    names = sorted(p.name for p in reference.glob("ckpt-*.safetensors"))
    assert names == sorted(p.name for p in killed.glob("ckpt-*.safetensors")) and len(names) == 10
    for name in names:
        _same_checkpoint(killed / name, reference / name)
    _same_weights(killed / STATE, reference / STATE)


def test_train_subspace_interrupted_twice_resumes_bit_for_bit(tmp_path: Path, mlp_run: Path, one_thread, twa):
    basis = _basis(mlp_run, tmp_path / "basis.safetensors")
    out = tmp_path / "twa"
    args = ["-o", out, "--epochs", "3", "--batch-size", "8", "--lr", "0.5", "--device", "cpu"]

    proc = _start("train-subspace", basis, *args)
    _wait_for(out / STATE, proc)
    code, err = _kill(proc, signal.SIGINT)  # Ctrl-C: a clean stop that says how to continue
    assert code == 130, err
    assert "--resume" in err and "Traceback" not in err
    first = _epochs_done(out / STATE)

    proc = _start("train-subspace", basis, *args, "--resume")
    while _epochs_done(out / STATE) == first:  # the resumed run completes one more epoch, then dies mid-epoch
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.001)
    code, _ = _kill(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (out / "twa.safetensors").exists()
    twa("train-subspace", basis, *args, "--resume")
    _no_temporaries(out)

    reference = tmp_path / "reference"
    train_subspace(basis, reference, SubspaceConfig(epochs=3, lr=0.5, batch_size=8, device="cpu"))
    _same_checkpoint(out / "twa.safetensors", reference / "twa.safetensors")
    assert (out / "coefficients.json").read_bytes() == (reference / "coefficients.json").read_bytes()
    assert not (out / STATE).exists()  # a finished run leaves no state behind


def test_interrupt_in_the_first_epoch_says_there_is_nothing_to_resume(tmp_path: Path, monkeypatch, twa):
    from twa_cli.commands import sample as sampling

    def ctrl_c_before_the_first_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs as soon as the signal is delivered

    monkeypatch.setattr(sampling, "save_train_state", ctrl_c_before_the_first_save)
    result = twa("sample", tmp_path / "run", "--model", "mlp", "--epochs", "2", "--device", "cpu", check=False)
    assert result.returncode == 130
    assert "before anything could be resumed" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing to resume: the run's folder is gone, a rerun needs no --force


_WRITER = """
import sys, torch
import twa_cli.io.atomic as atomic
from twa_cli.io.safetensors import save_tensors
if sys.argv[2] == "named":
    atomic._open_unnamed = lambda folder: -1
big = {"w": torch.arange(8_000_000, dtype=torch.float32)}
for i in range(10_000):
    save_tensors(sys.argv[1] + "/model.safetensors", big, {"i": str(i)})
    print(i, flush=True)
"""


@pytest.mark.parametrize("temps", ["unnamed", "named"])
def test_a_write_killed_midway_leaves_no_partial_file(tmp_path: Path, temps: str, monkeypatch):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), temps], stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # a few complete writes, then kill during one of the next (writing is all it does)
        assert proc.stdout.readline(), "the writer died"
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    target = tmp_path / "model.safetensors"
    # The file in place is always one complete write.
    assert torch.equal(load_tensors(target)["w"], torch.arange(8_000_000, dtype=torch.float32))
    if temps == "unnamed":
        _no_temporaries(tmp_path)
    # Named temporaries (systems without unnamed files) are cleared by the next write of the same file.
    if temps == "named":
        monkeypatch.setattr(atomic, "_open_unnamed", lambda folder: -1)
    save_tensors(target, {"w": torch.zeros(3)}, {})
    _no_temporaries(tmp_path)
    assert torch.equal(load_tensors(target)["w"], torch.zeros(3))


def test_sample_divergence_in_the_first_epoch_keeps_nothing(tmp_path: Path, twa):
    out = tmp_path / "run"
    result = twa("sample", out, "--model", "mlp", "--epochs", "2", "--batch-size", "64", "--lr", "1e4",
                 "--per-epoch", "4", "--device", "cpu", check=False)
    err = result.stderr
    assert result.returncode == 1 and "Traceback" not in err
    assert "diverged" in err and "at step" in err and "smaller --lr" in err and "nothing was kept" in err
    assert not out.exists()  # a failure removes what it wrote: no resumable state, so no folder


def test_divergence_keeps_the_last_good_state_and_resume_recovers(tmp_path: Path, twa):
    out = tmp_path / "run"
    common = ["--model", "mlp", "--batch-size", "64", "--per-epoch", "2", "--device", "cpu"]
    twa("sample", out, *common, "--epochs", "1", "--lr", "0.05")
    good = (out / STATE).read_bytes()
    before = {p.name for p in out.iterdir()}

    result = twa("sample", out, *common, "--epochs", "3", "--lr", "1e4", "--resume", check=False)
    err = result.stderr
    assert result.returncode == 1, err
    assert "diverged" in err and "epoch 1" in err and "--resume" in err
    assert (out / STATE).read_bytes() == good  # the last good state, untouched
    assert {p.name for p in out.iterdir()} == before  # the samples of the diverging epoch are gone with it
    for path in out.glob("ckpt-*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_tensors(path).values()), path

    twa("sample", out, *common, "--epochs", "2", "--lr", "0.01", "--resume")
    assert _epochs_done(out / STATE) == 2


def test_train_subspace_divergence_writes_no_result(tmp_path: Path, mlp_run: Path, twa):
    basis = _basis(mlp_run, tmp_path / "basis.safetensors")
    out = tmp_path / "twa"
    result = twa("train-subspace", basis, "-o", out, "--epochs", "2", "--lr", "1e9", "--no-lr-check",
                 "--select", "none",  # the fit's end: a default run keeps its best point instead
                 "--device", "cpu", check=False)
    err = result.stderr
    assert result.returncode == 1 and "Traceback" not in err
    assert "diverged" in err and "no result was written" in err and "nothing was kept" in err
    assert not out.exists()  # no epoch completed: nothing to resume, so nothing left behind
