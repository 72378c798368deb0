"""`twa train-subspace`: learn the averaging coefficients (Algorithm 1, eq. 8, Appendix A.2.1 defaults)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from twa_cli.basis import DTYPES, Basis, combine, is_basis_file, load_basis, orthogonalize, save_basis
from twa_cli.basis_shards import load_basis_columns, orthogonalize_columns, save_sharded, shard_report
from twa_cli.batchnorm import has_batchnorm, recalibrate_bn
from twa_cli.checkpoints import (
    check_output,
    list_folder,
    load_tensors,
    make_metadata,
    read_checkpoint,
    save_tensors,
    write_json,
)
from twa_cli.data import Datasets, batches, load_data
from twa_cli.distributed import ColumnShardedSGD, Group, init_group
from twa_cli.errors import TwaError
from twa_cli.evaluation import Score, evaluate
from twa_cli.models import build_model, check_fits
from twa_cli.selection import Selection, select_checkpoints
from twa_cli.sharpness import LrCheck, check_lr, subspace_sharpness
from twa_cli.subspace import FlatParameters, SubspaceSGD
from twa_cli.variants import build_variant
from twa_cli.training import (
    Diverged,
    EpochStats,
    LoopConfig,
    Reporter,
    load_train_state,
    save_train_state,
    strip_prefix,
    divergence_advice,
    train_loop,
    write_metrics,
    with_prefix,
)

log = logging.getLogger("twa")

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
    # Variants (twa_cli/variants.py): the coefficients fitted on a held-out split, per layer, or summing to 1.
    fit_on: str = "train"  # train | val
    val_split: float = 0.0
    granularity: str = "model"  # model | layer
    group_size: int = 1
    affine: bool = False
    basis_dtype: str | None = None  # precision of the basis in the projection; None: as stored (fp32 from a folder)
    data: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    # Under torchrun: SyncBatchNorm during training (None: on under nccl, off under gloo, where torch lacks it).
    sync_bn: bool | None = None
    # Selection by step or metric, and the tensor-name prefix to strip (see twa_cli.selection, twa_cli.readers).
    start_step: int | None = None
    end_step: int | None = None
    every_step: int | None = None
    top: int | None = None
    by: str | None = None
    strip_prefix: str | None = None
    dtype: str | None = None  # precision of the written result (None: the model's own, fp32)

    def selection(self) -> Selection:
        return Selection(self.start, self.end, self.every, self.start_step, self.end_step, self.every_step,
                         self.top, self.by)


@dataclass
class SubspaceResult:
    out: Path
    result: Path
    coefficients: list[float]
    test: Score | None
    history: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] | None = None  # layer-wise coefficients (then `coefficients` is empty)
    shards: list[dict[str, Any]] = field(default_factory=list)  # what each rank held of the basis, under torchrun
    lr_check: LrCheck | None = None


def default_output(src: Path) -> Path:
    """A new folder beside the input, never inside it: ckpts/ -> ckpts-twa/, basis.safetensors -> basis-twa/."""
    src = src.resolve()
    stem = src.name if src.is_dir() else src.stem
    return src.parent / f"{stem}-twa"


def resolve_basis(src: Path, cfg: SubspaceConfig, progress=None, group: Group | None = None) -> tuple[Basis, bool]:
    """A basis file is loaded; a checkpoint folder is orthogonalized first. Returns (basis, made_here).

    Under torchrun the basis holds only this rank's columns (`group.columns(D)`).
    """
    if cfg.basis_dtype is not None and cfg.basis_dtype not in DTYPES:
        raise TwaError(f"--basis-dtype must be one of {', '.join(DTYPES)} (got '{cfg.basis_dtype}')")
    if group is not None:
        if is_basis_file(src):
            layout = read_checkpoint(src).json_field("layout") or []
            dim = sum(math.prod(shape) for _, shape in layout)
            return load_basis_columns(src, group.columns(dim)), False
        ckpts = select_checkpoints(list_folder(src, cfg.strip_prefix), cfg.selection())
        return orthogonalize_columns(ckpts, group, tol=cfg.tol, model=cfg.model, progress=progress)[0], True
    if is_basis_file(src):
        return load_basis(src), False
    ckpts = select_checkpoints(list_folder(src, cfg.strip_prefix), cfg.selection())
    basis = orthogonalize(ckpts, tol=cfg.tol, dtype=cfg.basis_dtype or "float32", model=cfg.model, progress=progress)
    return basis, True


def train_subspace(
    src: str | Path,
    out: str | Path | None = None,
    cfg: SubspaceConfig | None = None,
    *,
    force: bool = False,
    resume: bool = False,
    reporter: Reporter | None = None,
) -> SubspaceResult:
    """Train inside the span of the checkpoints in `src` (a folder or a basis file) and write the result.

    Under torchrun every rank calls this: the batch and the basis are split over the ranks
    (`twa_cli.distributed`), every rank ends with the same weights, and rank 0 alone writes.
    """
    cfg = cfg or SubspaceConfig()
    group = init_group(cfg.device)
    lead = group is None or group.rank == 0
    device = group.device if group is not None else cfg.device
    src = Path(src)
    if not src.exists():
        raise TwaError(f"{src}: no such file or folder")
    out = Path(out) if out is not None else default_output(src)
    state_path = out / STATE_FILE
    if resume:
        if not state_path.exists():
            raise TwaError(f"{out}: nothing to resume (no {STATE_FILE}); run without --resume")
    else:
        check_output(out, force, inputs=[src], folder=True)
    if group is not None:
        group.barrier()  # every rank has checked `out` before any creates it
    basis_src = out / BASIS_FILE if resume and (out / BASIS_FILE).exists() else src
    basis, made_here = resolve_basis(basis_src, cfg, group=group)
    arch = cfg.model or basis.arch
    if arch is None:
        raise TwaError(f"{src}: the checkpoints name no architecture; pass --model")
    data_spec = cfg.data or basis.data
    if data_spec is None:
        raise TwaError(f"{src}: the checkpoints name no data set; pass --data")

    # Every input is checked before the first file is written: a mistake leaves nothing behind.
    torch.manual_seed(cfg.seed)
    data_spec = _with_validation(data_spec, cfg)
    data = load_data(data_spec)
    fit_data = replace(data, train=data.val) if cfg.fit_on == "val" else data
    model = build_model(arch)
    check_basis_fits(model, basis, str(basis_src))
    variant = cfg.affine or cfg.granularity != "model"
    if variant and group is not None:
        raise TwaError("--affine and --granularity layer run in a single process, not under torchrun")
    columns = _columns(basis, group) if group is not None else None
    start_coords, offspan, init_tensors = _starting_point(basis, cfg.init, columns, group)
    _load_start(model, basis, init_tensors)
    sync_bn = _sync_batchnorm(model, cfg, group) if group is not None else False
    model.to(device)
    out.mkdir(parents=True, exist_ok=True)
    if made_here and not resume:
        if group is not None:
            save_sharded(basis, _columns(basis, group), out / BASIS_FILE, group, force=True)
        else:
            save_basis(basis, out / BASIS_FILE)
    names = [name for name, _ in basis.layout]
    hyper = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}

    def report(coords: torch.Tensor) -> dict[str, Any]:
        return {"coefficients": [float(a) for a in basis.coefficients(coords)]}

    # The basis keeps its stored precision (a half-precision one is widened slab by slab inside the projection);
    # on the CPU a mapped basis file is used in place.
    stored = DTYPES[cfg.basis_dtype] if cfg.basis_dtype is not None else basis.vectors.dtype
    if group is None:
        flat = FlatParameters(model, names)
        if variant:
            optimizer, report = build_variant(
                basis, flat, (start_coords, offspan), affine=cfg.affine, granularity=cfg.granularity,
                group_size=cfg.group_size, tol=cfg.tol, hyper=hyper,
            )
        else:
            vectors = basis.vectors.to(device=device, dtype=stored)
            optimizer = SubspaceSGD(
                flat, vectors, start_coords, offspan=None if offspan is None else offspan.to(device), **hyper
            )
    else:
        flat = FlatParameters(model, names, multiple_of=group.world)
        width = flat.params.numel() // group.world
        shard = _padded(basis.vectors, width).to(device=device, dtype=stored)
        basis.vectors = shard[:, : basis.vectors.shape[1]]  # one copy of the columns, not two
        optimizer = ColumnShardedSGD(
            flat, shard, start_coords, group, offspan=None if offspan is None else _padded(offspan[None], width)[0].to(device),
            **hyper,
        )
    # BatchNorm statistics: with SyncBatchNorm the ranks share each batch, else every rank sees all of it.
    recal_loader = group.batches if group is not None and sync_bn else None
    config = _json_config(cfg)
    history: list[dict[str, Any]] = []
    start_epoch = step = 0
    if resume:
        tensors, start_epoch, step, history = load_train_state(state_path, config)
        if lead:
            write_metrics(out / METRICS_FILE, history)
        saved = strip_prefix("model", tensors)
        check_fits(model, {k: tuple(v.shape) for k, v in saved.items()}, str(state_path))
        for name, value in model.state_dict().items():
            value.copy_(saved[name])  # in place: the parameters are views of the flat buffer
        optim = strip_prefix("optim", tensors)
        if not {"coords", "momentum", "offspan"} <= set(optim):
            raise TwaError(f"{state_path}: not a subspace training state (no optimizer coordinates)")
        optimizer.load_state_tensors(optim)
    check = None
    if cfg.lr_check:
        if group is None and cfg.granularity == "model":
            # For --affine the span's sharpness bounds the hull's: the check stays on the safe side.
            vectors = basis.vectors if basis.vectors.dtype == torch.float32 else basis.vectors.float()
            check = _check_lr(model, flat, vectors, fit_data, cfg, out / LR_CHECK_FILE, resume)
        else:
            log.info("--lr-check: not measured for %s; training at --lr %g",
                     "layer-wise coefficients" if group is None else "a run under torchrun", cfg.lr)
    lr = check.used if check is not None else cfg.lr

    def after_epoch(stats: EpochStats) -> None:
        if cfg.eval_every_epoch:
            # Figures measured after recalibration: running statistics go stale when the weights move fast.
            if cfg.bn_update:
                recalibrate_bn(model, data.train, max_batches=cfg.bn_batches, device=device, loader=recal_loader)
            test = evaluate(model, data.test, device=device)
            stats.extra.update(test_loss=test.loss, test_acc=test.accuracy)
        history.append(stats.to_dict())
        if lead:
            tensors = with_prefix("model", model.state_dict()) | with_prefix("optim", optimizer.state_tensors())
            save_train_state(state_path, tensors, stats, history, config)
            write_metrics(out / METRICS_FILE, history)

    loop = LoopConfig(cfg.epochs, lr, cfg.schedule, cfg.batch_size, cfg.seed, device)
    try:
        train_loop(model, optimizer, fit_data, loop, start_epoch=start_epoch, step=step, after_epoch=after_epoch,
                   reporter=reporter, shard=group)
    except Diverged as exc:
        raise Diverged(f"{exc}; no result was written; {divergence_advice(state_path)}") from exc

    if cfg.bn_update:
        recalibrate_bn(model, data.train, max_batches=cfg.bn_batches, device=device, loader=recal_loader)
    test = evaluate(model, data.test, device=device)
    reported = report(optimizer.coords.detach().cpu())
    coefficients = reported.get("coefficients", [])
    shards = shard_report(optimizer.basis, columns, group) if group is not None and columns is not None else []
    result = out / RESULT_FILE
    if lead:
        _write_coefficients(out / COEFFICIENTS_FILE, basis, coefficients, optimizer, reported.get("layers"))
        meta = make_metadata(
            "twa", arch=arch, data=data_spec, trainable=names, config=config,
            command="train-subspace", sources=[s["path"] for s in basis.sources], coefficients=coefficients,
            step=str(history[-1]["step"] if history else 0), epoch=str(cfg.epochs),
        )
        state = model.state_dict()
        if cfg.dtype is not None:
            state = {k: v.to(getattr(torch, cfg.dtype)) if v.is_floating_point() else v for k, v in state.items()}
        save_tensors(result, state, meta)
        state_path.unlink(missing_ok=True)
    if group is not None:
        group.barrier()  # no rank returns before the result is on disk
    return SubspaceResult(out, result, coefficients, test, history, basis.dropped, layers=reported.get("layers"),
                          shards=shards, lr_check=check)


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


def check_basis_fits(model: torch.nn.Module, basis: Basis, source: str) -> None:
    """The basis spans tensors the model has, shape for shape; else name the first mismatch."""
    params = dict(model.named_parameters())
    for name, shape in basis.layout:
        if name not in params:
            raise TwaError(f"{source}: the basis covers '{name}', which the model does not have; does --model fit?")
        if tuple(params[name].shape) != tuple(shape):
            raise TwaError(
                f"{source}: the basis has '{name}' with shape {list(shape)}, the model {list(params[name].shape)}; "
                "does --model fit?"
            )


def _columns(basis: Basis, group: Group) -> tuple[int, int]:
    return group.columns(sum(math.prod(shape) for _, shape in basis.layout))


def _padded(matrix: torch.Tensor, width: int) -> torch.Tensor:
    """A rank's columns, zero-padded to the common shard width (only the last rank's are short)."""
    out = torch.zeros(matrix.shape[0], width, dtype=matrix.dtype)
    out[:, : matrix.shape[1]] = matrix
    return out


def _sync_batchnorm(model: torch.nn.Module, cfg: SubspaceConfig, group: Group) -> bool:
    """Convert BatchNorm to SyncBatchNorm where torch can (nccl); on gloo say once why results differ."""
    if not has_batchnorm(model):
        return False
    wanted = cfg.sync_bn if cfg.sync_bn is not None else group.backend == "nccl"
    if wanted and group.backend != "nccl":
        raise TwaError("--sync-bn: PyTorch's SyncBatchNorm runs on GPUs only (nccl); use --no-sync-bn on CPU")
    if wanted:
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return True
    if group.rank == 0:
        log.warning(
            "BatchNorm under %s without SyncBatchNorm: each rank normalizes over its own %d-th of every batch, "
            "so training differs slightly from one process (recalibration and evaluation still see whole batches)",
            group.backend, group.world,
        )
    return False


def _starting_point(
    basis: Basis, init: str, columns: tuple[int, int] | None = None, group: Group | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
    """Coordinates of the start, its off-span part (None when it lies in the span) and its full tensors.

    Under torchrun `basis` holds the `columns` of this rank: the projection and norms are summed over ranks
    and the off-span part returned is this rank's slice of it.
    """
    if init == "center":
        return basis.center_coords(), None, None
    if init == "last":
        last = basis.sources[-1]["path"] if basis.sources else None
        if last is None or not Path(last).exists():
            raise TwaError(f"--init last: the last source checkpoint {last} is not readable")
        init = last
    tensors = load_tensors(init)
    for name, shape in basis.layout:
        if name not in tensors:
            raise TwaError(f"--init {init}: has no tensor '{name}' of the basis")
        if tuple(tensors[name].shape) != tuple(shape):
            raise TwaError(f"--init {init}: '{name}' has shape {list(tensors[name].shape)}, the basis {list(shape)}")
    w0 = torch.cat([tensors[n].reshape(-1).double() for n, _ in basis.layout])
    if columns is not None:
        w0 = w0[columns[0] : columns[1]]
    coords = basis.coords_of(w0)
    if group is not None:
        group.sum_(coords)
    residual = w0 - combine(basis.vectors, coords)
    squares = torch.stack([residual.pow(2).sum(), w0.pow(2).sum()])
    if group is not None:
        group.sum_(squares)
    # A start inside the span up to rounding (any source checkpoint) is snapped onto it.
    offspan = residual.float() if float(squares[0].sqrt()) > 1e-6 * float(squares[1].sqrt()) else None
    return coords, offspan, tensors


def _load_start(model: torch.nn.Module, basis: Basis, init_tensors: dict[str, torch.Tensor] | None) -> None:
    """Buffers (BatchNorm statistics) from the start file, else the checkpoints' average; recomputed at the end."""
    state = model.state_dict()
    source = init_tensors if init_tensors is not None else basis.buffers
    for name in state:
        if name in source and name not in dict(basis.layout):
            state[name] = source[name]
    model.load_state_dict(state)


def _with_validation(spec: dict[str, Any], cfg: SubspaceConfig) -> dict[str, Any]:
    """--val-split carves a held-out split (the same images every command holds out); --fit-on val needs one."""
    if cfg.val_split:
        spec = {**spec, "val_split": cfg.val_split}
    if cfg.fit_on not in ("train", "val"):
        raise TwaError(f"--fit-on must be train or val (got '{cfg.fit_on}')")
    if cfg.fit_on == "val" and not spec.get("val_split"):
        raise TwaError("--fit-on val needs --val-split (or checkpoints sampled with one)")
    return spec


def _write_coefficients(path: Path, basis: Basis, coefficients: list[float], optimizer: SubspaceSGD,
                        layers: list[dict[str, Any]] | None = None) -> None:
    if layers is not None:
        write_json(path, {"layers": layers, "sources": basis.sources, "dropped": basis.dropped})
        return
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


