"""Shared by the in-loop tests (not a test module): data loaders that hand the tensor core's loop the batches
`twa train-subspace` draws, so an in-loop result can be compared with the command's on the same checkpoints."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from twa_cli.core.batching import epoch_generator


class CommandOrder(Sampler[list[int]]):
    """Batches of indices in the order `twa train-subspace --seed SEED` draws them, epoch after epoch (each
    iteration over the sampler is the next epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch))
        self.epoch += 1
        for i in range(0, self.n, self.batch_size):
            yield order[i : i + self.batch_size].tolist()


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str]) -> float:
    x = torch.cat([a[n].reshape(-1).double() for n in names])
    y = torch.cat([b[n].reshape(-1).double() for n in names])
    return float((x - y).norm() / y.norm())


class CommandBatches:
    """A task's batches exactly as `twa train-subspace` builds them (`twa_cli.core.batching.batches`), one epoch
    per iteration: for a data set whose batches a DataLoader would collate differently (text blocks)."""

    def __init__(self, task, dataset, batch_size: int, seed: int = 0):
        self.task, self.dataset, self.batch_size, self.seed, self.epoch = task, dataset, batch_size, seed, 0

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        from twa_cli.core.batching import batches

        epoch, self.epoch = self.epoch, self.epoch + 1
        for batch, _ in batches(self.task, self.dataset, self.batch_size, shuffle=True, seed=self.seed, epoch=epoch):
            yield batch


def in_order(task, dataset, batch_size: int = 128) -> list:
    """The batches the command recomputes BatchNorm on: in order, 128 examples at a time."""
    from twa_cli.core.batching import plain_batches

    return list(plain_batches(task, dataset, batch_size))
