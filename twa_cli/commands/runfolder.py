"""The folder a training command (`sample`, `train-subspace`) writes as it goes, and leaves resumable.

A new run folder is claimed exclusively: of two processes starting the same run, the second fails. A lock on
the result's name, held from the claim until the result is in place, covers an existing empty folder,
resuming, and `--force` too (whichever of `OUT` and `OUT.partial` a run writes in). It is a file lock
(`filelock`, so on every OS) on `.OUT.lock` beside the folder, which stays there, empty, after the run; where
that folder's parent cannot be written, on `OUT/.twa.lock` inside it. `--force` over a finished run builds the
new one beside it, in `OUT.partial`, and swaps it in whole when it completes, so a failure leaves the old
result as it was; `--resume` continues in whichever folder holds the newest state. A run that fails before its
first epoch is saved leaves nothing: the folder it created is removed. After that, the state of the last
completed epoch stays for `--resume`, and the error says so. An output that is a symbolic link to a folder is
written through the link (the folder it names is the result's; the link stays).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from filelock import FileLock, Timeout

from twa_cli.errors import TwaError
from twa_cli.io.atomic import is_temp_name, remove_stale_temps, swap_in_folder, through_link
from twa_cli.io.outputs import check_named, check_not_an_input
from twa_cli.io.runfiles import STATE_FILE, partial_folder


class RunFolder:
    """`path` is where the result goes; `work` where this run writes (the same, or `path.partial` under --force).
    `ours(file)` says whether a file in an existing `path` is one the command writes (--force replaces only
    such a folder)."""

    def __init__(self, path: Path, *, resume: bool, force: bool, inputs: Iterable[str | Path] = (),
                 ours: Callable[[Path], bool] = lambda path: False):
        given = Path(os.path.abspath(path))  # '.' has no name to put '.partial' after
        check_named(given)
        self.path = through_link(given)  # a link to a folder: that folder is replaced, the link stays
        check_named(self.path, f"{path} (a link to {self.path})")
        self.partial = partial_folder(self.path)
        self.created = False
        self._lock: FileLock | None = None
        self._lock_file = _lock_file(self.path)
        if self._lock_file.exists():  # said first, before anything about the folder or the options (checked again)
            self._take_lock()
            self._unlock()
        for folder in (self.path, self.partial):
            blocking = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
            if blocking is not None:
                raise TwaError(f"{folder}: cannot be created, {blocking} is a file")
            if folder.exists() and not folder.is_dir():
                raise TwaError(f"{folder}: is a file; the output is a folder")
            check_not_an_input(folder, inputs, folder=True)
        if resume:
            work = next((f for f in (self.partial, self.path) if (f / STATE_FILE).exists()), None)  # newest first
            if work is None:
                raise TwaError(self._nothing_to_resume())
            self.work = work
        elif self.path.exists() and any(not _bookkeeping(p) for p in self.path.iterdir()):
            if not force:
                # --resume is offered only where it would find a state to continue from.
                can_resume = any((f / STATE_FILE).exists() for f in (self.partial, self.path))
                raise TwaError(f"{self.path}: already exists and is not empty (pass --force to overwrite"
                               f"{', --resume to continue' if can_resume else ''})")
            foreign = next((p for p in sorted(self.path.iterdir()) if not _bookkeeping(p) and not ours(p)), None)
            if foreign is not None:
                raise TwaError(f"{self.path}: holds {foreign.name}, which this command did not write; --force replaces "
                               "only a folder it wrote")
            if Path.cwd() == self.path or self.path in Path.cwd().parents:
                raise TwaError(f"{path}: is the working folder (or holds it), which --force cannot replace; run "
                               "from another folder")
            self.work = self.partial  # built beside the old result, swapped in whole at the end
        else:
            self.work = self.path
        self.state = self.work / STATE_FILE
        self._existed = self.work.exists()

    def check_not_inside(self, inputs: Iterable[str | Path]) -> None:
        """Inputs known only once the task is resolved (its data): the result is not written into or over them."""
        for folder in dict.fromkeys((self.path, self.work)):
            check_not_an_input(folder, inputs, folder=True)

    def _nothing_to_resume(self) -> str:
        if self.path.exists() and any(not _bookkeeping(p) for p in self.path.iterdir()):
            return (f"{self.path}: nothing to resume (no {STATE_FILE}: the run there finished, or stopped before "
                    "its first epoch was saved); start it again with --force instead of --resume")
        return f"{self.path}: nothing to resume (no {STATE_FILE}); run without --resume"

    def claim(self) -> None:
        """Lock the result's name, then create the working folder (exclusively when it is new), once every input
        is checked."""
        if not self._existed and (self.work.exists() or self.work.is_symlink()):
            raise TwaError(f"{self.work}: created by another process meanwhile; choose another output")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            remove_stale_temps(self.path)  # a folder a killed replacement set aside comes back first
            if self.work == self.partial and self.work.exists() and not (self.work / STATE_FILE).exists():
                shutil.rmtree(self.work)  # what an earlier --force run left before its first epoch
                self._existed = False
            if not self._existed:
                try:
                    self.work.mkdir()
                except FileExistsError as exc:
                    raise TwaError(f"{self.work}: created by another process meanwhile; choose another "
                                   "output") from exc
                self.created = True
        except BaseException:
            self._unlock()
            raise

    def finish(self) -> Path:
        """After the run completed: the result in its place (swapped in whole from `OUT.partial`); unlocked."""
        try:
            if self.work == self.partial:
                swap_in_folder(self.partial, self.path, exclusive=False)
                self.work, self.state = self.path, self.path / STATE_FILE
        finally:
            self._unlock()
        return self.path

    def abandon(self) -> bool:
        """After a failure: remove the folder this run created if nothing in it can be resumed. Returns whether
        it was removed."""
        try:
            if self.created and not self.state.exists() and self.work.exists():
                shutil.rmtree(self.work, ignore_errors=True)
                return True
            return False
        finally:
            self._unlock()

    def _take_lock(self) -> None:
        lock = FileLock(self._lock_file, timeout=0)
        try:
            lock.acquire()
        except Timeout as exc:
            raise TwaError(f"{self.path}: another twa process is writing this run; choose another output") from exc
        self._lock = lock

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


# Inside a run folder whose parent cannot be written: the lock's file (bookkeeping, never part of a result).
INNER_LOCK = ".twa.lock"


def _lock_file(path: Path) -> Path:
    """The file whose lock stands for the result's name `path`: `.NAME.lock` beside it, or, where its parent
    cannot be written (a mount point), inside it (that folder must exist then: nothing can be created beside
    it). Every process picks the same one."""
    parent = next((p for p in path.parents if p.exists()), path.parent)
    if path.is_dir() and not os.access(parent, os.W_OK):
        return path / INNER_LOCK
    return path.with_name(f".{path.name}.lock")


def _bookkeeping(path: Path) -> bool:
    """The temporaries of a killed write, and the lock: files of the tool's own that mean no result."""
    return path.name == INNER_LOCK or (is_temp_name(path.name) and path.name.endswith(".tmp"))


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
