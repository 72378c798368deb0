"""Which examples make each batch, and who loads them.

The data order of an epoch depends only on (seed, epoch), so a resumed run sees the batches an uninterrupted run
would have, and a torchrun job's ranks each take a contiguous part of every global batch (see `Placement.part`).

Data held in memory (tensors, CIFAR-like image folders decoded once) is sliced on the main thread: that costs
less than handing a batch between processes. Data read example by example (an ImageNet-like folder decoded and
augmented per image, a user's Dataset) is loaded by worker processes, a few batches ahead of the step that needs
them. Each such batch is loaded under random generators seeded from (seed, epoch, batch), so its augmentation is
the same with any number of workers, none included, and on resume.
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, get_worker_info

from twa_cli.errors import TwaError
from twa_cli.tasks.base import Batch, Part, TaskData

# Worker processes for data read example by example: enough to decode ahead of one GPU's step for the models
# twa trains, leaving a core to the training process.
MAX_WORKERS = 4
PREFETCH = 2  # batches each worker loads ahead


class Parts(Protocol):
    """Who takes which part of a global batch (a Placement); None means one process takes all of it."""

    def part(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]: ...


def epoch_seed(seed: int, epoch: int) -> int:
    """One number for (seed, epoch), in the range a generator takes, whatever --seed is."""
    return (seed * 1_000_003 + epoch) % (1 << 63)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


def num_batches(dataset: Any, batch_size: int) -> int:
    return -(-len(dataset) // batch_size)


def pinned_for(device: torch.device | str) -> bool:
    """Whether batches bound for `device` are worth handing over in page-locked memory (a GPU's)."""
    return torch.device(device).type == "cuda"


def default_workers() -> int:
    """One fewer than the cores this process may run on (a container's or a job scheduler's share, not the
    machine's count), at most MAX_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(MAX_WORKERS, cores - 1))


def batches(task: TaskData, dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
            parts: Parts | None = None, workers: int | None = None, pin: bool = False
            ) -> Iterator[tuple[Batch, float]]:
    """(batch, weight) pairs: the batch this process computes, and how its mean loss counts in the mean of the
    global batch it is part of (1 in a single process). `workers`: processes loading data that is read example
    by example (default: the task's `workers`, else `default_workers()`; 0 loads on this thread, with the same
    batches). `pin`: the batches go to a GPU, so workers hand them over in page-locked memory, which the copy to
    the device (non-blocking) overlaps with the step."""
    n = len(dataset)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=epoch_generator(seed, epoch)) if shuffle else torch.arange(n)
    planned = []  # (this process's indices, their weight)
    for i in range(0, n, batch_size):
        indices, weight = order[i : i + batch_size], 1.0
        if parts is not None:
            indices, weight = parts.part(indices)
        planned.append((indices, weight))
    if in_memory(dataset):
        for indices, weight in planned:
            yield task.load(dataset, indices), weight
        return
    loads = _SeededLoads(task, dataset, [indices for indices, _ in planned], epoch_seed(seed, epoch))
    workers = next((w for w in (workers, task.workers) if w is not None), default_workers())
    if workers < 0:
        raise TwaError(f"workers: {workers} processes to load data; give 0 (this thread) or more")
    if workers == 0 or len(planned) < 2:
        source: Any = (loads[b] for b in range(len(planned)))
    else:
        # A generator of its own: the workers' base seed is not drawn from torch's global one (dropout's).
        source = iter(DataLoader(loads, batch_size=None, num_workers=min(workers, len(planned)),
                                 prefetch_factor=PREFETCH, generator=epoch_generator(seed, epoch),
                                 collate_fn=_as_loaded, pin_memory=pin, worker_init_fn=_leave_interrupts_to_the_main))
    try:
        for (_, weight), loaded in zip(planned, source, strict=True):
            if isinstance(loaded, _Failed):
                raise loaded.error
            yield loaded, weight
    finally:
        del source  # the workers stop now, not when a traceback holding this frame goes


def plain_batches(task: TaskData, dataset: Dataset, batch_size: int, *, pin: bool = False) -> Iterator[Batch]:
    """The batches of a data set in order, for evaluation."""
    for batch, _ in batches(task, dataset, batch_size, pin=pin):
        yield batch


def in_memory(dataset: Dataset) -> bool:
    """Whether `TaskData.load` slices a batch out of tensors or collates examples already in memory (none is read or
    decoded on its own)."""
    while isinstance(dataset, Part):
        dataset = dataset.dataset
    return (isinstance(dataset, TensorDataset) or callable(getattr(dataset, "batch", None))
            or bool(getattr(dataset, "held_in_memory", False)))


def _as_loaded(batch: Any) -> Any:
    """A batch exactly as `TaskData.load` returned it (DataLoader would turn tuples into lists, arrays into tensors)."""
    return batch


def _leave_interrupts_to_the_main(worker: int) -> None:
    """Ctrl-C reaches the whole process group: the main process says "interrupted" and stops the workers, which
    would otherwise each raise the CLI's interruption and print a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class _Failed:
    """An exception raised while loading in a worker, carried back as itself: DataLoader would re-raise it as
    another type, with the worker's traceback pasted into its message. Bad input (a TwaError, a file that cannot
    be read) keeps its one line; anything else carries the worker's traceback as a note."""

    error: BaseException

    @classmethod
    def of(cls, exc: Exception) -> _Failed:
        if not isinstance(exc, (TwaError, OSError)):
            exc.add_note("raised in a process loading data:\n" + "".join(traceback.format_exception(exc)).rstrip())
        try:
            pickle.loads(pickle.dumps(exc))
            return cls(exc)
        except Exception:  # an exception class that cannot be rebuilt from its pickle (its own __init__ arguments)
            pass
        if isinstance(exc, TwaError):
            return cls(TwaError(str(exc)))
        if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
            return cls(OSError(exc.errno, exc.strerror, exc.filename))
        twin = RuntimeError(f"{type(exc).__name__}: {exc}")
        twin.__notes__ = list(getattr(exc, "__notes__", []))
        return cls(twin)


class _SeededLoads(Dataset):
    """Batch b of an epoch, loaded with torch's (CPU), Python's and NumPy's generators seeded from (epoch seed, b,
    the first example of this process's part): the same images, crops and flips in a worker as on the main
    thread, and under torchrun each rank's part draws its own (rank 0's as one process's). On the main thread
    the generators are put back as they were, so loading leaves dropout's draws alone (and a GPU's generators are
    never touched)."""

    def __init__(self, task: TaskData, dataset: Dataset, plan: list[torch.Tensor], epoch_seed: int):
        self.task, self.dataset, self.plan, self.epoch_seed = task, dataset, plan, epoch_seed

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, b: int) -> Any:
        indices = self.plan[b]
        first = int(indices[0]) if len(indices) else 0
        seed = ((self.epoch_seed * 1_000_033 + b) * 1_000_037 + first) % (1 << 63)
        py, npy = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                # Not torch.manual_seed: that reseeds every GPU's generator too, which fork_rng(devices=[]) would
                # not put back.
                torch.default_generator.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % (1 << 32))
                return self.task.load(self.dataset, indices)
        except Exception as exc:
            if get_worker_info() is None:
                raise  # on this thread, as it is
            return _Failed.of(exc)
        finally:
            random.setstate(py)
            np.random.set_state(npy)
