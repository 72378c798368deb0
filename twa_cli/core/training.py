"""Training on a task: the tensor core's loop (`twa_cli.engine.loop`) fed a task's split, shared by `sample` (plain
SGD) and `train-subspace` (projected SGD), and the files that let an interrupted run resume exactly. The data order
and augmentation randomness depend only on (seed, epoch), so a run resumed from the end of an epoch replays
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from twa_cli.core.batching import Parts, batches, num_batches, pinned_for
from twa_cli.core.placement import Placement, SingleProcess
from twa_cli.engine.batch import Batch
from twa_cli.engine.loop import EpochHook, EpochStats, Reporter, StepHook, train_epochs
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import load_tensors, make_metadata, read_checkpoint
from twa_cli.io.safetensors import save_tensors
from twa_cli.tasks.base import Task


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
class TaskBatches:
    """A task's split as the loop's batch source: an order of examples that depends only on (seed, epoch), and
    under torchrun each rank's part of every global batch (`twa_cli.core.batching`)."""

    task: Task
    dataset: Dataset
    batch_size: int
    seed: int
    parts: Parts | None = None
    pin: bool = False  # the batches go to a GPU (`batches`)

    @property
    def width(self) -> int:
        return len(self.task.tallies)

    def per_epoch(self) -> int:
        return num_batches(self.dataset, self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[Batch, float]]:
        return batches(self.task, self.dataset, self.batch_size, shuffle=True, seed=self.seed, epoch=epoch,
                       parts=self.parts, pin=self.pin)

    def measure(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.task.measure(model, batch)

    def summarize(self, sums: torch.Tensor) -> dict[str, float]:
        return self.task.summarize(sums).row("train")


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
    """The tensor core's loop (`twa_cli.engine.loop.train_epochs`) on a task's split; returns the global step.

    Under torchrun (`placement` of several ranks) this process computes its part of each global batch, and the
    epoch's figures and the divergence check are combined over all ranks.
    """
    placement = placement or SingleProcess(cfg.device)
    dataset = task.split(cfg.split, augment=True)
    if dataset is None:
        raise TwaError(f"the data has no {cfg.split} split to train on")
    source = TaskBatches(task, dataset, cfg.batch_size, cfg.seed, placement if placement.world > 1 else None,
                         pin=pinned_for(cfg.device))
    return train_epochs(model, optimizer, source, epochs=cfg.epochs, lr=cfg.lr, schedule=cfg.schedule,
                        seed=cfg.seed, device=cfg.device, start_epoch=start_epoch, step=step, after_step=after_step,
                        after_epoch=after_epoch, reporter=reporter, checked_steps=checked_steps,
                        collective=placement)


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
