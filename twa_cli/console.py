"""Terminal output: the only module that imports rich.

Summaries go to stdout, everything else (logs, warnings, progress) to stderr. Progress bars and colour only
when both stdout and stderr are terminals and NO_COLOR is unset, so CI logs and pipes get plain lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from twa_cli.training import EpochStats


def _plain() -> bool:
    return bool(os.environ.get("NO_COLOR")) or not sys.stderr.isatty() or not sys.stdout.isatty()


# Piped tables (`twa inspect | grep`) get room for file names instead of rich's 80 columns.
_PIPE_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
out = Console(no_color=bool(os.environ.get("NO_COLOR")), highlight=False, soft_wrap=True, width=_PIPE_WIDTH)
err = Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")), highlight=False, soft_wrap=True)


class Settings:
    quiet = False
    json = False


settings = Settings()


def setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("twa")
    logger.handlers.clear()
    if _plain():
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    else:
        handler = RichHandler(console=err, show_time=False, show_path=False, markup=False)
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR if quiet else logging.INFO)


def info(message: str) -> None:
    if not settings.quiet:
        err.print(message, markup=False)


def error(message: str) -> None:
    err.print(f"error: {message}", markup=False, style="red")


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    if settings.quiet:
        return
    t = Table(title=title, title_justify="left")
    for c in columns:
        left = c in ("", "model", "file", "checkpoint")
        t.add_column(c, justify="left" if left else "right", overflow="fold" if left else "ellipsis")
    for row in rows:
        t.add_row(*[_cell(v) for v in row])
    out.print(t)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


class TrainingReporter:
    """Progress of the training loop: a rich bar on a terminal, one line per epoch otherwise."""

    def __init__(self, label: str):
        self.label = label
        self.progress: Progress | None = None
        self.task: Any = None

    def epoch_started(self, epoch: int, epochs: int, batches: int) -> None:
        if settings.quiet or _plain():
            return
        if self.progress is None:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), console=err, transient=True,
            )
            self.progress.start()
        description = f"{self.label} epoch {epoch + 1}/{epochs}"
        if self.task is None:
            self.task = self.progress.add_task(description, total=batches)
        else:
            self.progress.reset(self.task, total=batches, description=description)

    def batch_done(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def epoch_done(self, stats: EpochStats) -> None:
        if settings.quiet:
            return
        parts = [f"{self.label} epoch {stats.epoch}", f"lr {stats.lr:.4g}", f"train loss {stats.train_loss:.4f}",
                 f"train acc {stats.train_acc:.2f}%"]
        if "test_acc" in stats.extra:
            parts.append(f"test acc {stats.extra['test_acc']:.2f}%")
        parts.append(f"{stats.seconds:.1f}s")
        line = "  ".join(parts)
        if self.progress is not None:
            self.progress.console.print(line, markup=False)
        else:
            err.print(line, markup=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@contextmanager
def training_progress(label: str) -> Iterator[TrainingReporter]:
    reporter = TrainingReporter(label)
    try:
        yield reporter
    finally:
        reporter.close()


@contextmanager
def file_progress(label: str) -> Iterator[Any]:
    """A callback (done, total) for per-file work such as orthogonalizing or averaging."""
    if settings.quiet or _plain():
        yield None
        return
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                  transient=True) as progress:
        task = progress.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update
