"""A model's figures on a split of its task's data (accuracy and loss per example for classifiers, per-token
figures for language models: whatever the task measures)."""

from __future__ import annotations

import torch
from torch import nn

from twa_cli.core.batching import plain_batches
from twa_cli.errors import TwaError
from twa_cli.tasks.base import Metrics, Task

EVAL_BATCH = 256


def evaluate(model: nn.Module, task: Task, split: str = "test", *, batch_size: int = EVAL_BATCH,
             device: torch.device | str = "cpu") -> Metrics:
    """The task's figures for `model` on the plain (not augmented) view of `split`."""
    dataset = task.dataset(split, augment=False)
    if dataset is None:
        raise TwaError(f"the data has no {split} split")
    return task.metrics(model, plain_batches(task, dataset, batch_size), device=device)
