"""Image classification, the paper's task: a registry architecture or a user's builder, an image data set
of the registry or a user's own, cross-entropy, accuracy and loss per example."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from twa_cli.errors import TwaError
from twa_cli.tasks.base import Batch, Task, accuracy_figures, meta_model
from twa_cli.tasks.images import Datasets, data_shape, load_data
from twa_cli.tasks.models import build_model


def logits_of(output: Any) -> torch.Tensor:
    """The logits a classifier returned: a tensor, or the `.logits` of a model output object."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TwaError(f"the model returned {type(output).__name__}, not a tensor of logits; for a model with its own "
                   "outputs or loss use --task")


class ClassificationTask(Task):
    """`model(x)` gives logits for batches `(x, y)`; the loss is the mean cross-entropy.

    `arch`: an architecture spec (`twa_cli.tasks.models`) or None to size `model_name` from the data; `data`:
    a data spec (`twa_cli.tasks.images`). `user_model`/`user_data`: the user named them (so they may name
    code); `download`: fetch a missing torchvision set.
    """

    tallies = ("loss", "examples", "correct")
    selection_metric = ("accuracy", True)

    def __init__(self, arch: Mapping[str, Any], data: Mapping[str, Any], *, user_model: bool = False,
                 user_data: bool = False, download: bool = False, source: str | None = None):
        self.source = source  # the file the description was read from, for messages
        self.arch = dict(arch)
        self.data_spec = dict(data)
        self._user_model = user_model
        self._user_data = user_data
        self._download = download

    @staticmethod
    def sized(model_name: str, data: Mapping[str, Any], *, user_data: bool = False) -> dict[str, Any]:
        """The architecture spec of a registry name (or the user's builder) for a data set's classes, channels
        and image size, known without decoding the data where possible."""
        classes, channels, size = data_shape(dict(data), allow_code=user_data)
        return {"name": model_name, "kwargs": {"num_classes": classes, "in_channels": channels, "image_size": size}}

    @property
    def has_data(self) -> bool:
        return bool(self.data_spec)

    @cached_property
    def data(self) -> Datasets:
        return load_data(self.data_spec, allow_code=self._user_data, download=self._download)

    def build_model(self) -> nn.Module:
        return build_model(self.arch, allow_code=self._user_model, source=None if self._user_model else self.source)

    def outline_model(self) -> nn.Module:
        return super().outline_model() if self._user_model else meta_model(self.build_model)

    def dataset(self, split: str, *, augment: bool) -> Dataset | None:
        data = self.data
        if split == "train":
            return data.train if augment else data.train_eval
        if split == "val":
            return data.val if augment else data.val_eval
        if split == "test":
            return data.test
        raise TwaError(f"unknown split '{split}'")

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return F.cross_entropy(logits_of(model(x)), y)

    def measure(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch[0], batch[1]
        logits = logits_of(model(x))
        loss = F.cross_entropy(logits, y)
        with torch.no_grad():
            n = y.new_tensor(len(y), dtype=torch.float64)
            correct = (logits.argmax(1) == y).sum().double()
            tallies = torch.stack([loss.detach().double() * n, n, correct])
        return loss, tallies

    def figures(self, totals: Mapping[str, float]) -> dict[str, float]:
        return accuracy_figures(totals)

    def describe(self) -> dict[str, Any]:
        return {"arch": self.arch, "data": self.data_spec} if self.data_spec else {"arch": self.arch}
