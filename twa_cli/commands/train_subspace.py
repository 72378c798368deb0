"""`twa train-subspace`: learn the averaging coefficients (Algorithm 1, eq. 8, Appendix A.2.1 defaults).

One straight path for every placement (one process, or the ranks of a torchrun job) and every variant: find
the basis (a file, or the checkpoints of a folder orthogonalized here), resolve the task, start at the center
of the checkpoints (or elsewhere), check the learning rate against the span's sharpness, train, recompute
BatchNorm, write the result and its coefficients. Every input is checked before the first file is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from twa_cli.commands.common import (
    check_held_out,
    check_init_file,
    data_inputs,
    described,
    pick,
    resolve_device,
    subspace_names,
    task_of,
)
from twa_cli.commands.estimates import Plan, plan_train_subspace, plan_train_subspace_basis
from twa_cli.commands.runfolder import (
    RunFolder,
    check_count,
    check_momentum,
    check_non_negative,
    check_positive,
    check_seed,
)
from twa_cli.core.basis import FINGERPRINT_PRIME, Basis, check_tol, fingerprint
from twa_cli.core.basis_files import is_basis_file
from twa_cli.core.batching import batches, num_batches
from twa_cli.core.batchnorm import recalibrate_bn
from twa_cli.core.coefficients import CoefficientReport
from twa_cli.core.evaluation import evaluate, score_if_any
from twa_cli.core.holdout import MIN_VAL_EXAMPLES, KeepBest, Point, held_out_count, scored_steps
from twa_cli.core.placement import Placement, placement_for
from twa_cli.core.selection import Selection
from twa_cli.core.sharpness import LrCheck, check_lr, sample_loss, subspace_sharpness
from twa_cli.core.training import (
    LoopConfig,
    divergence_advice,
    load_train_state,
    save_train_state,
    strip_prefix,
    train_loop,
    with_prefix,
)
from twa_cli.core.variants import GRANULARITIES, Report, build_variant
from twa_cli.engine.loop import EpochStats, Reporter, check_state_finite
from twa_cli.engine.orthogonalizer import combine
from twa_cli.engine.schedules import SCHEDULES
from twa_cli.engine.subspace import SubspaceSGD
from twa_cli.errors import Diverged, TwaError
from twa_cli.io.checkpoints import (
    Checkpoint,
    Source,
    load_tensors,
    make_metadata,
    read_checkpoint,
    to_storage_dtype,
)
from twa_cli.io.readers import ReadOptions, as_written
from twa_cli.io.runfiles import (
    BASIS_FILE,
    COEFFICIENTS_FILE,
    HF_RESULT_FILE,
    LR_CHECK_FILE,
    METRICS_FILE,
    RESULT_FILE,
    STATE_FILE,
    VALIDATION_FILE,
    read_json,
    write_metrics,
)
from twa_cli.io.safetensors import save_tensors
from twa_cli.io.writers import write_json
from twa_cli.tasks.base import Metrics, Task
from twa_cli.tasks.models import check_fits, saved_state
from twa_cli.tasks.resolve import Recorded, TaskRequest, resolve_task
from twa_cli.units import STORAGE_DTYPES, torch_dtype

log = logging.getLogger("twa")

# The sharpness is measured on a few batches of their own order (not the first epoch's).
SHARPNESS_BATCHES = 2
SHARPNESS_EPOCH = 1_000_000
# --init values that name no file.
INIT_KEYWORDS = ("best", "center", "last")


# What a preset sets, unless a flag says otherwise. "default": choose on held-out data (twa_cli.core.holdout) and
# check the lr against the span's curvature; "paper": Algorithm 1 as the paper runs it (Appendix A.2.1), fitted on
# the training data from the center, at the fixed lr, and returned as it ends.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {"init": "best", "lr_check": True, "select": "val"},
    "paper": {"init": "center", "lr_check": False, "select": "none"},
}
SELECTS = ("val", "none")


@dataclass
class SubspaceConfig:
    """Subspace training; the optimizer's defaults from the paper's Appendix A.2.1, the rest from `preset`."""

    epochs: int = 10
    lr: float = 2.0  # the paper's condensed rate
    schedule: str = "step"
    momentum: float = 0.9
    weight_decay: float = 1e-5  # lambda of eq. 5: an L2 penalty on the averaging coefficients
    batch_size: int = 128
    preset: str = "default"
    # best (the better of center and last on the validation split) | center | last | a checkpoint file
    init: str | None = None
    seed: int = 0
    device: str = "auto"
    bn_update: bool = True
    bn_batches: int | None = None
    eval_every_epoch: bool = True
    lr_check: bool | None = None  # lower an unstable lr for this span (twa_cli.core.sharpness)
    # val: score the start and the run on the validation split and return the best point; none: the run's end
    select: str | None = None
    # When SRC is a checkpoint folder (orthogonalized first): which checkpoints, read how, and the tolerance.
    selection: Selection = field(default_factory=Selection)
    read: ReadOptions = field(default_factory=ReadOptions)
    tol: float = 1e-6
    task: TaskRequest = field(default_factory=TaskRequest)
    # Variants (twa_cli/core/variants.py): the coefficients fitted on a held-out split, per layer, or summing to 1.
    fit_on: str = "train"  # train | val
    granularity: str = "model"  # model | layer
    group_size: int = 1
    affine: bool = False
    basis_dtype: str | None = None  # precision of the basis in the projection; None: as stored (fp32 from a folder)
    # Under torchrun: SyncBatchNorm during training (None: on under nccl, off under gloo, where torch lacks it).
    sync_bn: bool | None = None
    dtype: str | None = None  # precision of the written result (None: the model's own, fp32)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise TwaError(f"--preset must be one of {', '.join(PRESETS)} (got '{self.preset}')")
        defaults = dict(PRESETS[self.preset])
        if self.fit_on == "val":  # the coefficients are fitted on the validation split: nothing is left to choose on
            defaults["select"] = "none"
        if (self.select or defaults["select"]) == "none":  # nothing scored: no start is picked on it either
            defaults["init"] = "center"
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.select not in SELECTS:
            raise TwaError(f"--select must be one of {', '.join(SELECTS)} (got '{self.select}')")
        if self.select == "val" and self.fit_on == "val":
            raise TwaError("--select val chooses on the validation split, which --fit-on val fits the coefficients "
                           "on; use one of them")
        if self.init == "best" and self.select != "val":
            raise TwaError("--init best picks the start on the validation split: it needs --select val")
        check_count(self.epochs, "--epochs")
        check_positive(self.lr, "--lr")
        check_momentum(self.momentum)
        check_non_negative(self.weight_decay, "--weight-decay")
        check_count(self.batch_size, "--batch-size")
        check_count(self.group_size, "--group-size")
        check_seed(self.seed)
        check_tol(self.tol)
        if self.schedule not in SCHEDULES:
            raise TwaError(f"--schedule must be one of {', '.join(SCHEDULES)} (got '{self.schedule}')")
        if self.fit_on not in ("train", "val"):
            raise TwaError(f"--fit-on must be train or val (got '{self.fit_on}')")
        if self.granularity not in GRANULARITIES:
            raise TwaError(f"--granularity must be one of {', '.join(GRANULARITIES)} (got '{self.granularity}')")
        if self.affine and self.granularity != "model":
            raise TwaError("--affine works with --granularity model only")
        for flag, value in (("--basis-dtype", self.basis_dtype), ("--dtype", self.dtype)):
            if value is not None and value not in STORAGE_DTYPES:
                raise TwaError(f"{flag} must be one of {', '.join(STORAGE_DTYPES)} (got '{value}')")

    @property
    def variant(self) -> bool:
        return self.affine or self.granularity != "model"

    @property
    def selecting(self) -> bool:
        return self.select == "val"

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class SubspaceResult:
    out: Path
    result: Path
    report: CoefficientReport
    test: Metrics | None
    history: list[dict[str, Any]] = field(default_factory=list)
    holdings: list[dict[str, Any]] = field(default_factory=list)  # what each rank held of the basis, under torchrun
    lr_check: LrCheck | None = None
    validation: Validation | None = None  # the points scored on the validation split and the one kept

    @property
    def coefficients(self) -> list[float]:
        return self.report.alpha or []

    @property
    def selected(self) -> str | None:
        return self.validation.kept if self.validation else None

    def to_dict(self) -> dict[str, Any]:
        report = self.report.to_json()
        return {"output": str(self.out), "checkpoint": str(self.result), "kind": report["kind"],
                "coefficients": self.report.alpha, "layers": report.get("layers"), "coefficient_sum": report.get("sum"),
                "dropped": self.report.dropped, "test": self.test.to_dict() if self.test else None,
                "shards": self.holdings, "lr_check": self.lr_check.to_dict() if self.lr_check else None,
                "selected": self.selected, "validation": self.validation.to_dict() if self.validation else None}


@dataclass
class Validation:
    """What `validation.json` holds: the split chosen on, the metric, every point scored, the one kept."""

    split: str
    metric: str
    points: list[Point]
    kept: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "metric": self.metric, "kept": self.kept,
                "points": [p.to_dict() for p in self.points]}


def default_output(src: Path) -> Path:
    """A new folder beside the input, never inside it: ckpts/ -> ckpts-twa/, basis.safetensors -> basis-twa/."""
    src = Path(src).resolve()
    stem = src.name if src.is_dir() else src.name.removesuffix(".safetensors")
    return src.parent / f"{stem}-twa"


@dataclass
class _Inputs:
    """The basis, the checkpoints it spans (when known), the task, and the identity of the sources."""

    basis: Basis
    ckpts: list[Checkpoint] | None
    task: Task
    made_here: bool
    identity: dict[str, Any]
    where: str  # what to name in a message about the basis


def train_subspace(src: str | Path, out: str | Path | None = None, cfg: SubspaceConfig | None = None, *,
                   force: bool = False, resume: bool = False, dry_run: bool = False, reporter: Reporter | None = None,
                   invocation: dict[str, Any] | None = None) -> SubspaceResult | Plan:
    """Train inside the span of the checkpoints in `src` (a folder or a basis file) and write the result.

    Under torchrun every rank calls this: the batch and the basis are split over the ranks, every rank ends
    with the same weights, and rank 0 alone writes."""
    cfg = cfg or SubspaceConfig()
    src = Path(src)
    if not src.exists():
        raise TwaError(f"{src}: no such file or folder")
    out = Path(out) if out is not None else default_output(src)
    check_init_file(cfg.init, keywords=INIT_KEYWORDS)
    if dry_run:
        return _plan(src, cfg)
    with placement_for(resolve_device(cfg.device)) as placement:
        device = placement.device
        init_file = [cfg.init] if cfg.init not in INIT_KEYWORDS else []
        folder = RunFolder(out, resume=resume, force=force, inputs=[src, *init_file], ours=_written_by_train_subspace)
        placement.barrier()  # every rank has checked `out` before any creates it
        inputs = _inputs(src, folder.work, cfg, placement, resume)
        # The checkpoints a basis spans are inputs too (--init last and the variants read them), and so is the
        # data: never write there.
        folder.check_not_inside([*{Path(s.path).parent for s in inputs.basis.sources}, *data_inputs(inputs.task)])
        if cfg.variant and placement.world > 1:
            raise TwaError("--affine and --granularity layer run in a single process, not under torchrun")
        return _train(inputs, folder, cfg, placement, device, resume, reporter, invocation)


def _inputs(src: Path, work: Path, cfg: SubspaceConfig, placement: Placement, resume: bool) -> _Inputs:
    """Everything the run trains on, checked; a folder is orthogonalized only once the task is known."""
    if is_basis_file(src):
        basis = placement.load_basis(src)
        task = resolve_task(cfg.task, Recorded.of(src, basis.recorded))
        if cfg.fit_on == "val":
            check_held_out(task, "--fit-on val")
        ckpts = None
        return _Inputs(basis, ckpts, task, False, _identity(basis, placement), str(src))
    ckpts = pick(src, cfg.selection, cfg.read)
    task = task_of(cfg.task, ckpts[0])  # before orthogonalizing: "pass --model" comes first
    if cfg.fit_on == "val":
        check_held_out(task, "--fit-on val")
    names, ckpts = subspace_names(cfg.task, ckpts)
    saved = work / BASIS_FILE
    if resume and saved.exists():
        basis = placement.load_basis(saved)
        hashes = placement.gather([Source.of(c).sha256 for c in ckpts] if placement.lead else None)[0]
        if hashes != [s.sha256 for s in basis.sources]:
            raise TwaError(f"--resume: the checkpoints selected in {src} differ from those the interrupted run in "
                           f"{work} was training on; resume with the same inputs, or start a new run")
        return _Inputs(basis, ckpts, task, False, _identity(basis, placement), str(saved))
    basis = placement.orthogonalize(ckpts, names=names, tol=cfg.tol, dtype=cfg.basis_dtype or "float32",
                                    recorded=described(cfg.task, ckpts[0]))
    return _Inputs(basis, ckpts, task, True, _identity(basis, placement), f"the basis of {src}")


def _identity(basis: Basis, placement: Placement) -> dict[str, Any]:
    """What a resumed run must train on again: the checkpoints (hashed by rank 0), the coordinates, and the
    basis vectors themselves (their fingerprint is the same under any number of ranks)."""
    lo, _ = placement.columns(basis.size)
    parts = placement.gather(fingerprint(basis.vectors, lo))
    vectors = [sum(column) % FINGERPRINT_PRIME for column in zip(*parts, strict=True)]
    sources = placement.gather([s.sha256 for s in basis.sources])[0]
    coords = hashlib.sha256(basis.coords.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return {"sources": sources, "coords": coords, "vectors": vectors}


def _train(inputs: _Inputs, folder: RunFolder, cfg: SubspaceConfig, placement: Placement, device: str, resume: bool,
           reporter: Reporter | None, invocation: dict[str, Any] | None) -> SubspaceResult:
    basis, task, work = inputs.basis, inputs.task, folder.work
    torch.manual_seed(cfg.seed)
    fit_split = "val" if cfg.fit_on == "val" else "train"
    fit_data = task.split(fit_split, augment=True)
    if fit_data is None and fit_split == "val":
        raise TwaError("--fit-on val needs --val-split (or checkpoints sampled with one)")
    if fit_data is not None and len(fit_data) == 0:  # type: ignore[arg-type]
        raise TwaError(f"the data's {fit_split} split has no examples to train on")
    model = task.build_model()
    check_basis_fits(model, basis, inputs.where)
    start_coords, offspan, init_tensors = _starting_point(basis, cfg, placement)
    _load_start(model, basis, init_tensors)
    # After every check on the inputs: a refused run says one line, not the held-out split first.
    split_name = _validation_split(task, announce=not resume and placement.lead) if cfg.selecting else None
    sync_bn = placement.sync_batchnorm(model, cfg.sync_bn) if placement.world > 1 else False
    model.to(device)
    names = [name for name, _ in basis.layout]
    hyper = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    flat = placement.flat_parameters(model, names)
    optimizer, report_fn = _optimizer(inputs, cfg, placement, flat, start_coords, offspan, hyper)
    config = {**cfg.to_json(), "identity": inputs.identity}
    if placement.lead:
        folder.claim()  # now that every input has been checked
    placement.barrier()
    recal_parts = placement if sync_bn else None

    def recalibrate() -> None:
        if cfg.bn_update:
            recalibrate_bn(model, task, max_batches=cfg.bn_batches, device=device, parts=recal_parts)

    keep = KeepBest(task, optimizer, model) if split_name is not None else None

    def score(label: str, step: int, recalibrated: bool = True) -> None:
        """Score the current point on the validation split (BatchNorm recomputed first, unless the point comes with
        statistics of its own) and keep it if it is the best so far."""
        assert keep is not None
        if recalibrated:
            recalibrate()
        figures = evaluate(model, task, "val", device=device)
        if keep.consider(label, step, figures, agree=lambda kept: placement.gather(kept)[0]):
            log.debug("validation: %s is the best so far (%s)", label, figures.values)

    history: list[dict[str, Any]] = []
    start_epoch = step = 0
    saved_lr = None
    try:
        if inputs.made_here and not resume:
            placement.save_basis(basis, work / BASIS_FILE, invocation=invocation, exclusive=True)
        if resume:
            start_epoch, step, history, saved_lr = _resume(folder, config, model, optimizer, placement, keep)
        elif keep is not None:
            _choose_start(keep, score, basis, model, optimizer, cfg, device)
        check = _learning_rate(model, task, optimizer, cfg, placement, device, folder, fit_split, saved_lr)
        if resume and placement.lead:  # once every record the run resumes from is read and checked
            write_metrics(work / METRICS_FILE, history)
        lr = check.used if check is not None else cfg.lr
        per_epoch = num_batches(task.split(fit_split, augment=True), cfg.batch_size)
        mid_epoch = scored_steps(per_epoch, cfg.epochs) if keep is not None else set()

        def after_step(epoch: int, i: int, step: int) -> None:
            if i in mid_epoch:
                score(f"epoch {epoch + (i + 1) / per_epoch:.2f}", step)

        def after_epoch(stats: EpochStats) -> None:
            if keep is not None:
                score(f"epoch {stats.epoch}", stats.step)
                stats.extra.update(Metrics(keep.points[-1].figures, 0).row("val"))
            if cfg.eval_every_epoch and task.split("test", augment=False) is not None:
                if keep is None:  # figures after recalibration: running statistics go stale when weights move fast
                    recalibrate()
                stats.extra.update(evaluate(model, task, "test", device=device).row("test"))
            history.append(stats.to_dict())
            if placement.lead:
                tensors = with_prefix("model", model.state_dict()) | with_prefix("optim", optimizer.state_tensors())
                if keep is not None:
                    tensors |= with_prefix("best", keep.state_tensors())
                    write_json(work / VALIDATION_FILE, _validation(keep, split_name).to_dict())
                save_train_state(folder.state, tensors, stats, history, config, command="train-subspace")
                write_metrics(work / METRICS_FILE, history)

        loop = LoopConfig(cfg.epochs, lr, cfg.schedule, cfg.batch_size, cfg.seed, device, split=fit_split)
        try:
            train_loop(model, optimizer, task, loop, start_epoch=start_epoch, step=step, after_step=after_step,
                       after_epoch=after_epoch, reporter=reporter, placement=placement)
        except Diverged as exc:
            if keep is None:
                raise
            # Every point kept was scored finite before it: the run's best stands.
            log.warning("%s; the result is the best point scored before it (%s)", str(exc).split("; try")[0],
                        keep.best_label)
        if keep is not None:
            keep.restore()  # the best point, with the BatchNorm statistics it was scored with
        else:
            recalibrate()
        check_state_finite(model, step, lr)
        if check is not None and history and check.left_basin(history[-1].get("train_loss")):
            log.warning("the training loss ended at %.4g, above the %.4g it started at: the steps left the span's "
                        "basin at lr %.3g (the lr check measures at the start only)%s", history[-1]["train_loss"],
                        check.start_loss, lr, "" if keep is not None else "; train again with a smaller --lr")
    except BaseException as exc:
        removed = folder.abandon()
        if isinstance(exc, Diverged):
            advice = ("nothing was kept (no epoch completed): start again with a smaller --lr" if removed else
                      f"{divergence_advice(folder.state)} (the basis and lr check it needs stay beside it)")
            raise Diverged(f"{exc}; no result was written; {advice}") from exc
        raise
    validation = _validation(keep, split_name) if keep is not None else None
    if validation is not None and validation.kept in START_LABELS:
        log.info("nothing trained in the span scored better on the validation split than the %s it started from: "
                 "the result is the %s", validation.kept, _START_NAMES[validation.kept])
    test = score_if_any(model, task, "test", device=device)
    alpha, groups = report_fn(optimizer.coords.detach().cpu())
    kind = "layer" if groups is not None else "affine" if cfg.affine else "span"
    report = CoefficientReport(kind, basis.sources, basis.rank, alpha, groups, basis.dropped,
                               optimizer.offspan_scale if optimizer.offspan is not None else None)
    holdings = placement.holdings(basis)
    # Written as the model's own tool reads it too: a Hugging Face model as model.safetensors beside its config,
    # a LightningModule also as a .ckpt.
    if placement.lead:
        try:
            write_json(work / COEFFICIENTS_FILE, report.to_json())
            if validation is not None:
                write_json(work / VALIDATION_FILE, validation.to_dict())
            state = saved_state(model)
            if cfg.dtype is not None:
                try:
                    state = {k: to_storage_dtype(v, torch_dtype(cfg.dtype), f"the result's tensor '{k}'")
                             for k, v in state.items()}
                except TwaError as exc:  # the training is kept: only the write is redone
                    raise TwaError(f"{exc}; the trained state stays in {folder.state}: `--resume --dtype float32` "
                                   "writes it without training again") from exc
            exported = task.export(state, work)
            meta = make_metadata(
                "twa", invocation=invocation, **task.describe(), trainable=names, config=config,
                command="train-subspace", sources=[s.to_dict() for s in basis.sources], coefficients=alpha,
                step=str(history[-1]["step"] if history else 0), epoch=str(cfg.epochs),
                exported=[Path(p).name for p in exported],
                **({"selected": validation.kept} if validation is not None else {}),
            )
            save_tensors(work / task.result_name, state, meta)
            folder.state.unlink(missing_ok=True)
        except BaseException:
            folder.abandon()
            raise
        folder.finish()
    placement.barrier()  # no rank returns before the result is on disk
    return SubspaceResult(folder.path, folder.path / task.result_name, report, test, history, holdings, check,
                          validation)


# The starting points scored as candidates, by label.
_START_NAMES = {"center": "center of the checkpoints (their uniform average, as SWA)",
                "last": "last checkpoint", "start": "starting point given by --init"}
START_LABELS = tuple(_START_NAMES)


def _validation_split(task: Task, *, announce: bool) -> str | None:
    """Give the task a validation split if its data has none (a fixed part of the training data, held out of the
    fit, `held_out_count`), check it is large enough to choose on, and say what it is; None when the training data
    is too small to hold any out (then nothing is chosen: the fit runs as the paper's, with a warning).
    `announce`: warn about a held-out split (a resumed run's first part already did)."""
    if task.split("val", augment=False) is None:
        train = task.split("train", augment=False)
        if train is None:
            raise TwaError("the data has no training split")
        count = held_out_count(len(train))  # type: ignore[arg-type]
        if not count:
            if announce:
                log.warning("no validation data, and %d training examples are too few to hold %d out: the result "
                            "is the fit's end, chosen on nothing (give --val-data FILE for text, DIR/val/ for an "
                            "image folder, or a --data hook returning (train, val, test))", len(train),
                            MIN_VAL_EXAMPLES)  # type: ignore[arg-type]
            return None
        task.hold_out(count / len(train))  # type: ignore[arg-type]
        if announce:
            log.warning("no validation data: choosing on %d training examples held out of the fit; the run itself "
                        "may have trained on them, which favours its most overfitted checkpoints: give data it did "
                        "not train on (--val-data FILE for text, DIR/val/ beside DIR/test/ for an image folder, a "
                        "--data hook returning (train, val, test))", count)
        described = "examples held out of the training data"
    else:
        described = "the data's validation split"
    count = len(task.split("val", augment=False))  # type: ignore[arg-type]
    if count < MIN_VAL_EXAMPLES:
        raise TwaError(f"the validation split has {count} examples; choosing on it needs at least {MIN_VAL_EXAMPLES}: "
                       "give more validation data, or --select none to keep the fit's end")
    return f"{described} ({count})"


def _validation(keep: KeepBest, split: str | None) -> Validation:
    name, higher = keep.task.selection_metric
    return Validation(split or "", f"{'max' if higher else 'min'}:{name}", keep.points, keep.best_label)


def _choose_start(keep: KeepBest, score: Callable[..., None], basis: Basis, model: torch.nn.Module,
                  optimizer: SubspaceSGD, cfg: SubspaceConfig, device: str) -> None:
    """Score the candidate starting points on the validation split and start from the best: with --init best the
    center of the checkpoints and the last one (with its own BatchNorm statistics, as a user would run it);
    otherwise (and for --affine and --granularity layer, whose coordinates are not the basis's) the start alone, so
    that the result is never worse on that split than where it began."""
    if cfg.init != "best" or cfg.variant:  # a variant's coordinates are not the basis's: its start alone
        score("center" if cfg.init in ("best", "center") else "start", 0)
    else:
        optimizer.move_to(basis.center_coords().to(optimizer.coords))
        score("center", 0)
        last = basis.sources[-1].path if basis.sources else None
        if last is not None and Path(last).exists():
            optimizer.move_to(basis.coords[:, -1].to(optimizer.coords))
            _set_buffers(model, load_tensors(read_checkpoint(last, cfg.read)), device)
            score("last", 0, False)
    if keep.best is None:
        scored = "; ".join(f"{p.label}: loss {p.figures.get('loss')}" for p in keep.points)
        raise TwaError(f"every starting point scores NaN or Inf on the validation split ({scored}): the checkpoints "
                       "or the data hold non-finite values; nothing was written")
    keep.restore()


def _set_buffers(model: torch.nn.Module, tensors: dict[str, torch.Tensor], device: str) -> None:
    """The model's floating buffers (BatchNorm statistics) from a checkpoint's tensors, where it has them."""
    state = model.state_dict()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if buf.is_floating_point() and name in tensors and tensors[name].shape == buf.shape:
                state[name].copy_(tensors[name].to(device))


# What train-subspace writes into its folder, besides the files its result's `exported` field names.
RUN_FILES = (RESULT_FILE, HF_RESULT_FILE, COEFFICIENTS_FILE, METRICS_FILE, BASIS_FILE, LR_CHECK_FILE, STATE_FILE,
             VALIDATION_FILE)


def _written_by_train_subspace(path: Path) -> bool:
    """What --force may replace: the files an earlier train-subspace wrote (its basis in shards too)."""
    basis = Path(BASIS_FILE)
    if path.name in RUN_FILES or re.fullmatch(rf"{basis.stem}\.\d+-of-\d+{basis.suffix}", path.name):
        return True
    for name in (RESULT_FILE, HF_RESULT_FILE):
        result = path.parent / name
        if result.is_file() and path.name in (read_checkpoint(result).json_field("exported", list) or []):
            return True
    return False


def _optimizer(inputs: _Inputs, cfg: SubspaceConfig, placement: Placement, flat: Any, start_coords: torch.Tensor,
               offspan: torch.Tensor | None, hyper: dict[str, float]) -> tuple[SubspaceSGD, Report]:
    basis = inputs.basis
    if cfg.variant:
        ckpts = inputs.ckpts or [read_checkpoint(s.path, cfg.read) for s in basis.sources]
        return build_variant(basis, ckpts, flat, (start_coords, offspan), affine=cfg.affine,
                             granularity=cfg.granularity, group_size=cfg.group_size, tol=cfg.tol, hyper=hyper)
    stored = torch_dtype(cfg.basis_dtype) if cfg.basis_dtype is not None else basis.vectors.dtype
    optimizer = placement.subspace_sgd(flat, basis, start_coords, dtype=stored, offspan=offspan, **hyper)
    return optimizer, lambda coords: ([float(a) for a in basis.coefficients(coords)], None)


def _resume(folder: RunFolder, config: dict[str, Any], model: torch.nn.Module, optimizer: SubspaceSGD,
            placement: Placement, keep: KeepBest | None) -> tuple[int, int, list[dict[str, Any]], float]:
    optim = with_prefix("optim", optimizer.state_tensors())
    best = with_prefix("best", keep.templates()) if keep is not None else {}
    state = load_train_state(folder.state, config, command="train-subspace",
                             expected=with_prefix("model", model.state_dict()) | optim | best, required=optim)
    if keep is not None:
        kept = strip_prefix("best", state.tensors)
        keep.load(kept, _recorded_points(folder.work / VALIDATION_FILE, has_best=bool(kept)))
    saved = strip_prefix("model", state.tensors)
    check_fits(model, {k: tuple(v.shape) for k, v in saved.items()}, str(folder.state))
    for name, value in model.state_dict().items():
        value.copy_(saved[name])  # in place: the parameters are views of the flat buffer
    optim = strip_prefix("optim", state.tensors)
    optimizer.load_state_tensors(optim)
    return state.epochs_done, state.step, state.history, float(state.config["lr"])


def _recorded_points(record: Path, *, has_best: bool) -> list[dict[str, Any]]:
    """The points an interrupted run scored, as its validation record lists them, checked: the state beside it
    keeps the best of them (`has_best`), which the record must say is kept."""
    if not record.exists():
        if has_best:
            raise TwaError(f"{record}: missing; the training state beside it keeps the best point this record "
                           "names: restore it, or start the run again with --force")
        return []
    body = read_json(record)
    points = body.get("points") if isinstance(body, dict) else None
    if not isinstance(points, list) or not all(_is_point(p) for p in points):
        raise TwaError(f"{record}: not the validation record this tool writes (each point has a label, a step, "
                       "figures and whether it is kept)")
    if has_best and not any(p["kept"] for p in points):
        raise TwaError(f"{record}: names no kept point, though the training state beside it keeps one")
    return points


def _is_point(point: Any) -> bool:
    if not isinstance(point, dict):
        return False
    label, step, figures, kept = (point.get(k) for k in ("label", "step", "figures", "kept"))
    numbers = isinstance(figures, dict) and all(v is None or _is_number(v) for v in figures.values())
    return (isinstance(label, str) and isinstance(step, int) and not isinstance(step, bool) and step >= 0
            and numbers and isinstance(kept, bool))


def _recorded_lr_check(path: Path, lr: float) -> LrCheck:
    """The lr check an interrupted run made at its start, read back to train at the lr it chose: checked, as a
    resumed run trusts it (measured again at the resumed point, it would change the lr mid-run)."""
    if not path.exists():
        raise TwaError(f"{path}: missing; it holds the lr the interrupted run trained at: restore it, or resume with "
                       "another --lr (used as given)")
    body = read_json(path)
    if isinstance(body, dict) and "limit" in body and body["limit"] is None:
        body["limit"] = math.inf  # an unbounded limit, written as null (standard JSON has no Infinity)
    numbers = ("requested", "sharpness", "limit", "used")
    known = {f.name for f in fields(LrCheck)}
    if not (isinstance(body, dict) and set(body) <= known and all(_is_number(body.get(k)) for k in numbers)
            and isinstance(body.get("method", ""), str)
            and (body.get("start_loss") is None or _is_number(body["start_loss"]))):
        raise TwaError(f"{path}: not the lr check this tool writes (numbers {', '.join(numbers)}, a method)")
    if body["requested"] != lr or not (math.isfinite(body["used"]) and 0 < body["used"] <= lr):
        raise TwaError(f"{path}: says --lr {body['requested']!r} was trained at {body['used']!r}, which this run's "
                       f"--lr {lr:g} cannot have chosen; restore it, or resume with another --lr (used as given)")
    return LrCheck(**body)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _learning_rate(model: torch.nn.Module, task: Task, optimizer: SubspaceSGD, cfg: SubspaceConfig,
                   placement: Placement, device: str, folder: RunFolder, split: str, saved_lr: float | None
                   ) -> LrCheck | None:
    """The lr check, measured once at the start: a resumed run reads what its first part decided, unless it
    was given another --lr (which is then used as given, to recover from a divergence)."""
    path = folder.work / LR_CHECK_FILE
    if saved_lr is not None and cfg.lr != saved_lr:
        log.warning("--resume with --lr %g (the interrupted run had %g): training at %g; the lr check is not "
                    "repeated", cfg.lr, saved_lr, cfg.lr)
        return None
    if not cfg.lr_check:
        return None
    if saved_lr is not None:
        return _recorded_lr_check(path, cfg.lr)
    dataset = task.split(split, augment=True)
    parts = placement if placement.world > 1 else None
    sample = list(islice(batches(task, dataset, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=SHARPNESS_EPOCH,
                                 parts=parts), SHARPNESS_BATCHES))
    sharpness, method = subspace_sharpness(model, task, optimizer, sample, device=device)
    start = sample_loss(model, task, sample, device=device)
    placement.sum_(start)
    check = check_lr(cfg.lr, cfg.momentum, sharpness, method)
    check.start_loss = float(start)
    if placement.lead:
        write_json(path, check.to_dict())
    if check.used < check.requested:
        log.warning(
            "--lr %g is too large for this span (its sharpest direction has curvature %.3g; steps above %.3g "
            "diverge along it): training at lr %.3g instead (--no-lr-check keeps %g)",
            check.requested, sharpness, check.limit, check.used, check.requested,
        )
    if not sharpness > 0:
        log.warning("the span curves upward nowhere at the start (largest curvature %.3g): the lr check cannot "
                    "bound the step, so --lr %g is used as given%s", sharpness, cfg.lr,
                    "; the validation split keeps the best point it reaches" if cfg.selecting else "")
    if method != "double backward":
        log.info("--lr-check: Hessian-vector products by %s (the model has no second derivative)", method)
    return check


def check_basis_fits(model: torch.nn.Module, basis: Basis, source: str) -> None:
    """The basis spans tensors the model has, shape for shape; else name the first mismatch."""
    params = dict(model.named_parameters())
    for name, shape in basis.layout:
        if name not in params:
            raise TwaError(f"{source}: the basis covers '{name}', which the model does not have; does --model fit?")
        if tuple(params[name].shape) != tuple(shape):
            raise TwaError(f"{source}: the basis has '{name}' with shape {list(shape)}, the model "
                           f"{list(params[name].shape)}; does --model fit?")


def _starting_point(basis: Basis, cfg: SubspaceConfig, placement: Placement
                    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
    """Coordinates of the start, its off-span part (None when it lies in the span) and its full tensors.

    Under torchrun `basis` holds this rank's columns: the projection and norms are summed over ranks and the
    off-span part returned is this rank's slice of it.
    """
    init = cfg.init
    if init in ("center", "best"):  # best: the center is the first candidate (see _choose_start)
        return basis.center_coords(), None, None
    if init == "last":
        last = basis.sources[-1].path if basis.sources else None
        if last is None or not Path(last).exists():
            raise TwaError(f"--init last: the last source checkpoint {last} is not readable")
        init = last
    if not as_written(init).exists():
        raise TwaError(f"--init {init}: no such checkpoint file")
    tensors = load_tensors(read_checkpoint(init, cfg.read))
    for name, shape in basis.layout:
        if name not in tensors:
            raise TwaError(f"--init {init}: has no tensor '{name}' of the basis")
        if tuple(tensors[name].shape) != tuple(shape):
            raise TwaError(f"--init {init}: '{name}' has shape {list(tensors[name].shape)}, the basis {list(shape)}")
    w0 = torch.cat([tensors[n].reshape(-1).double() for n, _ in basis.layout])
    dim = w0.numel()
    lo, hi = placement.columns(dim)
    w0 = w0[lo:hi]
    coords = basis.coords_of(w0)
    placement.sum_(coords)
    residual = w0 - combine(basis.vectors, coords)
    squares = torch.stack([residual.pow(2).sum(), w0.pow(2).sum()])
    placement.sum_(squares)
    # A start inside the span up to rounding (any source checkpoint) is snapped onto it.
    offspan = residual.float() if float(squares[0].sqrt()) > 1e-6 * float(squares[1].sqrt()) else None
    return coords, offspan, tensors


def _load_start(model: torch.nn.Module, basis: Basis, init_tensors: dict[str, torch.Tensor] | None) -> None:
    """Buffers (BatchNorm statistics) from the start file, else the checkpoints' average; recomputed at the end."""
    state = model.state_dict()
    source = init_tensors if init_tensors is not None else basis.buffers
    trained = dict(basis.layout)
    for name in state:
        if name in source and name not in trained:
            state[name] = source[name]
    model.load_state_dict(state)


def _plan(src: Path, cfg: SubspaceConfig) -> Plan:
    if is_basis_file(src):
        return plan_train_subspace_basis(read_checkpoint(src), device=resolve_device(cfg.device))
    names, ckpts = subspace_names(cfg.task, pick(src, cfg.selection, cfg.read))
    return plan_train_subspace(ckpts, trainable=names, device=resolve_device(cfg.device), basis_given=False)
