"""`twa sample`: regular SGD training that writes the checkpoints TWA averages (Appendix A.2)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from twa_cli.checkpoints import (
    load_tensors,
    make_metadata,
    read_checkpoint,
    save_tensors,
)
from twa_cli.data import load_data, num_batches
from twa_cli.errors import TwaError
from twa_cli.evaluation import evaluate
from twa_cli.models import build_model, load_weights, model_spec, trainable_names
from twa_cli.training import (
    Diverged,
    EpochStats,
    LoopConfig,
    Reporter,
    check_weights_finite,
    divergence_advice,
    load_train_state,
    save_train_state,
    strip_prefix,
    train_loop,
    write_metrics,
    with_prefix,
)

STATE_FILE = "train-state.safetensors"
METRICS_FILE = "metrics.jsonl"


@dataclass
class SampleConfig:
    model: str = "small-cnn"
    data: dict[str, Any] | None = None
    epochs: int = 40
    lr: float = 0.1
    schedule: str = "step"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    per_epoch: int = 1
    seed: int = 0
    device: str = "cpu"
    # A checkpoint to start from (weights and BatchNorm statistics; momentum starts at zero), as the tail
    # stage continues a run from one of its checkpoints; None: a fresh initialization from the seed.
    init: str | None = None
    eval_every_epoch: bool = True


@dataclass
class SampleResult:
    out: Path
    checkpoints: list[Path]
    history: list[dict[str, Any]]


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.safetensors"


def sample_steps(per_epoch: int, batches_per_epoch: int) -> set[int]:
    """Batch indices (0-based, within an epoch) after which a sample is saved: evenly spaced, the last one last."""
    if per_epoch < 1 or per_epoch > batches_per_epoch:
        raise TwaError(f"--per-epoch must be between 1 and the {batches_per_epoch} batches of an epoch")
    return {round((j + 1) * batches_per_epoch / per_epoch) - 1 for j in range(per_epoch)}


def sample(
    out: str | Path,
    cfg: SampleConfig,
    *,
    resume: bool = False,
    force: bool = False,
    reporter: Reporter | None = None,
) -> SampleResult:
    """Train with SGD and write the initial weights plus `per_epoch` samples per epoch into `out`."""
    out = Path(out)
    if cfg.data is None:
        raise TwaError("--data is required")
    state_path = out / STATE_FILE
    if out.exists() and not out.is_dir():
        raise TwaError(f"{out}: is a file; the output is a folder")
    if resume:
        if not state_path.exists():
            raise TwaError(f"{out}: nothing to resume (no {STATE_FILE}); run without --resume")
    elif out.exists() and any(out.iterdir()) and not force:
        raise TwaError(f"{out}: already exists and is not empty (pass --force to overwrite, --resume to continue)")
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data)
    arch = model_spec(cfg.model, data.num_classes, data.in_channels, data.image_size)
    model = build_model(arch)
    if cfg.init is not None and not resume:
        load_weights(model, _start_tensors(cfg.init), cfg.init)
    model.to(cfg.device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    names = trainable_names(model)
    per_epoch_batches = num_batches(data.train, cfg.batch_size)
    save_after = sample_steps(cfg.per_epoch, per_epoch_batches)
    config = asdict(cfg)
    written: list[Path] = []
    if not resume and force and out.exists():
        _clear_previous_run(out)  # only now that every input has been checked

    def save_sample(step: int, epoch: float) -> None:
        check_weights_finite(model, step, optimizer.param_groups[0]["lr"])
        meta = make_metadata(
            "checkpoint", arch=arch, data=cfg.data, step=str(step), epoch=f"{epoch:.6g}", trainable=names,
            config=config, command="sample",
        )
        written.append(save_tensors(out / checkpoint_name(step), model.state_dict(), meta))

    history: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    if resume:
        tensors, start_epoch, step, history = load_train_state(state_path, config)
        write_metrics(out / METRICS_FILE, history)
        load_weights(model, strip_prefix("model", tensors), str(state_path))
        params = dict(model.named_parameters())
        for name, buf in strip_prefix("momentum", tensors).items():
            optimizer.state[params[name]]["momentum_buffer"] = buf.to(cfg.device)
    else:
        out.mkdir(parents=True, exist_ok=True)
        save_sample(0, 0.0)

    def after_step(epoch: int, index: int, global_step: int) -> None:
        if index in save_after:
            save_sample(global_step, epoch + (index + 1) / per_epoch_batches)

    def after_epoch(stats: EpochStats) -> None:
        if cfg.eval_every_epoch:
            test = evaluate(model, data.test, device=cfg.device)
            stats.extra.update(test_loss=test.loss, test_acc=test.accuracy)
        history.append(stats.to_dict())
        tensors = with_prefix("model", model.state_dict()) | with_prefix("momentum", _optimizer_tensors(model, optimizer))
        save_train_state(state_path, tensors, stats, history, config)
        write_metrics(out / METRICS_FILE, history)

    loop = LoopConfig(cfg.epochs, cfg.lr, cfg.schedule, cfg.batch_size, cfg.seed, cfg.device)
    try:
        train_loop(
            model, optimizer, data, loop, start_epoch=start_epoch, step=step,
            after_step=after_step, after_epoch=after_epoch, reporter=reporter, checked_steps=save_after,
        )
    except Diverged as exc:
        raise Diverged(f"{exc}; {divergence_advice(state_path)}") from exc
    return SampleResult(out, sorted(out.glob("ckpt-*.safetensors")), history)


def _start_tensors(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise TwaError(f"--init {path}: no such checkpoint file")
    return load_tensors(path)


def _clear_previous_run(out: Path) -> None:
    """--force: remove what an earlier `sample` wrote here, and nothing else."""
    ours = [p for p in out.glob("*.safetensors")
            if p.name == STATE_FILE or read_checkpoint(p).meta.get("command") == "sample"]
    for path in ours:  # decided for every file before removing any (a damaged one stops it first)
        path.unlink()
    (out / METRICS_FILE).unlink(missing_ok=True)


def _optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        buf = optimizer.state.get(param, {}).get("momentum_buffer")
        if buf is not None:
            out[name] = buf
    return out
