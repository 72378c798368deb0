"""Terminal output: the only module that imports rich.

Summaries go to stdout, everything else (logs, warnings, progress) to stderr. Progress bars and colour only
when both stdout and stderr are terminals and NO_COLOR is unset, so CI logs and pipes get plain lines. Every
string a user gave (paths, flags, names) is printed literally: no markup, no emoji codes.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from twa_cli.units import json_dumps


def _plain() -> bool:
    return bool(os.environ.get("NO_COLOR")) or not sys.stderr.isatty() or not sys.stdout.isatty()


def _console(stderr: bool) -> Console:
    # Piped tables (`twa inspect | grep`) get room for file names instead of rich's 80 columns.
    width = None if stderr or sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    return Console(stderr=stderr, no_color=bool(os.environ.get("NO_COLOR")), highlight=False, soft_wrap=True,
                   emoji=False, markup=False, width=width)


@dataclass
class Output:
    """Where a command's output goes, and how much of it (one per invocation, passed, not global)."""

    json: bool = False
    quiet: bool = False
    silent: bool = False  # a rank of a torchrun job other than 0: it prints only errors

    def __post_init__(self) -> None:
        self.out = _console(stderr=False)
        self.err = _console(stderr=True)

    def info(self, message: str) -> None:
        if not (self.quiet or self.json or self.silent):
            self.err.print(message, markup=False, emoji=False)

    def error(self, message: str) -> None:
        self.err.print(Text(f"error: {message}", style="red"))

    def emit_json(self, obj: Any) -> None:
        if self.silent:
            return
        sys.stdout.write(json_dumps(obj, indent=2, default=str) + "\n")
        sys.stdout.flush()

    def line(self, text: str) -> None:
        """A plain line on stdout (a path a script may capture)."""
        if not (self.quiet or self.json or self.silent):
            self.out.print(text, markup=False, emoji=False)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if self.quiet or self.json or self.silent:
            return
        t = Table(title=Text(title), title_justify="left")
        for c in columns:
            left = c in ("", "model", "file", "checkpoint")
            t.add_column(Text(c), justify="left" if left else "right", overflow="fold" if left else "ellipsis")
        for row in rows:
            t.add_row(*[Text(_cell(v)) for v in row])
        self.out.print(t)

    def training_progress(self, label: str) -> TrainingReporter:
        return TrainingReporter(label, self)

    @contextmanager
    def file_progress(self, label: str) -> Iterator[Any]:
        """A callback (done, total) for per-file work such as orthogonalizing or averaging."""
        if self.quiet or self.json or self.silent or _plain():
            yield None
            return
        with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=self.err,
                      transient=True) as progress:
            task = progress.add_task(label, total=None)

            def update(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            yield update


def setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("twa")
    logger.handlers.clear()
    if _plain():
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    else:
        handler = RichHandler(console=_console(stderr=True), show_time=False, show_path=False, markup=False)
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR if quiet else logging.INFO)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


class TrainingReporter:
    """Progress of the training loop: a rich bar on a terminal, one line per epoch otherwise."""

    def __init__(self, label: str, output: Output):
        self.label = label
        self.output = output
        self.progress: Progress | None = None
        self.task: Any = None

    @property
    def silent(self) -> bool:
        return self.output.quiet or self.output.json or self.output.silent

    def epoch_started(self, epoch: int, epochs: int, batches: int) -> None:
        if self.silent or _plain():
            return
        if self.progress is None:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), console=self.output.err, transient=True,
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

    def epoch_done(self, stats: Any) -> None:
        if self.silent:
            return
        row = stats.to_dict()
        parts = [f"{self.label} epoch {row['epoch']}", f"lr {row['lr']:.4g}"]
        for key, value in row.items():
            if key.startswith(("train_", "test_")) and isinstance(value, float):
                unit = "%" if key.endswith("_acc") else ""
                parts.append(f"{key.replace('_', ' ')} {value:.4f}{unit}" if not unit else
                             f"{key.replace('_', ' ')} {value:.2f}{unit}")
        parts.append(f"{row['seconds']:.1f}s")
        line = "  ".join(parts)
        console = self.progress.console if self.progress is not None else self.output.err
        console.print(line, markup=False, emoji=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __enter__(self) -> TrainingReporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
