"""Ctrl-C as an exception of its own, raised instead of KeyboardInterrupt (which click would turn into
"Aborted!" and exit code 1)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Interrupted(BaseException):
    """The user pressed Ctrl-C."""


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted()


@contextmanager
def ctrl_c_raises_interrupted() -> Iterator[None]:
    """Within the block (on the main thread), SIGINT raises `Interrupted`; the previous handler comes back after."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
