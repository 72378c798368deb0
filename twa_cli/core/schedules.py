"""Learning-rate schedules (torch-free, so the command line can list them without importing torch)."""

from __future__ import annotations

import math

from twa_cli.errors import TwaError

SCHEDULES = ("step", "linear", "constant", "cosine")


def learning_rate(schedule: str, base_lr: float, epochs: int, epoch: int, fraction: float = 0.0) -> float:
    """The learning rate at `epoch + fraction` of `epochs`.

    step: 10x lower at 50% and 75% of the epochs (decided per epoch, as the paper's runs do);
    linear: to zero at the end, per step; cosine: half a cosine to zero, per step; constant.
    """
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * 0.1 ** sum(epoch >= m for m in (int(0.5 * epochs), int(0.75 * epochs)))
    progress = min(1.0, (epoch + fraction) / epochs)
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise TwaError(f"--schedule must be one of {', '.join(SCHEDULES)} (got '{schedule}')")
