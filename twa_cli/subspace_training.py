"""`twa train-subspace`: learn the averaging coefficients (Algorithm 1, eq. 8, Appendix A.2.1 defaults)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from twa_cli.basis import Basis, is_basis_file, load_basis, orthogonalize, save_basis
from twa_cli.batchnorm import recalibrate_bn
from twa_cli.checkpoints import (
    check_output,
    list_folder,
    load_tensors,
    make_metadata,
    save_tensors,
    select,
    write_json,
    write_text,
)
from twa_cli.data import Datasets, batches, load_data
from twa_cli.errors import TwaError
from twa_cli.evaluation import Score, evaluate
from twa_cli.models import build_model, load_weights
from twa_cli.sharpness import LrCheck, check_lr, subspace_sharpness
from twa_cli.subspace import FlatParameters, SubspaceSGD
from twa_cli.training import (
    EpochStats,
    LoopConfig,
    Reporter,
    load_train_state,
    save_train_state,
    strip_prefix,
    train_loop,
    with_prefix,
)

RESULT_FILE = "twa.safetensors"
COEFFICIENTS_FILE = "coefficients.json"
METRICS_FILE = "metrics.jsonl"
BASIS_FILE = "basis.safetensors"
STATE_FILE = "train-state.safetensors"
LR_CHECK_FILE = "lr-check.json"
# The sharpness is measured on a few batches of their own order (not the first epoch's).
SHARPNESS_BATCHES = 2
SHARPNESS_EPOCH = 1_000_000

log = logging.getLogger("twa")


@dataclass
class SubspaceConfig:
    epochs: int = 10
    lr: float = 2.0
    schedule: str = "step"
    momentum: float = 0.9
    weight_decay: float = 1e-5
    batch_size: int = 128
    init: str = "center"  # center | last | a checkpoint file
    seed: int = 0
    device: str = "cpu"
    bn_update: bool = True
    bn_batches: int | None = None
    eval_every_epoch: bool = True
    lr_check: bool = True  # lower an unstable lr for this span (see sharpness.py)
    # Used only when SRC is a checkpoint folder (orthogonalized first).
    start: int = 0
    end: int | None = None
    every: int = 1
    tol: float = 1e-6
    data: dict[str, Any] | None = None
    model: dict[str, Any] | None = None


@dataclass
class SubspaceResult:
    out: Path
    result: Path
    coefficients: list[float]
    test: Score | None
    history: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    lr_check: LrCheck | None = None


def default_output(src: Path) -> Path:
    """A new folder beside the input, never inside it: ckpts/ -> ckpts-twa/, basis.safetensors -> basis-twa/."""
    src = src.resolve()
    stem = src.name if src.is_dir() else src.stem
    return src.parent / f"{stem}-twa"


def resolve_basis(src: Path, cfg: SubspaceConfig, progress=None) -> tuple[Basis, bool]:
    """A basis file is loaded; a checkpoint folder is orthogonalized first. Returns (basis, made_here)."""
    if is_basis_file(src):
        return load_basis(src), False
    ckpts = select(list_folder(src), cfg.start, cfg.end, cfg.every)
    return orthogonalize(ckpts, tol=cfg.tol, model=cfg.model, progress=progress), True


def train_subspace(
    src: str | Path,
    out: str | Path | None = None,
    cfg: SubspaceConfig | None = None,
    *,
    force: bool = False,
    resume: bool = False,
    reporter: Reporter | None = None,
) -> SubspaceResult:
    """Train inside the span of the checkpoints in `src` (a folder or a basis file) and write the result."""
    cfg = cfg or SubspaceConfig()
    src = Path(src)
    if not src.exists():
        raise TwaError(f"{src}: no such file or folder")
    out = Path(out) if out is not None else default_output(src)
    state_path = out / STATE_FILE
    if resume:
        if not state_path.exists():
            raise TwaError(f"{out}: nothing to resume (no {STATE_FILE}); run without --resume")
    else:
        check_output(out, force, inputs=[src])
    basis_src = out / BASIS_FILE if resume and (out / BASIS_FILE).exists() else src
    basis, made_here = resolve_basis(basis_src, cfg)
    arch = cfg.model or basis.arch
    if arch is None:
        raise TwaError(f"{src}: the checkpoints name no architecture; pass --model")
    data_spec = cfg.data or basis.data
    if data_spec is None:
        raise TwaError(f"{src}: the checkpoints name no data set; pass --data")
    out.mkdir(parents=True, exist_ok=True)
    if made_here and not resume:
        save_basis(basis, out / BASIS_FILE)

    torch.manual_seed(cfg.seed)
    data = load_data(data_spec)
    model = build_model(arch)
    start_coords, offspan, init_tensors = _starting_point(basis, cfg.init)
    _load_start(model, basis, init_tensors)
    model.to(cfg.device)
    flat = FlatParameters(model, [name for name, _ in basis.layout])
    vectors = basis.vectors.to(device=cfg.device, dtype=flat.params.dtype)
    optimizer = SubspaceSGD(
        flat, vectors, start_coords, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        offspan=None if offspan is None else offspan.to(cfg.device),
    )
    config = _json_config(cfg)
    history: list[dict[str, Any]] = []
    start_epoch = step = 0
    if resume:
        tensors, start_epoch, step, history = load_train_state(state_path, config)
        for name, value in model.state_dict().items():
            value.copy_(tensors[f"model.{name}"])  # in place: the parameters are views of the flat buffer
        optimizer.load_state_tensors(strip_prefix("optim", tensors))
    check = _check_lr(model, flat, vectors, data, cfg, out / LR_CHECK_FILE, resume) if cfg.lr_check else None
    lr = check.used if check is not None else cfg.lr

    def after_epoch(stats: EpochStats) -> None:
        if cfg.eval_every_epoch:
            # Figures measured after recalibration: running statistics go stale when the weights move fast.
            if cfg.bn_update:
                recalibrate_bn(model, data.train_eval, max_batches=cfg.bn_batches, device=cfg.device)
            test = evaluate(model, data.test, device=cfg.device)
            stats.extra.update(test_loss=test.loss, test_acc=test.accuracy)
        history.append(stats.to_dict())
        tensors = with_prefix("model", model.state_dict()) | with_prefix("optim", optimizer.state_tensors())
        save_train_state(state_path, tensors, stats, history, config)
        write_text(out / METRICS_FILE, "".join(json.dumps(h) + "\n" for h in history))

    loop = LoopConfig(cfg.epochs, lr, cfg.schedule, cfg.batch_size, cfg.seed, cfg.device)
    train_loop(model, optimizer, data, loop, start_epoch=start_epoch, step=step, after_epoch=after_epoch,
               reporter=reporter)

    if cfg.bn_update:
        recalibrate_bn(model, data.train_eval, max_batches=cfg.bn_batches, device=cfg.device)
    test = evaluate(model, data.test, device=cfg.device)
    alpha = basis.coefficients(optimizer.coords.cpu())
    coefficients = [float(a) for a in alpha]
    _write_coefficients(out / COEFFICIENTS_FILE, basis, coefficients, optimizer)
    meta = make_metadata(
        "twa", arch=arch, data=data_spec, trainable=[name for name, _ in basis.layout], config=config,
        command="train-subspace", sources=[s["path"] for s in basis.sources], coefficients=coefficients,
        step=str(history[-1]["step"] if history else 0), epoch=str(cfg.epochs),
    )
    result = save_tensors(out / RESULT_FILE, model.state_dict(), meta)
    state_path.unlink(missing_ok=True)
    return SubspaceResult(out, result, coefficients, test, history, basis.dropped, check)


def _check_lr(
    model: torch.nn.Module, flat: FlatParameters, vectors: torch.Tensor, data: Datasets, cfg: SubspaceConfig,
    path: Path, resume: bool,
) -> LrCheck:
    """Measure the span's sharpness at the start (once: a resumed run reads what the first part decided)."""
    if resume and path.exists():
        return LrCheck(**json.loads(path.read_text()))
    params = dict(model.named_parameters())
    sample = list(islice(batches(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=SHARPNESS_EPOCH),
                         SHARPNESS_BATCHES))
    sharpness = subspace_sharpness(model, [params[n] for n in flat.names], vectors, sample, device=cfg.device)
    check = check_lr(cfg.lr, cfg.momentum, sharpness)
    write_json(path, check.to_dict())
    if check.used < check.requested:
        log.warning(
            "--lr %g is too large for this span (its sharpest direction has curvature %.3g; steps above %.3g "
            "diverge along it): training at lr %.3g instead (--no-lr-check keeps %g)",
            check.requested, sharpness, check.limit, check.used, check.requested,
        )
    return check


def _starting_point(basis: Basis, init: str) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
    """Coordinates of the start, its off-span part (None when it lies in the span) and its full tensors."""
    if init == "center":
        return basis.center_coords(), None, None
    if init == "last":
        last = basis.sources[-1]["path"] if basis.sources else None
        if last is None or not Path(last).exists():
            raise TwaError(f"--init last: the last source checkpoint {last} is not readable")
        init = last
    tensors = load_tensors(init)
    missing = [n for n, _ in basis.layout if n not in tensors]
    if missing:
        raise TwaError(f"--init {init}: has no tensor '{missing[0]}' of the basis")
    w0 = torch.cat([tensors[n].reshape(-1).double() for n, _ in basis.layout])
    coords = basis.vectors.double() @ w0
    residual = w0 - basis.vectors.t().double() @ coords
    # A start inside the span up to rounding (any source checkpoint) is snapped onto it.
    offspan = residual.float() if float(residual.norm()) > 1e-6 * float(w0.norm()) else None
    return coords, offspan, tensors


def _load_start(model: torch.nn.Module, basis: Basis, init_tensors: dict[str, torch.Tensor] | None) -> None:
    """Buffers (BatchNorm statistics) from the start file, else the checkpoints' average; recomputed at the end."""
    state = model.state_dict()
    source = init_tensors if init_tensors is not None else basis.buffers
    for name in state:
        if name in source and name not in dict(basis.layout):
            state[name] = source[name]
    model.load_state_dict(state)


def _write_coefficients(path: Path, basis: Basis, coefficients: list[float], optimizer: SubspaceSGD) -> None:
    rows = [
        {"path": src["path"], "step": src.get("step"), "epoch": src.get("epoch"), "alpha": alpha}
        for src, alpha in zip(basis.sources, coefficients)
    ]
    write_json(path, {
        "coefficients": rows,
        "sum": sum(coefficients),
        "rank": basis.rank,
        "dropped": basis.dropped,
        "offspan_scale": optimizer.offspan_scale if optimizer.offspan is not None else None,
    })


def _json_config(cfg: SubspaceConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg)))


