"""BatchNorm statistics recomputed for weights no checkpoint carries (an average, a point of the span).

Reset, then one pass over the given batches with a cumulative average (momentum None), in train mode, without
gradients; afterwards every layer's momentum and the model's mode are restored. (torch's `swa_utils.update_bn`
and the paper's code differ in the details: the latter never resets the statistics and so keeps an exponential
average of the last batches.) The batches are drawn inside a fork of torch's random state seeded here, so an
augmenting data set augments the same way every time and the training's random stream is left alone. The
forward pass is the caller's (a loss whose value is thrown away), so it works for any batch structure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from twa_cli.engine.batch import Batch, move

_BN = nn.modules.batchnorm._BatchNorm
RECALIBRATION_SEED = 0


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def recompute_bn(model: nn.Module, batches: Iterable[Batch], forward: Callable[[nn.Module, Batch], Any], *,
                 max_batches: int | None = None, device: torch.device | str = "cpu") -> int:
    """Recompute the running statistics over `batches` with `forward(model, batch)`; returns the batches used."""
    layers = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches of the pass
    model.train()
    used = 0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RECALIBRATION_SEED)
            for batch in batches:
                if max_batches is not None and used >= max_batches:
                    break
                forward(model, move(batch, device))
                used += 1
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return used
