"""`twa sample`: regular SGD training that writes the checkpoints TWA averages (Appendix A.2)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from twa_cli.commands.common import check_init_file, data_inputs
from twa_cli.commands.runfolder import (
    RunFolder,
    check_count,
    check_momentum,
    check_non_negative,
    check_positive,
    check_seed,
)
from twa_cli.core.batching import num_batches
from twa_cli.core.evaluation import evaluate
from twa_cli.core.training import (
    LoopConfig,
    divergence_advice,
    load_train_state,
    save_train_state,
    strip_prefix,
    train_loop,
    with_prefix,
)
from twa_cli.engine.loop import EpochStats, Reporter, check_state_finite
from twa_cli.errors import Diverged, TwaError
from twa_cli.io.checkpoints import load_tensors, make_metadata, read_checkpoint
from twa_cli.io.readers import as_written
from twa_cli.io.runfiles import METRICS_FILE, STATE_FILE, checkpoint_name, step_of_sample, write_metrics
from twa_cli.io.safetensors import save_tensors
from twa_cli.tasks.models import load_weights, trainable_names
from twa_cli.tasks.resolve import TaskRequest, resolve_task


@dataclass
class SampleConfig:
    """Regular training; defaults from the paper's Appendix A.2."""

    task: TaskRequest = field(default_factory=lambda: TaskRequest(model="small-cnn", data="digits"))
    epochs: int = 40
    lr: float = 0.1
    schedule: str = "step"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    per_epoch: int = 1  # checkpoints saved per epoch, evenly spaced
    seed: int = 0
    device: str = "cpu"
    # A checkpoint to start from (weights and BatchNorm statistics; momentum starts at zero), as the tail
    # stage continues a run from one of its checkpoints; None: a fresh initialization from the seed.
    init: str | None = None
    eval_every_epoch: bool = True

    def __post_init__(self) -> None:
        # A new run trains on each registry set's standard view (the paper's crop and flip for CIFAR), recorded
        # in its checkpoints like every other choice.
        views = {k: "standard" for k in ("augment", "normalize") if getattr(self.task, k) is None}
        if views:
            self.task = replace(self.task, **views)
        check_count(self.epochs, "--epochs")
        check_positive(self.lr, "--lr")
        check_momentum(self.momentum)
        check_non_negative(self.weight_decay, "--weight-decay")
        check_count(self.batch_size, "--batch-size")
        check_count(self.per_epoch, "--per-epoch")
        check_seed(self.seed)
        if self.task.model is None and self.task.task is None:
            raise TwaError("sample needs --model (or --task)")
        if self.task.data is None and self.task.task is None:
            raise TwaError("sample needs --data (or --task)")

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class SampleResult:
    out: Path
    checkpoints: list[Path]
    history: list[dict[str, Any]]


def sample_steps(per_epoch: int, batches_per_epoch: int) -> set[int]:
    """Batch indices (0-based, within an epoch) after which a sample is saved: evenly spaced, the last one last."""
    if per_epoch < 1 or per_epoch > batches_per_epoch:
        raise TwaError(f"--per-epoch must be between 1 and the {batches_per_epoch} batches of an epoch")
    return {round((j + 1) * batches_per_epoch / per_epoch) - 1 for j in range(per_epoch)}


def sample(out: str | Path, cfg: SampleConfig, *, resume: bool = False, force: bool = False,
           reporter: Reporter | None = None, invocation: dict[str, Any] | None = None) -> SampleResult:
    """Train with SGD and write the initial weights plus `per_epoch` samples per epoch into `out`."""
    if not resume:
        check_init_file(cfg.init)
    folder = RunFolder(Path(out), resume=resume, force=force, inputs=[cfg.init] if cfg.init else [],
                       ours=_written_by_sample)
    work = folder.work
    torch.manual_seed(cfg.seed)
    task = resolve_task(cfg.task)
    model = task.build_model()
    if cfg.init is not None and not resume:
        load_weights(model, _start_tensors(cfg.init), cfg.init)
    model.to(cfg.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    names = trainable_names(model)
    train_set = task.split("train", augment=True)
    if train_set is None:
        raise TwaError("the data has no training split")
    per_epoch_batches = num_batches(train_set, cfg.batch_size)
    save_after = sample_steps(cfg.per_epoch, per_epoch_batches)
    config = cfg.to_json()
    described = task.describe()
    history: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    if resume:
        expected = with_prefix("model", model.state_dict()) | with_prefix("momentum", dict(model.named_parameters()))
        state = load_train_state(folder.state, config, command="sample", expected=expected)
        tensors, start_epoch, step, history = state.tensors, state.epochs_done, state.step, state.history
    folder.check_not_inside(data_inputs(task))
    folder.claim()
    # The step of the state on disk (none yet: -1): samples after it are redone by --resume, or by a new run.
    saved_step = step if resume else -1

    def save_sample(step: int, epoch: float) -> None:
        check_state_finite(model, step, optimizer.param_groups[0]["lr"])
        meta = make_metadata("checkpoint", invocation=invocation, **described, step=str(step),
                             epoch=f"{epoch:.6g}", trainable=names, config=config, command="sample")
        save_tensors(work / checkpoint_name(step), model.state_dict(), meta)

    def after_step(epoch: int, index: int, global_step: int) -> None:
        if index in save_after:
            save_sample(global_step, epoch + (index + 1) / per_epoch_batches)

    def after_epoch(stats: EpochStats) -> None:
        if cfg.eval_every_epoch:
            stats.extra.update(evaluate(model, task, "test", device=cfg.device).row("test"))
        history.append(stats.to_dict())
        tensors = with_prefix("model", model.state_dict()) | with_prefix("momentum", _momenta(model, optimizer))
        save_train_state(folder.state, tensors, stats, history, config, command="sample")
        write_metrics(work / METRICS_FILE, history)
        nonlocal saved_step
        saved_step = stats.step

    loop = LoopConfig(cfg.epochs, cfg.lr, cfg.schedule, cfg.batch_size, cfg.seed, cfg.device)
    try:
        if resume:
            write_metrics(work / METRICS_FILE, history)
            load_weights(model, strip_prefix("model", tensors), str(folder.state))
            params = dict(model.named_parameters())
            for name, buf in strip_prefix("momentum", tensors).items():
                optimizer.state[params[name]]["momentum_buffer"] = buf.to(cfg.device)
        else:
            save_sample(0, 0.0)
        train_loop(model, optimizer, task, loop, start_epoch=start_epoch, step=step, after_step=after_step,
                   after_epoch=after_epoch, reporter=reporter, checked_steps=save_after)
    except BaseException as exc:
        _drop_samples_after(work, saved_step)  # the folder holds what the saved state has seen, as --resume expects
        removed = folder.abandon()
        if isinstance(exc, Diverged):
            advice = "nothing was kept: start again with a smaller --lr" if removed else divergence_advice(folder.state)
            raise Diverged(f"{exc}; {advice}") from exc
        raise
    out = folder.finish()
    return SampleResult(out, sorted(out.glob("ckpt-*.safetensors")), history)


def _start_tensors(path: str) -> dict[str, torch.Tensor]:
    if not as_written(path).is_file():
        raise TwaError(f"--init {path}: no such checkpoint file")
    return load_tensors(path)


def _written_by_sample(path: Path) -> bool:
    """What --force may replace: the files an earlier `sample` wrote (a damaged checkpoint stops it)."""
    if path.name in (STATE_FILE, METRICS_FILE):
        return True
    return step_of_sample(path) is not None and read_checkpoint(path).meta.get("command") == "sample"


def _drop_samples_after(folder: Path, step: int) -> None:
    for path in folder.glob("ckpt-*.safetensors"):
        sample_step = step_of_sample(path)
        if sample_step is not None and sample_step > step:
            path.unlink(missing_ok=True)


def _momenta(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        buf = optimizer.state.get(param, {}).get("momentum_buffer")
        if buf is not None:
            out[name] = buf
    return out
