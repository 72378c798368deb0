"""The one training loop, shared by `sample` (plain SGD), `train-subspace` and the in-loop API (projected SGD).

The loop knows nothing about checkpoints, files or subspaces: the optimizer decides what a step does, the batch
source what the batches of an epoch are and how a batch is measured, and hooks what happens after a step and at
the end of an epoch (saving samples, evaluating, saving the resume state). Before each epoch torch's generator is
seeded from (seed, epoch), so augmentation, dropout and a DataLoader's shuffling replay exactly on resume. The
step itself allocates nothing D-sized and never waits for the device: the loss and the epoch's tallies stay on
the device, and the host looks at them every few steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from twa_cli.engine.batch import Batch, move
from twa_cli.engine.schedules import learning_rate
from twa_cli.errors import Diverged

# How often (in steps) the loop looks at the loss on the host; between looks it never synchronizes.
DIVERGENCE_CHECK_EVERY = 25


@dataclass
class EpochStats:
    epoch: int  # epochs completed, 1-based
    step: int
    lr: float
    seconds: float
    train: dict[str, float] = field(default_factory=dict)  # the source's figures over the epoch: train_loss, ...
    extra: dict[str, Any] = field(default_factory=dict)  # added by hooks: test figures

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "lr": self.lr, **self.train, "seconds": self.seconds,
                **self.extra}


class Reporter(Protocol):
    """What the loop tells whoever is watching (the CLI draws progress bars from it; tests pass nothing)."""

    def epoch_started(self, epoch: int, epochs: int, batches: int) -> None: ...
    def batch_done(self) -> None: ...
    def epoch_done(self, stats: EpochStats) -> None: ...


class Silent:
    def epoch_started(self, epoch: int, epochs: int, batches: int) -> None:
        pass

    def batch_done(self) -> None:
        pass

    def epoch_done(self, stats: EpochStats) -> None:
        pass


class Collective(Protocol):
    """The processes that train together (a torchrun job's Placement); `OneProcess` alone."""

    world: int

    def sum_(self, tensor: torch.Tensor) -> None: ...
    def min_(self, tensor: torch.Tensor) -> None: ...


class OneProcess:
    world = 1

    def sum_(self, tensor: torch.Tensor) -> None:
        return None

    def min_(self, tensor: torch.Tensor) -> None:
        return None


class BatchSource(Protocol):
    """What the loop trains on: the batches of an epoch, each with how its mean loss counts in the mean of the
    global batch it is part of (1 in one process), and how a batch is measured."""

    width: int  # the number of tallies `measure` returns

    def per_epoch(self) -> int: ...
    def epoch(self, epoch: int) -> Iterable[tuple[Batch, float]]: ...
    def measure(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]: ...
    def summarize(self, sums: torch.Tensor) -> dict[str, float]: ...


class LoaderBatches:
    """A DataLoader (or any re-iterable of batches, with a length) and the user's loss(model, batch) -> scalar.
    Its figure is the mean loss over the epoch's batches."""

    width = 2

    def __init__(self, loader: Iterable[Batch], loss: Callable[[nn.Module, Batch], torch.Tensor]):
        self.loader = loader
        self.loss = loss

    def per_epoch(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def epoch(self, epoch: int) -> Iterable[tuple[Batch, float]]:
        return ((batch, 1.0) for batch in self.loader)

    def measure(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self.loss(model, batch)
        return loss, torch.stack([loss.detach().double(), loss.new_ones((), dtype=torch.float64)])

    def summarize(self, sums: torch.Tensor) -> dict[str, float]:
        total, batches = sums.cpu().tolist()
        return {"train_loss": total / max(batches, 1.0)}


StepHook = Callable[[int, int, int], None]  # (epoch, batch index, global step) after each step
EpochHook = Callable[[EpochStats], None]


def augmentation_seed(seed: int, epoch: int) -> int:
    return (seed * 7919 + epoch * 104_729 + 1) % (2**63)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    source: BatchSource,
    *,
    epochs: int,
    lr: float,
    schedule: str = "step",
    seed: int = 0,
    device: torch.device | str = "cpu",
    start_epoch: int = 0,
    step: int = 0,
    after_step: StepHook | None = None,
    after_epoch: EpochHook | None = None,
    reporter: Reporter | None = None,
    checked_steps: Collection[int] = (),
    collective: Collective | None = None,
) -> int:
    """Train from `start_epoch` to `epochs` at `lr` under `schedule`; returns the global step count at the end.

    `checked_steps`: batch indices (within an epoch) after which `after_step` writes the weights out, so the
    loop checks for divergence first: a diverged sample is never saved. With a `collective` of several
    processes the epoch's figures and the divergence check are combined over all of them.
    """
    reporter = reporter or Silent()
    collective = collective or OneProcess()
    device = torch.device(device)
    per_epoch = source.per_epoch()
    for epoch in range(start_epoch, epochs):
        torch.manual_seed(augmentation_seed(seed, epoch))
        model.train()
        reporter.epoch_started(epoch, epochs, per_epoch)
        started = time.perf_counter()
        sums = torch.zeros(source.width, dtype=torch.float64, device=device)
        bad_step = torch.full((), -1, dtype=torch.long, device=device)
        now = lr
        for i, (batch, weight) in enumerate(source.epoch(epoch)):
            now = learning_rate(schedule, lr, epochs, epoch, i / per_epoch)
            set_lr(optimizer, now)
            loss, tallies = source.measure(model, move(batch, device))
            optimizer.zero_grad(set_to_none=False)
            (loss if weight == 1.0 else loss * weight).backward()
            optimizer.step()
            step += 1
            with torch.no_grad():
                if weight:  # an example that only keeps a rank in step (weight 0) is not counted
                    sums += tallies
                # Record the first non-finite step on the device; the host looks only every few steps.
                bad_step.copy_(torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step, bad_step))
            if step % DIVERGENCE_CHECK_EVERY == 0 or i in checked_steps:
                _check_divergence(bad_step, now, collective)
            if after_step is not None:
                after_step(epoch, i, step)
            reporter.batch_done()
        _check_divergence(bad_step, now, collective)
        check_state_finite(model, step, now)  # the last step's update can overflow with a finite loss
        collective.sum_(sums)
        stats = EpochStats(epoch=epoch + 1, step=step, lr=now, seconds=time.perf_counter() - started,
                           train=source.summarize(sums))
        if after_epoch is not None:
            after_epoch(stats)
        reporter.epoch_done(stats)
    return step


def _check_divergence(bad_step: torch.Tensor, lr: float, collective: Collective) -> None:
    if collective.world > 1:
        # Every rank must stop together, at the earliest bad step any of them saw.
        never = torch.iinfo(torch.long).max
        earliest = torch.where(bad_step < 0, never, bad_step)
        collective.min_(earliest)
        bad_step = torch.where(earliest == never, -1, earliest)
    first = int(bad_step)
    if first >= 0:
        raise Diverged(f"training diverged: the loss became NaN or Inf at step {first} (lr {lr:g}); try a smaller --lr")


def check_state_finite(model: nn.Module, step: int, lr: float) -> None:
    """Raise `Diverged` when a weight or a floating buffer (BatchNorm's running statistics) is NaN or Inf (one
    host sync: call it before writing the model out)."""
    with torch.no_grad():
        tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else torch.tensor(True)
    if not bool(finite):
        bad = next(name for name, t in model.state_dict().items()
                   if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        raise Diverged(f"training diverged: '{bad}' became NaN or Inf by step {step} (lr {lr:g}); try a smaller --lr")
