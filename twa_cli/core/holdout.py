"""Choosing on held-out data: where TWA starts in the span, and which point of its run it returns.

TWA fits its coefficients to the training data. A run that overfits has already memorized that data, and the fit
then piles weight on its last, most overfitted checkpoints; a step size too large for a span throws the
weights out of its basin. Neither shows on the training data. So by default `train-subspace` scores points of
the span on a validation split the fit never sees: the candidate starting points (the center of the
checkpoints, which is SWA, and the last checkpoint), then the run itself every so often, and it returns the best
point it saw, which is a starting point when nothing trained beat it. Each figure is the task's own
(`TaskMetrics.selection_metric`: accuracy for classifiers, the loss for language models), ties broken by the loss.

A point is the optimizer's coordinates (and the scale of an off-span start) plus the model's floating buffers
(BatchNorm statistics, recomputed over the training data before a trained point is scored, as they are for the
result).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from twa_cli.engine.subspace import SubspaceSGD
from twa_cli.tasks.base import Metrics, TaskMetrics

# The fewest validation examples (or, for a language model, blocks) a choice is made on: below this the noise
# of a handful of examples decides.
MIN_VAL_EXAMPLES = 100
# When the data has no validation split, this fraction of the training examples is held out, at least
# MIN_VAL_EXAMPLES and at most MAX_HELD_OUT of them. TWA fits only n coefficients, so the fit loses little to it.
HELD_OUT_FRACTION = 0.1
MAX_HELD_OUT = 10_000
# At least this many scored points in a run, however few its epochs (a 1-epoch run is scored every quarter).
MIN_POINTS = 4


def held_out_count(train_examples: int) -> int:
    """How many of `train_examples` `train-subspace` holds out when the data has no validation split: 10%, at
    least MIN_VAL_EXAMPLES, at most MAX_HELD_OUT; 0 when that would leave the fit less than half of them (too
    little data to choose on)."""
    count = min(max(round(HELD_OUT_FRACTION * train_examples), MIN_VAL_EXAMPLES), MAX_HELD_OUT)
    return count if 2 * count <= train_examples else 0


def points_per_epoch(epochs: int) -> int:
    return max(1, math.ceil(MIN_POINTS / epochs))


def scored_steps(per_epoch_batches: int, epochs: int) -> set[int]:
    """Batch indices within an epoch after which the run is scored, besides the epoch's end."""
    k = points_per_epoch(epochs)
    return {round(j * per_epoch_batches / k) - 1 for j in range(1, k)} - {per_epoch_batches - 1, -1}


def better(task: TaskMetrics, a: Metrics, b: Metrics | None) -> bool:
    """Whether figures `a` beat `b` (None: nothing yet) by the task's selection metric, ties by the loss. A
    non-finite figure never wins."""
    name, higher = task.selection_metric
    va, loss_a = a.values.get(name, math.nan), a.values.get("loss", math.nan)
    if not (math.isfinite(va) and math.isfinite(loss_a)):
        return False
    if b is None:
        return True
    vb, loss_b = b.values.get(name, math.nan), b.values.get("loss", math.nan)
    if not math.isfinite(vb):
        return True
    if va != vb:
        return va > vb if higher else va < vb
    return loss_a < loss_b


@dataclass
class Point:
    """A point of the span as scored: its label ("center", "last", "epoch 2", "epoch 1.5") and figures."""

    label: str
    step: int
    figures: dict[str, float]
    kept: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "step": self.step, "figures": self.figures, "kept": self.kept}


@dataclass
class KeepBest:
    """The best point seen so far on the validation split, and every point scored."""

    task: TaskMetrics
    optimizer: SubspaceSGD
    model: nn.Module
    best: Metrics | None = None
    best_label: str | None = None
    points: list[Point] = field(default_factory=list)
    _coords: torch.Tensor | None = None
    _offspan: float = 1.0
    _buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def consider(self, label: str, step: int, figures: Metrics, agree: Callable[[bool], bool] | None = None) -> bool:
        """Record a scored point; keep it (weights and buffers) if it beats the best so far. `agree`: makes every
        rank of a torchrun job take the first rank's decision."""
        kept = better(self.task, figures, self.best)
        if agree is not None:
            kept = agree(kept)
        self.points.append(Point(label, step, {**figures.values, "count": figures.count}, kept))
        if kept:
            self.best, self.best_label = figures, label
            self._coords = self.optimizer.coords.detach().clone()
            self._offspan = self.optimizer.offspan_scale
            self._buffers = {k: v.detach().clone() for k, v in self.model.state_dict().items()
                             if k in _buffer_names(self.model)}
        return kept

    def restore(self) -> None:
        """Put the model back at the best point (its BatchNorm statistics too)."""
        if self._coords is None:
            return
        self.optimizer.offspan_scale = self._offspan
        self.optimizer.move_to(self._coords)
        state = self.model.state_dict()
        with torch.no_grad():
            for name, value in self._buffers.items():
                state[name].copy_(value)

    # The best point travels with the training state, so that a resumed run keeps what it had chosen.
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self._coords is None:
            return {}
        out = {"coords": self._coords, "offspan": torch.tensor([self._offspan], dtype=torch.float64)}
        return out | {f"buffer.{k}": v for k, v in self._buffers.items()}

    def templates(self) -> dict[str, torch.Tensor]:
        """Tensors shaped as `state_tensors` writes them, to check a resumed state against."""
        state = self.model.state_dict()
        out = {"coords": self.optimizer.coords, "offspan": torch.zeros(1, dtype=torch.float64)}
        return out | {f"buffer.{k}": state[k] for k in _buffer_names(self.model)}

    def load(self, tensors: dict[str, torch.Tensor], points: list[dict[str, Any]]) -> None:
        self.points = [Point(p["label"], int(p["step"]), dict(p["figures"]), bool(p["kept"])) for p in points]
        kept = [p for p in self.points if p.kept]
        if not kept or "coords" not in tensors:
            return
        last = kept[-1]
        count = int(last.figures.get("count", 0))
        self.best = Metrics({k: v for k, v in last.figures.items() if k != "count"}, count)
        self.best_label = last.label
        self._coords = tensors["coords"].to(self.optimizer.coords)
        self._offspan = float(tensors["offspan"][0])
        self._buffers = {k.removeprefix("buffer."): v for k, v in tensors.items() if k.startswith("buffer.")}


def _buffer_names(model: nn.Module) -> set[str]:
    return {name for name, b in model.named_buffers() if b.is_floating_point()}

