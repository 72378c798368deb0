"""BatchNorm recalibration, shared by swa, train-subspace, eval, the soups and the loss surface.

Averaged or subspace-trained weights do not match the running statistics any checkpoint carries, so they are
recomputed: reset, then one pass over the training data with a cumulative average (momentum None), in train
mode, without gradients. Afterwards every layer's momentum and the model's mode are restored. (torch's
`swa_utils.update_bn` and the paper's code differ in the details: the latter never resets the statistics and
so keeps an exponential average of the last batches.)

The pass sees the training data as training did (the augmentation the data set states, none included): the
weights were trained against the batch statistics of those images (on CIFAR, zero-padded random crops), and the
statistics of other views differ. On the CIFAR-10 benchmark's validation split (a run trained with crops),
recomputing them from plain images cost TWA 1.8 points (docs/results.md, "BatchNorm statistics"). The
augmentation draws from a generator seeded here, inside a fork of torch's random state, so a recalibration is
reproducible and leaves the training's random stream alone.
The forward pass is the task's loss (the loss itself is thrown away), so it works for any batch structure.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from twa_cli.core.batching import Parts, batches, pinned_for
from twa_cli.engine.batch import Batch
from twa_cli.engine.batchnorm import recompute_bn
from twa_cli.tasks.base import Task, TaskMetrics


def recalibrate_bn(model: nn.Module, task: Task, *, split: str = "train", batch_size: int = 128,
                   max_batches: int | None = None, device: torch.device | str = "cpu", parts: Parts | None = None,
                   ) -> int:
    """Recompute the running statistics of every BatchNorm layer over the training view of `split`; returns the
    number of batches used.

    `parts`: under torchrun with SyncBatchNorm each rank passes its part of every batch, and the synchronized
    layers see the whole batch, as one process does.
    """
    dataset = task.split(split, augment=True)
    return recalibrate_on(model, task, (b for b, _ in batches(task, dataset, batch_size, parts=parts,
                                                                           pin=pinned_for(device))),
                          max_batches=max_batches, device=device)


def recalibrate_on(model: nn.Module, task: TaskMetrics, batches_: Iterable[Batch], *, max_batches: int | None = None,
                   device: torch.device | str = "cpu") -> int:
    """Recompute the running statistics over the given batches, the task's loss as the forward pass."""
    return recompute_bn(model, batches_, task.loss, max_batches=max_batches, device=device)
