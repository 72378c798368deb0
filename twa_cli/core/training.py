"""The one training loop, shared by `sample` (plain SGD) and `train-subspace` (projected SGD).

The loop knows nothing about checkpoints or subspaces: the optimizer decides what a step does, the task what
a batch is and what its loss is, and hooks decide what happens after a step and at the end of an epoch
(saving samples, evaluating, saving the resume state). Its data order and augmentation randomness depend only
on (seed, epoch), so a run resumed from the end of an epoch replays exactly the batches an uninterrupted run
would have seen. The step itself allocates nothing D-sized and never waits for the device: the loss and the
epoch's tallies stay on the device, and the host looks at them every few steps.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from twa_cli.core.batching import batches, num_batches
from twa_cli.core.placement import Placement, SingleProcess
from twa_cli.core.schedules import learning_rate
from twa_cli.errors import Diverged, TwaError
from twa_cli.io.checkpoints import load_tensors, make_metadata, read_checkpoint
from twa_cli.io.safetensors import save_tensors
from twa_cli.tasks.base import Task, move

# How often (in steps) the loop looks at the loss on the host; between looks it never synchronizes.
DIVERGENCE_CHECK_EVERY = 25


@dataclass
class LoopConfig:
    epochs: int
    lr: float
    schedule: str = "step"
    batch_size: int = 128
    seed: int = 0
    device: str = "cpu"
    split: str = "train"  # the data trained on: "train", or "val" for TWA-v


@dataclass
class EpochStats:
    epoch: int  # epochs completed, 1-based
    step: int
    lr: float
    seconds: float
    train: dict[str, float] = field(default_factory=dict)  # the task's figures over the epoch: train_loss, ...
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
    task: Task,
    cfg: LoopConfig,
    *,
    start_epoch: int = 0,
    step: int = 0,
    after_step: StepHook | None = None,
    after_epoch: EpochHook | None = None,
    reporter: Reporter | None = None,
    checked_steps: Collection[int] = (),
    placement: Placement | None = None,
) -> int:
    """Train from `start_epoch` to `cfg.epochs`; returns the global step count at the end.

    `checked_steps`: batch indices (within an epoch) after which `after_step` writes the weights out, so the
    loop checks for divergence first: a diverged sample is never saved. Under torchrun (`placement` of several
    ranks) this process computes its part of each global batch, and the epoch's figures and the divergence
    check are combined over all ranks.
    """
    reporter = reporter or Silent()
    placement = placement or SingleProcess(cfg.device)
    device = torch.device(cfg.device)
    dataset = task.split(cfg.split, augment=True)
    if dataset is None:
        raise TwaError(f"the data has no {cfg.split} split to train on")
    per_epoch = num_batches(dataset, cfg.batch_size)
    parts = placement if placement.world > 1 else None
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(augmentation_seed(cfg.seed, epoch))
        model.train()
        reporter.epoch_started(epoch, cfg.epochs, per_epoch)
        started = time.perf_counter()
        sums = torch.zeros(len(task.tallies), dtype=torch.float64, device=device)
        bad_step = torch.full((), -1, dtype=torch.long, device=device)
        lr = cfg.lr
        loader = batches(task, dataset, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, parts=parts)
        for i, (batch, weight) in enumerate(loader):
            lr = learning_rate(cfg.schedule, cfg.lr, cfg.epochs, epoch, i / per_epoch)
            set_lr(optimizer, lr)
            loss, tallies = task.measure(model, move(batch, device))
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
                _check_divergence(bad_step, lr, placement)
            if after_step is not None:
                after_step(epoch, i, step)
            reporter.batch_done()
        _check_divergence(bad_step, lr, placement)
        check_state_finite(model, step, lr)  # the last step's update can overflow with a finite loss
        placement.sum_(sums)
        stats = EpochStats(epoch=epoch + 1, step=step, lr=lr, seconds=time.perf_counter() - started,
                           train=task.summarize(sums).row("train"))
        if after_epoch is not None:
            after_epoch(stats)
        reporter.epoch_done(stats)
    return step


def _check_divergence(bad_step: torch.Tensor, lr: float, placement: Placement) -> None:
    if placement.world > 1:
        # Every rank must stop together, at the earliest bad step any of them saw.
        never = torch.iinfo(torch.long).max
        earliest = torch.where(bad_step < 0, never, bad_step)
        placement.min_(earliest)
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


def divergence_advice(state_path: Path) -> str:
    """What a diverged run leaves behind, for the end of the error message."""
    if state_path.exists():
        done = read_checkpoint(state_path).json_field("state")["epochs_done"]
        return (f"the last good state (epoch {done}) is kept in {state_path}: "
                "continue from it with --resume and a smaller --lr")
    return "no epoch completed, so there is nothing to resume: start again with a smaller --lr (and --force)"


# ---------------------------------------------------------------------------------------------- resuming


def save_train_state(path: Path, tensors: Mapping[str, torch.Tensor], stats: EpochStats,
                     history: list[dict[str, Any]], config: Mapping[str, Any], *, command: str) -> None:
    """Everything needed to continue after this epoch: weights, optimizer tensors, RNG, position, metrics, and
    the run's options (with the identity of its inputs), which a resumed run must match. `command`: the command
    that writes it (a resumed run of another command is refused by name)."""
    tensors = dict(tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    # The names it holds: a tensor lost from the file (an optimizer's momentum) is then told from one the run
    # never had (no momentum yet), instead of silently starting afresh.
    info = {"command": command, "epochs_done": stats.epoch, "step": stats.step, "history": history,
            "config": dict(config), "tensors": sorted(tensors)}
    save_tensors(path, tensors, make_metadata("train-state", state=info))


# Options a resumed run may change: how long it runs, where, the learning rate (to recover from divergence), and
# the precision the result is written in (to write a result that did not fit the first one).
RESUMABLE_CHANGES = ("epochs", "device", "lr", "dtype")


@dataclass
class TrainState:
    """What `load_train_state` read back and checked: the tensors to put in place (the model's and the
    optimizer's, by the names `save_train_state` was given), the epochs and steps done, the figures so far, and
    the options the interrupted run had."""

    tensors: dict[str, torch.Tensor]
    epochs_done: int
    step: int
    history: list[dict[str, Any]]
    config: dict[str, Any]


def load_train_state(path: Path, config: Mapping[str, Any], *, command: str,
                     expected: Mapping[str, torch.Tensor], required: Collection[str] = ()) -> TrainState:
    """The state of an interrupted run of `command`, after checking that it is one (every field a resumed run
    trusts, and every tensor against `expected`: the tensors it will be loaded into, by name, of the same shape
    and dtype; `required` names must be there) and that the run's options and inputs are unchanged. Sets
    torch's RNG state to the saved one, last, once everything is checked."""
    info = read_checkpoint(path).json_field("state")
    if not isinstance(info, dict):
        raise TwaError(f"{path}: not a training state written by this tool (no 'state' metadata)")
    _check_command(path, info, command, config)
    epochs_done, step, history, saved = _checked_position(path, info)
    _check_same_options(path, saved, config)
    wanted = config.get("epochs")
    if isinstance(wanted, int) and wanted < epochs_done:  # an epoch done cannot be undone: nothing would run
        raise TwaError(f"--epochs {wanted}: the run in {path.parent} has done {epochs_done} epochs already; resume "
                       f"with --epochs {epochs_done} or more")
    tensors = load_tensors(path)
    _check_recorded(path, info.get("tensors"), tensors)
    rng = tensors.pop("rng.torch", None)
    rng = _check_rng(path, rng)
    _check_tensors(path, tensors, expected, required)
    try:
        torch.set_rng_state(rng)
    except (RuntimeError, ValueError) as exc:
        raise TwaError(f"{path}: damaged training state: 'rng.torch' is not a generator state ({exc})") from exc
    return TrainState(tensors, epochs_done, step, history, saved)


def _check_command(path: Path, info: Mapping[str, Any], command: str, config: Mapping[str, Any]) -> None:
    """A state of another command (a `sample` run's inside a train-subspace folder) is named as such, not read
    as a run whose every option changed. States written before the command was recorded are told apart by
    their options."""
    other = info.get("command")
    saved = info.get("config")
    if other is None and isinstance(saved, dict) and set(saved) != set(json.loads(json.dumps(dict(config)))):
        raise TwaError(f"{path}: the state of another command (or another version of twa), not of an interrupted "
                       f"`twa {command}` run; start a new run (--force replaces it)")
    if other is not None and other != command:
        raise TwaError(f"{path}: the state of an interrupted `twa {other}` run, not of `twa {command}`; resume it "
                       f"with `twa {other} --resume`, or start a new run (--force replaces it)")


def _checked_position(path: Path, info: Mapping[str, Any]) -> tuple[int, int, list[dict[str, Any]], dict[str, Any]]:
    """(epochs done, step, history, options), each as this tool writes them: an epoch count within the run's
    --epochs, one row of figures per epoch done, the step of the last row."""
    def bad(field: str, why: str) -> TwaError:
        return TwaError(f"{path}: damaged training state: '{field}' {why}")

    saved = info.get("config")
    if not isinstance(saved, dict):
        raise bad("config", "is not a table of the run's options")
    epochs, lr = saved.get("epochs"), saved.get("lr")
    if not _is_int(epochs) or epochs < 1:
        raise bad("config.epochs", f"is not a positive whole number ({epochs!r})")
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0):
        raise bad("config.lr", f"is not a positive number ({lr!r})")
    done, step, history = info.get("epochs_done"), info.get("step"), info.get("history")
    if not _is_int(done) or not 1 <= done <= epochs:
        raise bad("epochs_done", f"is not a whole number of epochs between 1 and the run's {epochs} ({done!r})")
    if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
        raise bad("history", "is not a list of per-epoch figures")
    if len(history) != done or any(row.get("epoch") != i + 1 for i, row in enumerate(history)):
        raise bad("history", f"does not hold one row for each of the {done} epochs done")
    for i, row in enumerate(history):
        for key, value in row.items():
            why = _unwritable_figure(key, value)
            if why is not None:
                raise bad("history", f"epoch {i + 1}: '{key}' {why}")
    if not _is_int(step) or step < done or step != history[-1].get("step"):
        raise bad("step", f"is not the step the last epoch ended at ({step!r})")
    return done, step, history, saved


# Figures of the held-out splits: finite weights (a saved epoch's) can still score NaN there when their logits
# overflow on examples training never saw, and --resume with a smaller --lr must recover from such a state.
HELD_OUT_FIGURES = ("val_", "test_")


def _unwritable_figure(key: str, value: Any) -> str | None:
    """Why `value` cannot be a figure a saved epoch recorded under `key` (None when it can be): every figure is
    a number; the epoch's lr and time are finite, and its training figures are not NaN (a non-finite training
    loss stops the run as diverged before anything is saved)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"is not a number ({value!r})"
    if key in ("lr", "seconds") and not (math.isfinite(value) and value >= 0):
        return f"is not a finite number ({value!r})"
    if math.isnan(value) and not key.startswith(HELD_OUT_FIGURES):
        return "is NaN, which a saved epoch's training cannot be (it would have stopped as diverged)"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_same_options(path: Path, saved: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    saved = {k: v for k, v in saved.items() if k not in RESUMABLE_CHANGES}
    now = {k: v for k, v in json.loads(json.dumps(dict(config))).items() if k not in RESUMABLE_CHANGES}
    if saved == now:
        return
    diff = next(k for k in sorted(set(now) | set(saved)) if saved.get(k) != now.get(k))
    if diff == "identity":
        raise TwaError(f"--resume: the checkpoints (or basis) differ from those the interrupted run in "
                       f"{path.parent} was training on; resume with the same inputs, or start a new run")
    was, is_now = saved.get(diff), now.get(diff)
    if isinstance(was, dict) and isinstance(is_now, dict):  # the task's own flags (--model, --data, ...)
        diff = next(k for k in sorted(set(was) | set(is_now)) if was.get(k) != is_now.get(k))
        was, is_now = was.get(diff), is_now.get(diff)
    flag = diff.replace("_", "-")
    raise TwaError(f"--resume: --{flag} was {was!r} in the interrupted run, now {is_now!r}")


def _check_recorded(path: Path, recorded: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    """The file holds exactly the tensors its state records (save_train_state lists them)."""
    if not (isinstance(recorded, list) and all(isinstance(name, str) for name in recorded)):
        raise TwaError(f"{path}: damaged training state: no record of the tensors it holds ('tensors' is "
                       f"{type(recorded).__name__}, not a list of names); start the run again with --force")
    extra = next((name for name in sorted(tensors) if name not in recorded), None)
    if extra is not None:
        raise TwaError(f"{path}: damaged training state: tensor '{extra}' is not among those it records holding")
    missing = next((name for name in sorted(recorded) if name not in tensors), None)
    if missing is not None:
        raise TwaError(f"{path}: damaged training state: it has no tensor '{missing}', which it records holding")


def _check_rng(path: Path, rng: torch.Tensor | None) -> torch.Tensor:
    """The generator state torch.set_rng_state takes: bytes of the length this torch writes."""
    if rng is None:
        raise TwaError(f"{path}: not a training state written by this tool (no 'rng.torch' RNG state)")
    own = torch.get_rng_state()
    if rng.dtype != own.dtype or rng.shape != own.shape:
        raise TwaError(f"{path}: damaged training state: 'rng.torch' is {rng.dtype} of shape {list(rng.shape)}, "
                       f"not the {own.dtype} of shape {list(own.shape)} torch's generator state is")
    return rng


def _check_tensors(path: Path, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                   required: Collection[str]) -> None:
    for name, value in tensors.items():
        like = expected.get(name)
        if like is None:
            raise TwaError(f"{path}: damaged training state: tensor '{name}' has no place in this run")
        if value.shape != like.shape or value.dtype != like.dtype:
            raise TwaError(f"{path}: damaged training state: '{name}' is {value.dtype} of shape "
                           f"{list(value.shape)}, this run's is {like.dtype} of shape {list(like.shape)}")
    missing = next((name for name in required if name not in tensors), None)
    if missing is not None:
        raise TwaError(f"{path}: damaged training state: it has no tensor '{missing}'")


def with_prefix(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def strip_prefix(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
