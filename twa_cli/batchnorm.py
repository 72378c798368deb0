"""BatchNorm recalibration, shared by swa, train-subspace and eval.

Averaged or subspace-trained weights do not match the running statistics any checkpoint carries, so they are
recomputed: reset, then one pass over the training images with a cumulative average (momentum None), in
train mode, without gradients. Afterwards every layer's momentum and the model's mode are restored.
(torch's `swa_utils.update_bn` and the paper's code differ in the details: the latter never resets the
statistics and so keeps an exponential average of the last batches.)

The pass sees the training images as training does, augmented: the weights were trained against the batch
statistics of augmented images (on CIFAR, zero-padded random crops), and the statistics of the plain images
differ. On the CIFAR-10 benchmark's validation split, recomputing them from plain images cost TWA 1.8 points
(docs/results.md, "BatchNorm statistics"). The augmentation draws from a generator seeded here, inside a fork
of torch's random state, so a recalibration is reproducible and leaves the training's random stream alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset

from twa_cli.data import batches

_BN = nn.modules.batchnorm._BatchNorm
RECALIBRATION_SEED = 0


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 128,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    loader: Callable[..., Iterator[tuple[torch.Tensor, torch.Tensor]]] | None = None,
) -> int:
    """Recompute the running statistics of every BatchNorm layer; returns the number of batches used.

    Pass the training view that training itself uses (`Datasets.train`, augmented), not `train_eval`.

    `loader` replaces `twa_cli.data.batches`: under torchrun with SyncBatchNorm each rank passes its part of
    every batch (`Group.batches`), and the synchronized layers see the whole batch, as one process does.
    """
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
            for x, _ in (loader or batches)(dataset, batch_size):
                if max_batches is not None and used >= max_batches:
                    break
                model(x.to(device, non_blocking=True))
                used += 1
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    return used
