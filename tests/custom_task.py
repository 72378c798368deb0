"""A user's own task, as `--task custom_task:digits_as_dicts` names it: batches are dicts, the model takes
keyword arguments, the loss is the task's own (cross-entropy with label smoothing), and it reports accuracy.
Not a test module: the tests import it through the command line's hook."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from twa_cli import Task


class DictDigits(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixels": self.x[i], "label": self.y[i]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, *, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": self.body(pixels)}


class DigitsAsDicts(Task):
    tallies = ("loss", "examples", "correct")
    selection_metric = ("accuracy", True)

    def __init__(self):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
        y = torch.tensor(bunch.target)
        self.splits = {"train": DictDigits(x[:1200], y[:1200]), "test": DictDigits(x[1200:], y[1200:])}

    def build_model(self) -> nn.Module:
        return Net()

    def dataset(self, split: str, *, augment: bool) -> Dataset | None:
        return self.splits.get(split)

    def _scores(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return model(pixels=batch["pixels"])["scores"]

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self._scores(model, batch), batch["label"], label_smoothing=0.1)

    def measure(self, model, batch):
        scores = self._scores(model, batch)
        loss = F.cross_entropy(scores, batch["label"], label_smoothing=0.1)
        with torch.no_grad():
            n = torch.tensor(float(len(batch["label"])), dtype=torch.float64)
            correct = (scores.argmax(1) == batch["label"]).sum().double()
        return loss, torch.stack([loss.detach().double() * n, n, correct])

    def figures(self, totals):
        return {"loss": totals["loss"] / totals["examples"], "accuracy": 100.0 * totals["correct"] / totals["examples"]}


def digits_as_dicts() -> Task:
    return DigitsAsDicts()


class DigitsWithVal(DigitsAsDicts):
    """The same digits with a validation split of their own: `val` examples, optionally all NaN (a damaged
    validation file), cut from the end of the training part."""

    def __init__(self, val: int, nan: bool = False):
        super().__init__()
        train = self.splits["train"]
        x, y = train.x, train.y
        held = x[-val:].clone()
        if nan:
            held.fill_(float("nan"))
        self.splits["train"] = DictDigits(x[:-val], y[:-val])
        self.splits["val"] = DictDigits(held, y[-val:])


def digits_with_val() -> Task:
    return DigitsWithVal(200)


def digits_with_small_val() -> Task:
    return DigitsWithVal(50)


def digits_with_nan_val() -> Task:
    return DigitsWithVal(200, nan=True)


class DigitsWithEmptyTrain(DigitsWithVal):
    """A validation and a test split, and a training split of no examples (a filter that kept nothing)."""

    def __init__(self):
        super().__init__(200)
        train = self.splits["train"]
        self.splits["train"] = DictDigits(train.x[:0], train.y[:0])


def digits_with_empty_train() -> Task:
    return DigitsWithEmptyTrain()
