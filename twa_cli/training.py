"""The one training loop, shared by `sample` (plain SGD) and `train-subspace` (projected SGD).

The loop knows nothing about checkpoints or subspaces: the optimizer decides what a step does, and hooks
decide what happens after a step and at the end of an epoch (saving samples, evaluating, saving the resume
state). Its data order and augmentation randomness depend only on (seed, epoch), so a run resumed from the
end of an epoch replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from twa_cli.checkpoints import load_tensors, make_metadata, read_checkpoint, save_tensors, write_text
from twa_cli.data import Datasets, batches, num_batches
from twa_cli.errors import TwaError

SCHEDULES = ("step", "linear", "constant", "cosine")
# How often (in steps) the loop looks at the loss on the host; between looks it never synchronizes.
DIVERGENCE_CHECK_EVERY = 25


def learning_rate(schedule: str, base_lr: float, epochs: int, epoch: int, fraction: float = 0.0) -> float:
    """The learning rate at `epoch + fraction` of `epochs`.

    step: 10x lower at 50% and 75% of the epochs (decided per epoch, as the paper's runs do);
    linear: to zero at the end, per step; cosine: half a cosine to zero, per step; constant.
    """
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * 0.1 ** sum(epoch >= m for m in (int(0.5 * epochs), int(0.75 * epochs)))
    progress = min(1.0, (epoch + fraction) / epochs)
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise TwaError(f"--schedule must be one of {', '.join(SCHEDULES)} (got '{schedule}')")


@dataclass
class LoopConfig:
    epochs: int
    lr: float
    schedule: str = "step"
    batch_size: int = 128
    seed: int = 0
    device: str = "cpu"


@dataclass
class EpochStats:
    epoch: int  # epochs completed, 1-based
    step: int
    lr: float
    train_loss: float
    train_acc: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out.update(self.extra)
        return out


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


class DataShard(Protocol):
    """One rank's part in data-parallel training (`twa_cli.distributed.Group`); None in a single process."""

    def batches(
        self, dataset: Any, batch_size: int, *, shuffle: bool, seed: int, epoch: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def sum_(self, tensor: torch.Tensor) -> None: ...
    def min_(self, tensor: torch.Tensor) -> None: ...


class Diverged(TwaError):
    pass


StepHook = Callable[[int, int, int], None]  # (epoch, batch index, global step) after each step
EpochHook = Callable[[EpochStats], None]


def augmentation_seed(seed: int, epoch: int) -> int:
    return (seed * 7919 + epoch * 104_729 + 1) % (2**63)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Datasets,
    cfg: LoopConfig,
    *,
    start_epoch: int = 0,
    step: int = 0,
    after_step: StepHook | None = None,
    after_epoch: EpochHook | None = None,
    reporter: Reporter | None = None,
    checked_steps: Collection[int] = (),
    shard: DataShard | None = None,
) -> int:
    """Train from `start_epoch` to `cfg.epochs`; returns the global step count at the end.

    `checked_steps`: batch indices (within an epoch) after which `after_step` writes the weights out, so the
    loop checks for divergence first: a diverged sample is never saved.
    With a `shard` this process sees only its part of each global batch, and the epoch's figures and the
    divergence check are combined over all ranks.
    """
    reporter = reporter or Silent()
    load = shard.batches if shard is not None else batches
    device = torch.device(cfg.device)
    per_epoch = num_batches(data.train, cfg.batch_size)
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(augmentation_seed(cfg.seed, epoch))
        model.train()
        reporter.epoch_started(epoch, cfg.epochs, per_epoch)
        started = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        bad_step = torch.full((), -1, dtype=torch.long, device=device)
        seen = 0
        lr = cfg.lr
        for i, (x, y) in enumerate(load(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch)):
            lr = learning_rate(cfg.schedule, cfg.lr, cfg.epochs, epoch, i / per_epoch)
            set_lr(optimizer, lr)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            optimizer.step()
            step += 1
            with torch.no_grad():
                detached = loss.detach()
                loss_sum += detached * len(y)
                correct += (logits.argmax(1) == y).sum()
                # Record the first non-finite step on the device; the host looks only every few steps.
                bad_step.copy_(torch.where((bad_step < 0) & ~torch.isfinite(detached), step, bad_step))
            seen += len(y)
            if step % DIVERGENCE_CHECK_EVERY == 0 or i in checked_steps:
                _check_divergence(bad_step, lr, shard)
            if after_step is not None:
                after_step(epoch, i, step)
            reporter.batch_done()
        _check_divergence(bad_step, lr, shard)
        check_weights_finite(model, step, lr)  # the last step's update can overflow with a finite loss
        if shard is not None:
            count = torch.tensor(float(seen), dtype=torch.float64, device=device)
            totals = torch.stack([loss_sum, correct.double(), count])
            shard.sum_(totals)
            loss_sum, correct, seen = totals[0], totals[1], int(totals[2])
        stats = EpochStats(
            epoch=epoch + 1,
            step=step,
            lr=lr,
            train_loss=float(loss_sum) / max(seen, 1),
            train_acc=100.0 * float(correct) / max(seen, 1),
            seconds=time.perf_counter() - started,
        )
        if after_epoch is not None:
            after_epoch(stats)
        reporter.epoch_done(stats)
    return step


def _check_divergence(bad_step: torch.Tensor, lr: float, shard: DataShard | None = None) -> None:
    if shard is not None:
        # Every rank must stop together, at the earliest bad step any of them saw.
        never = torch.iinfo(torch.long).max
        earliest = torch.where(bad_step < 0, never, bad_step)
        shard.min_(earliest)
        bad_step = torch.where(earliest == never, -1, earliest)
    first = int(bad_step)
    if first >= 0:
        raise Diverged(f"training diverged: the loss became NaN or Inf at step {first} (lr {lr:g}); try a smaller --lr")


def check_weights_finite(model: nn.Module, step: int, lr: float) -> None:
    """Raise `Diverged` when a weight is NaN or Inf (one host sync: call it before writing weights out)."""
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
    if not bool(finite):
        raise Diverged(f"training diverged: the weights became NaN or Inf by step {step} (lr {lr:g}); "
                       "try a smaller --lr")


def divergence_advice(state_path: Path) -> str:
    """What a diverged run leaves behind, for the end of the error message."""
    if state_path.exists():
        done = read_checkpoint(state_path).json_field("state")["epochs_done"]
        return (f"the last good state (epoch {done}) is kept in {state_path}: "
                "continue from it with --resume and a smaller --lr")
    return "no epoch completed, so there is nothing to resume: start again with a smaller --lr (and --force)"


# ---------------------------------------------------------------------------------------------- resuming


def save_train_state(
    path: Path, tensors: dict[str, torch.Tensor], stats: EpochStats, history: list[dict[str, Any]],
    config: dict[str, Any],
) -> None:
    """Everything needed to continue after this epoch: weights, optimizer tensors, RNG, position, metrics."""
    tensors = dict(tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    info = {"epochs_done": stats.epoch, "step": stats.step, "history": history, "config": config}
    save_tensors(path, tensors, make_metadata("train-state", state=info))


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """The per-epoch figures as JSON lines, rewritten whole (atomically) after each epoch and on resuming,
    so the file always matches the saved state, and a temporary left by a killed write is cleared."""
    write_text(path, "".join(json.dumps(h) + "\n" for h in history))


# Options a resumed run may change: how long it runs, where, and the learning rate (to recover from divergence).
RESUMABLE_CHANGES = ("epochs", "device", "lr")


def load_train_state(
    path: Path, config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], int, int, list[dict[str, Any]]]:
    """(tensors, epochs done, global step, metrics so far), after checking the run's options are unchanged."""
    info = read_checkpoint(path).json_field("state")
    if not (isinstance(info, dict) and {"config", "epochs_done", "step", "history"} <= set(info)):
        raise TwaError(f"{path}: not a training state written by this tool (damaged metadata)")
    saved = {k: v for k, v in info["config"].items() if k not in RESUMABLE_CHANGES}
    now = {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}
    if saved != now:
        diff = next(k for k in sorted(set(now) | set(saved)) if saved.get(k) != now.get(k))
        raise TwaError(
            f"--resume: --{diff.replace('_', '-')} was {saved.get(diff)!r} in the interrupted run, now {now.get(diff)!r}"
        )
    tensors = load_tensors(path)
    if "rng.torch" not in tensors:
        raise TwaError(f"{path}: not a training state written by this tool (no RNG state)")
    torch.set_rng_state(tensors.pop("rng.torch"))
    return tensors, int(info["epochs_done"]), int(info["step"]), list(info["history"])


def with_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def strip_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
