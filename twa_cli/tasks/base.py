"""The Task interface: everything TWA needs to know about a model and its data, and nothing more.

The training loop, evaluation, the lr check, BatchNorm recalibration, the loss surface and the soups see a
model only through a Task: they build the network, draw batches of whatever structure the task's data has
(tensors, tuples, dicts), ask for the loss of a batch and for named figures over many batches. The image
classifiers of the paper are one implementation (`twa_cli.tasks.classification`); a user's own is one
subclass away (`--task package.module:function` returning a Task):

    class MyTask(Task):
        def build_model(self): return MyNet()
        def dataset(self, split, *, augment): return {"train": train_set, "test": test_set}.get(split)
        def loss(self, model, batch): return my_loss(model(batch["x"]), batch["y"])

A Task is three pieces, each usable alone: `TaskModel` (the network), `TaskData` (the examples and how a batch
is made) and `TaskMetrics` (the loss and the figures); the core's functions take the piece they use.

Batches are made of examples the core picks by index (so a torchrun job can give each rank its part of every
batch); `collate` turns the examples into a batch, and `load` may do both at once for data held in memory.

The core reads the data through `Task.split`, which is `dataset` plus, when the task has no validation split
of its own, the one `hold_out` carves from the training examples (the same examples in every command).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from twa_cli.engine.batch import Batch, move
from twa_cli.io.runfiles import RESULT_FILE

SPLITS = ("train", "val", "test")
# A validation split carved out of the training examples depends on nothing but their number and the fraction,
# so `sample`, `swa --greedy` and `train-subspace` hold out the same examples.
VAL_SPLIT_SEED = 12345
# metrics.jsonl abbreviates the per-epoch figures as the first version of the tool did (train_acc, test_acc).
ABBREVIATIONS = {"accuracy": "acc"}


@dataclass
class Metrics:
    """Named figures over some data, each with its own normalisation (per example, per token), and how many
    units they were measured on."""

    values: dict[str, float]
    count: int
    unit: str = "examples"

    @property
    def loss(self) -> float:
        return self.values["loss"]

    @property
    def accuracy(self) -> float | None:
        return self.values.get("accuracy")

    def to_dict(self) -> dict[str, Any]:
        return {**self.values, "count": self.count, "unit": self.unit}

    def row(self, prefix: str) -> dict[str, float]:
        """The figures as columns of metrics.jsonl: `test_loss`, `test_acc`, ..."""
        return {f"{prefix}_{ABBREVIATIONS.get(k, k)}": v for k, v in self.values.items()}


def examples_in(batch: Batch) -> int:
    """The number of examples in a batch: the length of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values: Iterable[Any] = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, (torch.Tensor, Mapping, tuple, list)):
            return examples_in(value)
    raise TypeError("a batch holds no tensor")


def split_indices(n: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out): a fixed random `fraction` of n examples held out (at least one), both in order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    held = max(1, round(fraction * n))
    return order[held:].sort().values, order[:held].sort().values


class Part(Dataset):
    """Some examples of a data set, by index. `Task.load` reads a batch of it through the data set's own
    whole-batch path, so data held in memory is never collated example by example."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor):
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(self.indices[i])]


def meta_model(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` on the meta device: a model's structure without memory or initialisation (seconds saved for a
    100M-parameter model). For builders the tool knows to build alike there (its registry, timm, transformers)."""
    with torch.device("meta"):
        return build()


class TaskModel(ABC):
    """The network: how to build it, and how a result is handed to the model's own tool."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh network (its weights are replaced by a checkpoint's)."""

    def outline_model(self) -> nn.Module:
        """The network for its structure only: the names, shapes and trainable flags that choose the tensors
        spanning the subspace. By default the network itself, built as for training: a task's own code may cache,
        save or compute while it builds, which the meta device would break. The tool's own tasks build it on the
        meta device (`meta_model`), with no memory and no initialisation."""
        return self.build_model()

    #: The file name of a result in a train-subspace folder (a Hugging Face model's is model.safetensors).
    result_name = RESULT_FILE

    def export(self, state: Mapping[str, torch.Tensor], folder: Any) -> list[Any]:
        """Beside a result written to `folder`, the files that let the model's own tool load it (configuration and
        tokenizer files, a Lightning checkpoint); returns their paths."""
        return []


class TaskData(ABC):
    """The examples: the splits, the validation split carved from the training examples, and how a batch of
    examples is made. Batching (`twa_cli.core.batching`) needs nothing else."""

    #: Processes that load data read example by example (`twa_cli.core.batching`); None: twa's choice for the
    #: machine. A task whose examples cannot be read in a forked process (an open connection, CUDA in
    #: `__getitem__`) sets 0 to load on the main thread; the batches are the same either way.
    workers: int | None = None
    #: The fraction of the training examples `hold_out` set aside as the validation split (0: none).
    held_out: float = 0.0

    @abstractmethod
    def dataset(self, split: str, *, augment: bool) -> Dataset | None:
        """The examples of a split ("train", "val" or "test"), or None when the task has no such split.
        `augment`: the view training sees (random augmentation, if any) rather than the plain one."""

    def hold_out(self, fraction: float) -> None:
        """Give the task a validation split of `fraction` of its training examples, unless it has one of its own:
        `split("train")` then leaves them out, `split("val")` is them."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"a held-out fraction is between 0 and 1, not {fraction}")
        if self.dataset("val", augment=False) is None:
            self.held_out = fraction

    def split(self, name: str, *, augment: bool) -> Dataset | None:
        """The examples of a split as the core reads them: `dataset`, with the `hold_out` applied."""
        if not self.held_out or name == "test":
            return self.dataset(name, augment=augment)
        train = self.dataset("train", augment=augment)
        if train is None:
            return None
        kept, held = split_indices(len(train), self.held_out)  # type: ignore[arg-type]
        return Part(train, kept if name == "train" else held)

    def collate(self, examples: Sequence[Any]) -> Batch:
        """A batch from a list of examples (as DataLoader's collate_fn)."""
        return default_collate(list(examples))

    def load(self, dataset: Dataset, indices: torch.Tensor) -> Batch:
        """The batch of the given examples. Data held in memory is sliced, not collated example by example."""
        if isinstance(dataset, Part):
            return self.load(dataset.dataset, dataset.indices[indices])
        if isinstance(dataset, TensorDataset):
            return tuple(t[indices] for t in dataset.tensors)
        batch = getattr(dataset, "batch", None)
        if callable(batch):
            return batch(indices)
        return self.collate([dataset[int(i)] for i in indices])

    @property
    def has_data(self) -> bool:
        """Whether the task knows its data (a classifier rebuilt from a checkpoint may know only its model)."""
        return True


class TaskMetrics(ABC):
    """What is measured: the training loss of a batch, and named figures summed over many batches."""

    #: What the per-batch tallies of `measure` count, in order; `figures` turns their sums into metrics.
    tallies: tuple[str, ...] = ("loss", "examples")
    #: What the figures are normalised by.
    unit = "examples"
    #: The figure a validation choice (the greedy soup, train-subspace's best point) ranks by, and whether
    #: higher is better.
    selection_metric: tuple[str, bool] = ("loss", False)

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar training loss of a batch (a mean, so batches of any size weigh alike)."""

    def measure(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, tallies): the loss, and a float64 vector of sums named by `tallies`, kept on the device so
        that adding them up over an epoch needs no host sync."""
        loss = self.loss(model, batch)
        n = examples_in(batch)
        return loss, torch.stack([loss.detach().double() * n, loss.new_tensor(n, dtype=torch.float64)])

    def figures(self, totals: Mapping[str, float]) -> dict[str, float]:
        """Named figures from the summed tallies."""
        return {"loss": totals["loss"] / max(totals["examples"], 1.0)}

    def count(self, totals: Mapping[str, float]) -> int:
        return int(totals[self.unit if self.unit in totals else self.tallies[-1]])

    def summarize(self, sums: torch.Tensor) -> Metrics:
        totals = dict(zip(self.tallies, sums.cpu().tolist(), strict=True))
        return Metrics(self.figures(totals), self.count(totals), self.unit)

    def metrics(self, model: nn.Module, batches: Iterable[Batch], device: torch.device | str = "cpu") -> Metrics:
        """The figures over some batches, in eval mode, without gradients."""
        was_training = model.training
        model.eval()
        sums = torch.zeros(len(self.tallies), dtype=torch.float64, device=device)
        try:
            with torch.no_grad():
                for batch in batches:
                    sums += self.measure(model, move(batch, device))[1]
        finally:
            model.train(was_training)
        return self.summarize(sums)


class Task(TaskModel, TaskData, TaskMetrics):
    """A model, its data and what is measured (see the module docstring), and the record that rebuilds it.

    The core asks each function for the piece it uses: batching for `TaskData`, the lr check and the validation
    choice for `TaskMetrics`; the commands, which need all three, for a Task.
    """

    #: The `--task` name this task was made from, which `describe` records: later commands run that code again
    #: only when given `--task` again. twa sets it on the task the user's factory returns; None otherwise.
    hook_name: str | None = None

    def describe(self) -> dict[str, Any]:
        """What later commands need to rebuild this task, recorded in the metadata of every file written. A
        task from `--task` records its hook's name (which later commands run only when given `--task` again)."""
        return {"task": {"name": self.hook_name}} if self.hook_name else {}


def accuracy_figures(totals: Mapping[str, float]) -> dict[str, float]:
    n = max(totals["examples"], 1.0)
    return {"loss": totals["loss"] / n, "accuracy": 100.0 * totals["correct"] / n}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
