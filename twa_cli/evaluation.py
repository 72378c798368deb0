"""Accuracy and loss of a model on a data set, and the `eval` command's work."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from twa_cli.batchnorm import recalibrate_bn
from twa_cli.checkpoints import load_tensors, read_checkpoint
from twa_cli.data import batches, load_data
from twa_cli.errors import TwaError
from twa_cli.models import build_model, load_weights


@dataclass
class Score:
    loss: float
    accuracy: float  # percent
    count: int


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: torch.device | str = "cpu") -> Score:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    for x, y in batches(dataset, batch_size):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
    model.train(was_training)
    return Score(float(loss_sum) / max(count, 1), 100.0 * float(correct) / max(count, 1), count)


@dataclass
class EvalResult:
    path: str
    test: Score | None
    train: Score | None

    @property
    def gap(self) -> float | None:
        """Generalization gap: training accuracy minus test accuracy, in points, as in the paper's tables."""
        if self.train is None or self.test is None:
            return None
        return self.train.accuracy - self.test.accuracy

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path}
        for name in ("test", "train"):
            score = getattr(self, name)
            if score is not None:
                out[name] = asdict(score)
        if self.gap is not None:
            out["gap"] = self.gap
        return out


def evaluate_checkpoint(
    path: str | Path,
    *,
    split: str = "test",
    model: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    bn_update: bool = False,
    bn_batches: int | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Score one checkpoint; the architecture and data come from its metadata unless given."""
    ckpt = read_checkpoint(path)
    arch = model or ckpt.arch
    if arch is None:
        raise TwaError(f"{path}: metadata names no architecture; pass --model")
    spec = data or ckpt.data
    if spec is None:
        raise TwaError(f"{path}: metadata names no data set; pass --data")
    datasets = load_data(spec)
    net = build_model(arch)
    load_weights(net, load_tensors(path), str(path))
    net.to(device)
    if bn_update:
        recalibrate_bn(net, datasets.train, max_batches=bn_batches, device=device)
    test = evaluate(net, datasets.test, batch_size=batch_size, device=device) if split in ("test", "both") else None
    train = (
        evaluate(net, datasets.train_eval, batch_size=batch_size, device=device) if split in ("train", "both") else None
    )
    return EvalResult(str(path), test, train)
