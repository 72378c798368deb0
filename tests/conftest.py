"""Shared fixtures: the one `twa` command runner, and tiny runs on the bundled digits data, made once per
test session."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import tiny_run


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def _invoke(*args: object, check: bool = True) -> Run:
    """`twa ARGS` in this process (no interpreter start-up): its exit code, stdout and stderr."""
    from twa_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if check and code != 0:
        raise AssertionError(f"twa {' '.join(map(str, args))} failed ({code}):\n{err.getvalue()}")
    return Run(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def twa():
    """The `twa` command, run in this process: `twa("swa", folder, "-o", out)` -> Run (raises unless it exits 0;
    pass check=False to look at a failure)."""
    return _invoke


@pytest.fixture(autouse=True)
def _plain_output(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")


@pytest.fixture(scope="session")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small-cnn on digits: 3 epochs, 2 samples per epoch, plus the initial weights (7 checkpoints)."""
    return tiny_run(tmp_path_factory.mktemp("cnn") / "ckpts")


@pytest.fixture(scope="session")
def mlp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("mlp") / "ckpts", model="mlp", epochs=2, per_epoch=3)
