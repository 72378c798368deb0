"""The folder a training command (`sample`, `train-subspace`) writes as it goes, and leaves resumable.

A new run folder is claimed exclusively (of two processes starting the same run, the second fails). A run that
fails before its first epoch is saved leaves nothing: the folder it created is removed. After that, the state
of the last completed epoch stays for `--resume`, and the error says so.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable
from pathlib import Path

from twa_cli.errors import TwaError
from twa_cli.io.outputs import check_not_an_input
from twa_cli.io.runfiles import STATE_FILE


class RunFolder:
    def __init__(self, path: Path, *, resume: bool, force: bool, inputs: Iterable[str | Path] = ()):
        self.path = Path(path)
        self.state = self.path / STATE_FILE
        self.resume = resume
        self.created = False
        blocking = next((p for p in self.path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise TwaError(f"{self.path}: cannot be created, {blocking} is a file")
        if self.path.exists() and not self.path.is_dir():
            raise TwaError(f"{self.path}: is a file; the output is a folder")
        check_not_an_input(self.path, inputs, folder=True)
        if resume:
            if not self.state.exists():
                raise TwaError(f"{self.path}: nothing to resume (no {STATE_FILE}); run without --resume")
        elif self.path.exists() and any(self.path.iterdir()) and not force:
            raise TwaError(f"{self.path}: already exists and is not empty (pass --force to overwrite, --resume to "
                           "continue)")

    def claim(self) -> None:
        """Create the folder (exclusively when it is new), once every input has been checked."""
        if self.path.exists():
            return
        try:
            self.path.mkdir(parents=True)
        except FileExistsError as exc:
            raise TwaError(f"{self.path}: created by another process meanwhile; choose another output") from exc
        self.created = True

    def abandon(self) -> bool:
        """After a failure: remove the folder this run created if nothing in it can be resumed. Returns whether
        it was removed."""
        if self.created and not self.state.exists() and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
            return True
        return False


def check_positive(value: float, flag: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise TwaError(f"{flag} must be a positive number (got {value})")


def check_non_negative(value: float, flag: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise TwaError(f"{flag} must be zero or a positive number (got {value})")


def check_momentum(value: float) -> None:
    if not (math.isfinite(value) and 0 <= value < 1):
        raise TwaError(f"--momentum must be in [0, 1) (got {value})")


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2**63:
        raise TwaError(f"--seed must be between 0 and 2^63 - 1 (got {seed})")


def check_count(value: int, flag: str) -> None:
    if value < 1:
        raise TwaError(f"{flag} must be at least 1 (got {value})")
