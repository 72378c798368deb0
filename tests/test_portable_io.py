"""Whole-or-nothing writes and run locks without the Linux-only calls (O_TMPFILE + linkat, renameat2 through
ctypes, fcntl), as on macOS and Windows: the calls are switched off here and the same guarantees are checked."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import snapshot

from twa_cli.errors import TwaError
from twa_cli.io import atomic
from twa_cli.io.checkpoints import list_folder, load_tensors


@pytest.fixture
def no_linux_calls(monkeypatch):
    """No O_TMPFILE, linkat nor renameat2: files go through named temporaries, folders through two renames."""
    monkeypatch.setattr(atomic, "_LINUX", False)

    def no_ctypes():
        raise AssertionError("a Linux-only call was made")

    monkeypatch.setattr(atomic, "_libc", no_ctypes)


@pytest.fixture
def no_hard_links(monkeypatch):
    """A file system without hard links (FAT, exFAT, some network mounts): link(2) fails with EPERM."""

    def refused(src, dst, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))

    monkeypatch.setattr(atomic.os, "link", refused)


def _windows_rename(monkeypatch):
    """Windows' os.rename: never replaces an existing name (FileExistsError), files and folders alike."""
    real = os.rename

    def rename(src, dst, *args, **kwargs):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "Cannot create a file when that file already exists", str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(atomic, "_WINDOWS", True)
    monkeypatch.setattr(atomic.os, "rename", rename)


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("links", [True, False])
def test_a_new_file_is_taken_exclusively_without_linux_calls(tmp_path, no_linux_calls, monkeypatch, links):
    if not links:
        _windows_rename(monkeypatch)
        monkeypatch.setattr(atomic.os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no")))
    path = tmp_path / "out.bin"
    atomic.write_bytes(path, b"first", exclusive=True)
    with pytest.raises(TwaError, match="already exists"):
        atomic.write_bytes(path, b"second", exclusive=True)
    assert path.read_bytes() == b"first"
    atomic.write_bytes(path, b"third")  # --force: replaced
    assert path.read_bytes() == b"third" and _files(tmp_path) == ["out.bin"]


def test_without_hard_links_linux_takes_a_new_name_with_renameat2(tmp_path, no_hard_links, monkeypatch):
    monkeypatch.setattr(atomic, "_open_unnamed", lambda folder: -1)  # no O_TMPFILE either: named temporaries
    path = tmp_path / "out.bin"
    atomic.write_bytes(path, b"first", exclusive=True)
    with pytest.raises(TwaError, match="already exists"):
        atomic.write_bytes(path, b"second", exclusive=True)
    assert path.read_bytes() == b"first" and _files(tmp_path) == ["out.bin"]


def test_where_no_name_can_be_taken_exclusively_the_write_is_refused_in_one_line(mlp_run, tmp_path, twa,
                                                                                  no_linux_calls, no_hard_links):
    out = tmp_path / "avg.safetensors"
    result = twa("swa", mlp_run, "-o", out, "--no-bn-update", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and str(out) in lines[0] and "--force" in lines[0], result.stderr
    assert _files(tmp_path) == []
    twa("swa", mlp_run, "-o", out, "--no-bn-update", "--force")  # replacing is possible: os.replace
    assert _files(tmp_path) == ["avg.safetensors"]


@pytest.mark.parametrize("windows", [False, True])
def test_folder_results_are_placed_and_replaced_whole_without_linux_calls(mlp_run, tmp_path, twa, no_linux_calls,
                                                                          monkeypatch, windows):
    if windows:
        _windows_rename(monkeypatch)
    out = tmp_path / "hf"
    twa("swa", mlp_run, "-o", out, "--no-bn-update", "--end", "2")
    first = snapshot(out)
    refused = twa("swa", mlp_run, "-o", out, "--no-bn-update", check=False)
    assert refused.returncode == 1 and "already exists" in refused.stderr
    twa("swa", mlp_run, "-o", out, "--no-bn-update", "--force")
    assert snapshot(out) != first and _files(tmp_path) == ["hf"]
    ckpts = list_folder(mlp_run)
    expected = sum(load_tensors(c.path)["net.1.weight"].double() for c in ckpts) / len(ckpts)
    assert load_tensors(out / "model.safetensors")["net.1.weight"].double().sub(expected).abs().max() < 1e-6


def test_a_replacement_that_fails_between_the_two_renames_puts_the_old_folder_back(tmp_path, no_linux_calls,
                                                                                    monkeypatch):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    real = os.rename
    calls = []

    def second_fails(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EACCES, "Permission denied", str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "rename", second_fails)
    with pytest.raises(OSError), atomic.staged_folder(out, exclusive=False) as staging:
        (staging / "model.safetensors").write_bytes(b"new")
    assert _files(tmp_path) == ["hf"] and (out / "model.safetensors").read_bytes() == b"old"


@pytest.mark.parametrize("new_in_place", [False, True])
def test_a_folder_a_killed_replacement_set_aside_comes_back(tmp_path, new_in_place):
    """kill -9 between the two renames leaves `.NAME.twa-<pid>-<random>.old` (the old result) and perhaps no `NAME`:
    the next write of that name puts the old folder back, or, when the new one was placed, removes it."""
    out = tmp_path / "hf"
    aside = tmp_path / f".hf.twa-{_dead_pid()}-0badc0de.old"
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"old")
    if new_in_place:
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"new")
    atomic.remove_stale_temps(out)
    assert _files(tmp_path) == ["hf"]
    assert (out / "model.safetensors").read_bytes() == (b"new" if new_in_place else b"old")


def test_another_process_s_temporaries_are_never_probed_with_kill_on_windows(tmp_path, monkeypatch):
    """On Windows os.kill(pid, 0) terminates the process: a temporary of another pid is kept there."""
    monkeypatch.setattr(atomic, "_WINDOWS", True)

    def kill(*args):
        raise AssertionError("os.kill called")

    monkeypatch.setattr(atomic.os, "kill", kill)
    stale = tmp_path / f".out.bin.twa-{_dead_pid()}-00000000.tmp"
    stale.write_bytes(b"x")
    atomic.write_bytes(tmp_path / "out.bin", b"new")
    assert stale.exists()


def test_only_the_tool_s_own_dead_temporaries_are_removed(mlp_run, tmp_path, twa):
    """Files of the user's named like a temporary beside the output (`.NAME.<anything>.tmp` or `.old`) were
    removed, or (an `.old` folder) renamed onto the output: only names the tool writes (`.NAME.twa-<pid>-<8 hex>`)
    of a process no longer running are its own."""
    dead = _dead_pid()
    out = tmp_path / "avg.safetensors"
    users = [".avg.safetensors.backup.tmp", f".avg.safetensors.{dead}-0badc0de.tmp", ".avg.safetensors.twa-x.tmp",
             f".avg.safetensors.twa-{dead}-0badc0de-copy.tmp"]
    for name in users:
        (tmp_path / name).write_bytes(b"mine")
    (tmp_path / ".hf.notes.old").mkdir()
    (tmp_path / ".hf.notes.old" / "keep.txt").write_bytes(b"mine")
    stale = tmp_path / f".avg.safetensors.twa-{dead}-0badc0de.tmp"
    stale.write_bytes(b"left by a kill")
    twa("swa", mlp_run, "-o", out, "--no-bn-update", "--quiet")
    atomic.remove_stale_temps(tmp_path / "hf")  # the folder is missing: only its own aside folder comes back
    assert not stale.exists() and out.is_file() and not (tmp_path / "hf").exists()
    assert all((tmp_path / name).read_bytes() == b"mine" for name in users)
    assert (tmp_path / ".hf.notes.old" / "keep.txt").read_bytes() == b"mine"


def test_force_never_takes_a_user_s_dot_tmp_file_in_a_run_folder_for_the_tool_s(tmp_path):
    """A run folder --force may replace holds only what the command writes: a `.notes.tmp` of the user's is not
    a temporary of a killed write."""
    from twa_cli.commands.runfolder import RunFolder

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    (out / ".notes.tmp").write_text("mine")
    with pytest.raises(TwaError, match=r"\.notes\.tmp"):
        RunFolder(out, resume=False, force=True, ours=lambda p: p.name == "metrics.jsonl")


_NO_FCNTL = """
import sys
sys.modules["fcntl"] = None  # as on Windows: any import of fcntl fails
import twa_cli.io.atomic as atomic
atomic._LINUX = False
from twa_cli.cli import main
main(sys.argv[1:])
"""


def test_sample_and_train_subspace_run_and_replace_whole_without_fcntl_nor_linux_calls(mlp_run, tmp_path):
    """The commands that lock a run folder, in a process where fcntl cannot be imported (filelock's portable
    lock) and the ctypes calls are off: a new run, then --force over it, swapped in whole."""
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}

    def twa(*args: object) -> None:
        proc = subprocess.run([sys.executable, "-c", _NO_FCNTL, *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run, out = tmp_path / "run", tmp_path / "twa"
    common = ["--model", "mlp", "--batch-size", "64", "--device", "cpu"]
    twa("sample", run, *common, "--epochs", "1")
    twa("sample", run, *common, "--epochs", "2", "--force")
    assert len(list_folder(run)) == 3
    twa("train-subspace", mlp_run, "-o", out, "--epochs", "1", "--device", "cpu", "--end", "4")
    twa("train-subspace", mlp_run, "-o", out, "--epochs", "1", "--device", "cpu", "--force")
    assert len(load_tensors(out / "basis.safetensors")) >= 1
    assert not any(p.name.endswith((".partial", ".old", ".tmp")) for p in tmp_path.iterdir()), _files(tmp_path)
