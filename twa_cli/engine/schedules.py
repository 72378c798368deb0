"""Learning-rate schedules (torch-free, so the command line can list them without importing torch)."""

from __future__ import annotations

import math

from twa_cli.errors import TwaError

SCHEDULES = ("step", "linear", "constant", "cosine")


def learning_rate(schedule: str, base_lr: float, epochs: int, epoch: int, fraction: float = 0.0) -> float:
    """The learning rate at `epoch + fraction` of `epochs`.

    step: 10x lower from the first epoch at or past 50% and 75% of the epochs (decided per epoch, as the paper's
    code compares `epoch < 0.5 * epochs`: 1 epoch runs at lr, 2 at lr and lr/10, 5 at lr three times);
    linear: to zero at the end, per step; cosine: half a cosine to zero, per step; constant.
    """
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * 0.1 ** sum(epoch >= share * epochs for share in (0.5, 0.75))
    progress = min(1.0, (epoch + fraction) / epochs)
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise TwaError(f"--schedule must be one of {', '.join(SCHEDULES)} (got '{schedule}')")
