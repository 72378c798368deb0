"""Which examples make each batch: the data order of an epoch depends only on (seed, epoch), so a resumed run
sees the batches an uninterrupted run would have, and a torchrun job's ranks each take a contiguous part of
every global batch (see `Placement.part`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from twa_cli.tasks.base import Batch, Task


class Parts(Protocol):
    """Who takes which part of a global batch (a Placement); None means one process takes all of it."""

    def part(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]: ...


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def num_batches(dataset: Any, batch_size: int) -> int:
    return -(-len(dataset) // batch_size)


def batches(task: Task, dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
            parts: Parts | None = None) -> Iterator[tuple[Batch, float]]:
    """(batch, weight) pairs: the batch this process computes, and how its mean loss counts in the mean of the
    global batch it is part of (1 in a single process)."""
    n = len(dataset)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=epoch_generator(seed, epoch)) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        indices, weight = (order[i : i + batch_size], 1.0)
        if parts is not None:
            indices, weight = parts.part(indices)
        yield task.load(dataset, indices), weight


def plain_batches(task: Task, dataset: Dataset, batch_size: int) -> Iterator[Batch]:
    """The batches of a data set in order, for evaluation."""
    for batch, _ in batches(task, dataset, batch_size):
        yield batch
