"""`twa watch RUN -o OUT`: follow a run folder that a training job is still writing.

Every `interval` seconds it looks at RUN. A checkpoint whose files have not changed for `settle` seconds and that
reads whole is taken in: its trained tensors join the basis (the tensor core's `Orthogonalizer`: the basis
grows, it is never rebuilt), the rest join a running mean. After each look that took something in, SWA is
written again (`OUT/swa`, BatchNorm recomputed); every `every` new checkpoints, and when the watch ends, the
basis is written (`OUT/basis.safetensors`) and `twa train-subspace` trains in its span (`OUT/twa`, held-out
selection by default, so the center, SWA, is scored there too). Each such round is a line of `OUT/watch.jsonl`.

It ends when TWA's held-out figure reaches `target` (exit 0, for a CI job to stop the run), when no new checkpoint
came for `idle_exit` seconds, or after `polls` looks. What it took in is saved after each checkpoint
(`watch_state`): a watcher killed at any point resumes with `--resume`. A checkpoint still being written is
waited for; one deleted before it was read is forgotten; one that cannot be read once it has settled, or that
does not fit the run, is set aside with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from twa_cli.commands.common import (
    aligned,
    data_paths,
    hf_folder,
    knows_task,
    resolve_device,
    subspace_names,
    task_of,
)
from twa_cli.commands.runfolder import check_positive
from twa_cli.commands.swa import SwaRequest, SwaResult, recalibrated, write_average
from twa_cli.commands.train_subspace import SubspaceConfig, SubspaceResult, train_subspace
from twa_cli.commands.watch_files import SetAside, candidates, files_signature, not_a_checkpoint, read_once
from twa_cli.commands.watch_state import STATE_FILE, STATE_FOLDER, Signature, Taken
from twa_cli.core.basis import Basis, not_finite_tensor, subspace_layout
from twa_cli.core.basis_files import save_basis
from twa_cli.engine.orthogonalizer import NotFiniteRows, orthogonality_error
from twa_cli.errors import TwaError
from twa_cli.io.atomic import is_temp_name, remove_stale_temps, temp_name, through_link
from twa_cli.io.checkpoints import (
    Checkpoint,
    check_compatible,
    read_checkpoint,
)
from twa_cli.io.outputs import check_named, check_not_an_input
from twa_cli.io.writers import ResultTarget
from twa_cli.tasks.base import Task
from twa_cli.tasks.models import check_fits
from twa_cli.units import dtype_name, torch_dtype

log = logging.getLogger("twa")

LOG_FILE = "watch.jsonl"
# Looks after which a checkpoint whose files are still not all there (a shard set missing a shard) is reported.
INCOMPLETE_LOOKS = 10
BASIS_FILE = "basis.safetensors"


@dataclass
class WatchRequest:
    """How to follow the run; `subspace` is how each TWA round trains (its task names the data)."""

    subspace: SubspaceConfig = field(default_factory=SubspaceConfig)
    every: int = 4  # a TWA round after this many new checkpoints
    interval: float = 30.0  # seconds between looks at the run folder
    settle: float = 10.0  # a checkpoint unchanged this long (and readable) is complete
    idle_exit: float | None = None  # end after this long without a new checkpoint (None: never)
    target: float | None = None  # end (reached) once TWA's held-out figure is this good
    polls: int | None = None  # end after this many looks (None: no limit)
    swa: bool = True  # keep OUT/swa up to date

    def __post_init__(self) -> None:
        if self.every < 1:
            raise TwaError(f"--every must be at least 1 (got {self.every})")
        check_positive(self.interval, "--interval")
        if not (math.isfinite(self.settle) and self.settle >= 0):
            raise TwaError(f"--settle must be zero or a positive number of seconds (got {self.settle})")
        if self.idle_exit is not None:
            check_positive(self.idle_exit, "--idle-exit")
        if self.target is not None and not math.isfinite(self.target):
            raise TwaError(f"--target must be a finite number (got {self.target})")
        if self.polls is not None and self.polls < 1:
            raise TwaError(f"--polls must be at least 1 (got {self.polls})")
        if self.target is not None and not self.subspace.selecting:
            raise TwaError("--target is judged on the validation split: it needs --select val (the default)")


@dataclass
class Round:
    """One TWA round: the checkpoints spanned, the held-out figures of SWA (the center) and TWA, the point kept."""

    round: int
    checkpoints: int
    rank: int
    metric: str | None
    swa: float | None
    twa: float | None
    kept: str | None
    seconds: float
    output: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class WatchResult:
    out: Path
    checkpoints: int
    rounds: list[Round]
    ended: str  # target | idle | polls
    reached: bool
    set_aside: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.out), "checkpoints": self.checkpoints, "ended": self.ended,
                "reached": self.reached, "rounds": [r.to_dict() for r in self.rounds], "set_aside": self.set_aside}


class _Unreadable(Exception):
    """A checkpoint's files could not be read (yet): its cause says why."""


@dataclass
class _Pending:
    signature: Signature
    since: float
    failed: str | None = None  # why the last read failed (retried when the files change)


class Watcher:
    """The state of one watch: the run, what was taken in, the checkpoints waiting to settle."""

    def __init__(self, run: Path, out: Path, request: WatchRequest, taken: Taken | None,
                 clock: Callable[[], float], invocation: dict[str, Any] | None, aside: Path | None = None):
        self.run, self.out, self.request, self.taken = run, out, request, taken
        self.aside = aside  # the output an earlier watch wrote, set aside by --force
        self.clock, self.invocation = clock, invocation
        self.pending: dict[str, _Pending] = {}
        self.ignored: dict[str, Signature] = {}  # files of the tool's own (averages, a basis) met in the run
        self.incomplete: dict[str, int] = {}  # looks in a row a checkpoint's files were not all there
        self.task: Task | None = None
        self.net: torch.nn.Module | None = None
        self.first: Checkpoint | None = None
        self.last_new = clock()
        self.rounds: list[Round] = []
        self._said_basis_only = False

    # ------------------------------------------------------------------------------------ looking
    def look(self) -> int:
        """Take in every checkpoint that has settled; returns how many were."""
        now, new = self.clock(), 0
        looked: set[str] = set()
        for path in candidates(self.run):
            key = str(path.resolve())
            taken = self.taken
            if key in looked:
                continue  # a link beside the file it names is that checkpoint (else each resets the other's wait)
            looked.add(key)
            try:
                signature = files_signature(path)
            except (OSError, TwaError) as exc:  # deleted, or a shard set not all there yet
                self.pending.pop(key, None)
                self.incomplete[key] = self.incomplete.get(key, 0) + 1
                if self.incomplete[key] == INCOMPLETE_LOOKS and path.exists():  # said once, not every look
                    log.warning("%s: still incomplete after %d looks (%s); waiting for it", path, INCOMPLETE_LOOKS,
                                exc)
                continue
            self.incomplete.pop(key, None)
            if self.ignored.get(key) == signature or (taken is not None and taken.seen.get(key) == signature):
                continue
            # A name taken in before whose files changed is a new checkpoint: a loop that saves each epoch over
            # one model.pt, or a job restarted in the same folder. It settles and is taken in like any other.
            waiting = self.pending.get(key)
            if waiting is None or waiting.signature != signature:
                self.pending[key] = _Pending(signature, now)
                continue
            if now - waiting.since < self.request.settle or waiting.failed:
                continue
            try:
                new += self._take(path, key, signature)
            except _Unreadable as exc:
                if not path.exists():  # deleted under us
                    self.pending.pop(key, None)
                    continue
                # Settled but unreadable: a writer that died mid-file, or one that keeps the size and time while
                # it writes. Tried again when the files change; said once.
                waiting.failed = str(exc.__cause__)
                log.warning("%s: cannot be read (%s); waiting for it to change", path, exc.__cause__)
        seen = self.taken.seen if self.taken is not None else {}
        self.pending = {k: v for k, v in self.pending.items()
                        if seen.get(k) != v.signature and self.ignored.get(k) != v.signature}
        if new:
            self.last_new = now
        return new

    def _take(self, path: Path, key: str, signature: Signature) -> int:
        try:
            ckpt = read_checkpoint(path, self.request.subspace.read)
        except (OSError, TwaError) as exc:
            raise _Unreadable(exc) from exc
        other = not_a_checkpoint(ckpt)
        if other is not None:  # a file of the tool's own in the run folder: not the run's, not remembered
            log.info("%s: not taken in, %s", path, other)
            self.ignored[key] = signature
            return 0
        if self.taken is None:
            self._start(ckpt)
            if self.request.target is not None and not self._trains(warn=False):
                raise TwaError(f"{path}: --target needs TWA rounds, which need the model and its data: pass --model "
                               "and --data (no architecture or data is known for this run)")
        taken = self.taken
        assert taken is not None
        try:
            row, whole = read_once(ckpt, taken)
            try:
                taken.basis.add_block(row)  # refuses NaN or Inf before anything changes
            except NotFiniteRows as exc:
                raise SetAside(f"its {not_finite_tensor(row[0], taken.layout)} holds NaN or Inf") from exc
        except SetAside as exc:
            log.warning("%s: set aside, %s", path, exc)
            taken.seen[key], taken.set_aside[key] = signature, str(exc)
            taken.save(self.out)
            return 0
        except (OSError, TwaError) as exc:
            raise _Unreadable(exc) from exc
        for name, dtype in whole.dtypes.items():  # the widest precision each trained tensor came in, as `twa swa`
            taken.dtypes[name] = dtype_name(torch.promote_types(torch_dtype(taken.dtypes.get(name, dtype_name(dtype))),
                                                                dtype))
        taken.others.add(whole.others, where=f"{path}: ")
        taken.sources.append(whole.source)
        taken.seen[key] = signature
        taken.save(self.out)
        self.settle_aside()
        log.info("%s: taken in (%d checkpoints, rank %d)", path, taken.count, taken.basis.rank)
        return 1

    def _start(self, first: Checkpoint) -> None:
        """The first checkpoint fixes the subspace's layout (the model's trained tensors) and the task."""
        self.first = first
        request = self.request.subspace.task
        names, _ = subspace_names(request, [first])
        layout = subspace_layout([first], names)
        recorded = dict(first.task_fields())
        folder = hf_folder(first)
        if folder is not None and not recorded:
            recorded["hf"] = {"dir": str(folder.resolve()), "auto_class": None}
        check_not_an_input(self.out, data_paths(request, first), folder=True)  # the data recorded is an input too
        self.taken = Taken.new(self.run.resolve(), layout, self.request.subspace.tol, recorded)

    def settle_aside(self) -> None:
        """The output --force set aside: removed once the new one exists, else put back."""
        if self.aside is None:
            return
        if self.out.exists():
            shutil.rmtree(self.aside, ignore_errors=True)
        else:
            os.rename(self.aside, self.out)
        self.aside = None

    # ------------------------------------------------------------------------------------ writing
    def due(self, ending: bool) -> bool:
        taken = self.taken
        if taken is None or taken.basis.rank == 0 or taken.count == taken.fitted_at:
            return False
        return ending or taken.count - taken.fitted_at >= self.request.every

    def write_swa(self) -> SwaResult | None:
        """The uniform average of everything taken in (the basis's center on the trained tensors)."""
        taken = self.taken
        if not self.request.swa or taken is None or taken.basis.rank == 0:
            return None
        first = self._first()
        target = ResultTarget(self.out / ("swa" if first.path.is_dir() else "swa.safetensors"), None,
                              taken.model_folder())
        average = taken.average()
        request = SwaRequest(task=self.request.subspace.task, bn_batches=self.request.subspace.bn_batches,
                             bn_update=self.request.subspace.bn_update, device=self.request.subspace.device)
        task, net = self._model(first)
        device = resolve_device(self.request.subspace.device)
        average, bn, test = recalibrated(net, task, average, request, device)
        result = SwaResult(target.path, [Path(s.path) for s in taken.sources], bn, test)
        return write_average(target, average, result, request, task=task, first=first, sources=taken.sources,
                             trainable=[n for n, _ in taken.layout], coefficients=[1.0 / taken.count] * taken.count,
                             force=True, invocation=self.invocation, command="watch")

    def fit(self, reporter: Any = None) -> Round:
        """Write the basis as it is and train in its span (`train-subspace` on the basis file)."""
        taken = self.taken
        assert taken is not None
        started = time.monotonic()
        basis = Basis(vectors=taken.basis.vectors, coords=taken.basis.coords.clone(), layout=taken.layout,
                      buffers=taken.others_mean(), sources=list(taken.sources),
                      dropped=[{"index": d.index, "path": taken.sources[d.index].path,
                                "relative_residual": d.relative_residual} for d in taken.basis.dropped],
                      recorded=taken.recorded_now())
        basis.errors["orthogonality"] = orthogonality_error(basis.vectors)
        save_basis(basis, self.out / BASIS_FILE, invocation=self.invocation)
        found: tuple[str | None, float | None, float | None, str | None] = (None, None, None, None)
        output = self.out / BASIS_FILE  # without the model and its data, a round is the basis alone
        if self._trains():
            result = train_subspace(self.out / BASIS_FILE, self.out / "twa", self.request.subspace, force=True,
                                    reporter=reporter, invocation=self.invocation)
            assert isinstance(result, SubspaceResult)
            found, output = _figures(result), result.out
        taken.rounds += 1
        taken.fitted_at = taken.count
        taken.save(self.out)
        seconds = round(time.monotonic() - started, 2)
        return self._logged(Round(taken.rounds, taken.count, taken.basis.rank, *found, seconds=seconds,
                                  output=str(output)))

    def _logged(self, round_: Round) -> Round:
        self.rounds.append(round_)
        with open(self.out / LOG_FILE, "a", encoding="utf-8") as fh:  # a log: a torn last line is only a lost line
            fh.write(json.dumps(round_.to_dict()) + "\n")
        return round_

    def _trains(self, warn: bool = True) -> bool:
        """Whether a round can train: the model and its data are known (else it writes the basis only, for a
        later `twa train-subspace BASIS --model ... --data ...`; said once)."""
        task, _ = self._model(self._first())
        if task is not None and task.has_data:
            return True
        if warn and not self._said_basis_only:
            log.warning("%s: no architecture or data known (--model, --data): each round writes the basis only, "
                        "TWA needs them to train", self.run)
            self._said_basis_only = True
        return False

    def reached(self, round_: Round) -> bool:
        target = self.request.target
        if target is None or round_.twa is None or round_.metric is None:
            return False
        return round_.twa >= target if round_.metric.startswith("max:") else round_.twa <= target

    def _first(self) -> Checkpoint:
        """A checkpoint of the run that is still there (for its config files and metadata): the first taken in,
        else the newest still on disk."""
        if self.first is not None and self.first.path.exists():
            return self.first
        taken = self.taken
        assert taken is not None
        for source in reversed(taken.sources):
            if Path(source.path).exists():
                self.first = read_checkpoint(source.path, self.request.subspace.read)
                return self.first
        raise TwaError(f"{self.run}: every checkpoint taken in was deleted, so the model's files are gone; "
                       "nothing to write the average with")

    def _model(self, first: Checkpoint) -> tuple[Task | None, torch.nn.Module | None]:
        if self.net is None and knows_task(self.request.subspace.task, first):
            self.task = task_of(self.request.subspace.task, first, need_data=False)
            net = self.task.build_model()
            aligned([first], net)
            check_fits(net, check_compatible([first]).shapes, str(first.path))
            self.net = net
        return self.task, self.net


def watch(run: str | Path, out: str | Path, request: WatchRequest | None = None, *, resume: bool = False,
          force: bool = False, clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep, reporter: Any = None,
          on_round: Callable[[Round], None] | None = None,
          invocation: dict[str, Any] | None = None) -> WatchResult:
    """Follow `run` (see the module's docstring) and write SWA, the basis and TWA into `out`."""
    request = request or WatchRequest()
    run, out = Path(run), Path(out)
    if not run.is_dir():
        raise TwaError(f"{run}: not a folder (twa watch follows the folder a run writes its checkpoints into)")
    check_named(out)
    out = through_link(out)  # a link to a folder: that folder is the output (--force replaces it, the link stays)
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise TwaError(f"{out}: cannot be created, {blocking} is a file")
    # The data the flags name, and the data a checkpoint already there records, are inputs: checked before the
    # lock file or any folder is made beside OUT (the first checkpoint to come is checked again when taken in).
    check_not_an_input(out, [run, *data_paths(request.subspace.task, _first_readable(run, request))], folder=True)
    if out.exists() and not out.is_dir():
        raise TwaError(f"{out}: is a file; the output of twa watch is a folder")
    made = [p for p in reversed(out.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_file = out.with_name(f".{out.name}.lock")
    lock = FileLock(lock_file, timeout=0)
    try:
        lock.acquire()
    except Timeout as exc:
        raise TwaError(f"{out}: another twa watch is writing there; choose another output") from exc
    watcher = None
    try:
        remove_stale_temps(out)  # an old output a killed --force set aside comes back first
        taken, aside = _claim(run, out, resume=resume, force=force)
        watcher = Watcher(run, out, request, taken, clock, invocation, aside)
        return _follow(watcher, sleep, reporter, on_round)
    finally:
        if watcher is not None:
            watcher.settle_aside()
        lock.release()
        if not out.exists():  # nothing was written: nothing is left, the lock file and the folders made for it
            lock_file.unlink(missing_ok=True)
            for folder in reversed(made):
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _first_readable(run: Path, request: WatchRequest) -> Checkpoint | None:
    """The first of the run's checkpoints whose header reads now, if any (for the data it records)."""
    for path in candidates(run):
        with contextlib.suppress(OSError, TwaError):
            return read_checkpoint(path, request.subspace.read)
    return None


def _follow(watcher: Watcher, sleep: Callable[[float], None], reporter: Any,
            on_round: Callable[[Round], None] | None) -> WatchResult:
    request, clock = watcher.request, watcher.clock
    polls = 0
    while True:
        polls += 1
        if watcher.look() and watcher.taken is not None:
            watcher.write_swa()
        if watcher.due(ending=False):
            round_ = watcher.fit(reporter)
            if on_round is not None:
                on_round(round_)
            if watcher.reached(round_):
                return _result(watcher, "target", True)
        idle = request.idle_exit is not None and clock() - watcher.last_new >= request.idle_exit
        if idle or (request.polls is not None and polls >= request.polls):
            if watcher.due(ending=True):
                round_ = watcher.fit(reporter)
                if on_round is not None:
                    on_round(round_)
            reached = bool(watcher.rounds) and watcher.reached(watcher.rounds[-1])
            return _result(watcher, "idle" if idle else "polls", reached)
        sleep(request.interval)


def _claim(run: Path, out: Path, *, resume: bool, force: bool) -> tuple[Taken | None, Path | None]:
    """The output folder checked: with `resume`, what an earlier watcher of the same run took in; with `force`,
    the earlier watch's folder set aside (removed once the new one holds a checkpoint, put back if it never
    does)."""
    state = out / STATE_FOLDER / STATE_FILE
    if resume:
        if not state.exists():
            raise TwaError(f"{out}: nothing to resume (no {STATE_FOLDER}/{STATE_FILE}); run without --resume")
        taken = Taken.load(out)
        if Path(taken.run) != run.resolve():
            raise TwaError(f"{out}: was watching {taken.run}, not {run.resolve()}; resume with the same run")
        return taken, None
    if out.exists() and any(out.iterdir()):
        if not force:
            raise TwaError(f"{out}: already exists and is not empty (pass --force to start over"
                           f"{', --resume to continue' if state.exists() else ''})")
        foreign = _not_a_watchs(out)
        if foreign is not None:
            raise TwaError(f"{out}: holds {foreign.name}, which twa watch did not write; --force replaces only a "
                           "watch's folder")
        aside = temp_name(out, "old")
        os.rename(out, aside)
        return None, aside
    return None, None  # OUT is made when the first checkpoint is taken in, once the data it names is checked too


WRITTEN = (LOG_FILE, STATE_FOLDER, BASIS_FILE, "swa", "swa.safetensors", "swa.safetensors.index.json", "twa",
           "twa.partial")


def _not_a_watchs(out: Path) -> Path | None:
    """The first entry of `out` that a watch does not write (its log, state, basis, SWA, TWA, their
    temporaries, a lock), or None."""
    return next((p for p in sorted(out.iterdir()) if not (p.name in WRITTEN or is_temp_name(p.name)
                                                          or p.name.endswith(".lock"))),
                None)


def _result(watcher: Watcher, ended: str, reached: bool) -> WatchResult:
    taken = watcher.taken
    return WatchResult(watcher.out, taken.count if taken else 0, watcher.rounds, ended, reached,
                       dict(taken.set_aside) if taken else {})


# ---------------------------------------------------------------------------------------------- helpers


def _figures(result: SubspaceResult) -> tuple[str | None, float | None, float | None, str | None]:
    """(metric, SWA's figure, TWA's figure, the point kept) from a round's validation record."""
    validation = result.validation
    if validation is None:
        return None, None, None, None
    name = validation.metric.split(":", 1)[1]
    center = next((p.figures.get(name) for p in validation.points if p.label == "center"), None)
    kept = [p for p in validation.points if p.kept]
    return validation.metric, center, kept[-1].figures.get(name) if kept else None, validation.kept

