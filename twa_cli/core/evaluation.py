"""A model's figures on a split of its task's data (accuracy and loss per example for classifiers, per-token
figures for language models: whatever the task measures)."""

from __future__ import annotations

import torch
from torch import nn

from twa_cli.core.batching import pinned_for, plain_batches
from twa_cli.errors import TwaError
from twa_cli.tasks.base import Metrics, Task

EVAL_BATCH = 256


def evaluate(model: nn.Module, task: Task, split: str = "test", *, batch_size: int = EVAL_BATCH,
             device: torch.device | str = "cpu") -> Metrics:
    """The task's figures for `model` on the plain (not augmented) view of `split`."""
    found = score_if_any(model, task, split, batch_size=batch_size, device=device)
    if found is None:
        hint = " to score on (text: pass --eval-data FILE)" if split == "test" else ""
        raise TwaError(f"the data has no {split} split{hint}")
    return found


def score_if_any(model: nn.Module, task: Task, split: str = "test", *, batch_size: int = EVAL_BATCH,
                 device: torch.device | str = "cpu") -> Metrics | None:
    """`evaluate`, or None when the task's data has no such split (text given without --eval-data)."""
    dataset = task.split(split, augment=False)
    if dataset is None:
        return None
    return task.metrics(model, plain_batches(task, dataset, batch_size, pin=pinned_for(device)),
                        device=device)
