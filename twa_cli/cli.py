"""The `twa` command: parses flags, calls the library, prints. No work happens here.

Exit codes: 0 success, 1 a problem with the inputs (one line on stderr; --debug shows the traceback),
2 a usage error (unknown flag, bad value), 130 interrupted.
"""

from __future__ import annotations

import math

import os
import signal
import sys
import threading
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from twa_cli import __version__
from twa_cli import console as ui
from twa_cli.data import KNOWN
from twa_cli.errors import TwaError
from twa_cli.training import SCHEDULES

app = typer.Typer(
    name="twa",
    help="Trainable Weight Averaging: learn the weighted average of the checkpoints of a training run.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SELECT = "Checkpoint selection"
TRAIN = "Training"
DATA = "Model and data"
OUTPUT = "Output"
VARIANTS = "Variants"


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum whose members are `values` (typer shows and checks them as the option's choices)."""
    return Enum(name, {v: v for v in values}, type=str)


Device = _choices("Device", ("auto", "cpu", "cuda"))
Schedule = _choices("Schedule", SCHEDULES)
FitOn = _choices("FitOn", ("train", "val"))
Granularity = _choices("Granularity", ("model", "layer"))
Split = _choices("Split", ("test", "train", "both"))
ComputeDtype = _choices("ComputeDtype", ("float64", "float32"))
OutDtype = _choices("OutDtype", ("same", "float32", "bfloat16", "float16"))
ImageFormat = _choices("ImageFormat", ("png", "svg", "pdf"))


def _complete_model(incomplete: str) -> list[str]:
    from twa_cli.models import MODELS

    return [name for name in [*MODELS, "torchvision:"] if name.startswith(incomplete)]


def _complete_data(incomplete: str) -> list[str]:
    return [name for name in KNOWN if name.startswith(incomplete)]


# Options shared by several commands ---------------------------------------------------------------------
Start = Annotated[int, typer.Option(help="First checkpoint to use, by position in the ordered folder.", rich_help_panel=SELECT)]
End = Annotated[Optional[int], typer.Option(help="Stop before this position (exclusive); default: the end.", rich_help_panel=SELECT)]
Every = Annotated[int, typer.Option(help="Use every k-th checkpoint.", min=1, rich_help_panel=SELECT)]
ModelOpt = Annotated[Optional[str], typer.Option("--model", autocompletion=_complete_model, help="Architecture, when the checkpoints' metadata names none: a registry name, torchvision:<name> or package.module:callable.", rich_help_panel=DATA)]
DataOpt = Annotated[Optional[str], typer.Option("--data", autocompletion=_complete_data, help="Data set (default: the one recorded in the checkpoints): digits, cifar10, cifar100, mnist, fashion-mnist, imagefolder or package.module:callable.", rich_help_panel=DATA)]
DataDir = Annotated[Optional[Path], typer.Option(help="Folder of the data set (torchvision sets, imagefolder).", rich_help_panel=DATA)]
Download = Annotated[bool, typer.Option("--download", help="Let torchvision download the data set into --data-dir.", rich_help_panel=DATA)]
DeviceOpt = Annotated[Device, typer.Option(help="Where to compute: auto picks cuda when available.")]
Seed = Annotated[int, typer.Option(help="Random seed (initialization, data order, augmentation).")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.", rich_help_panel=OUTPUT)]
Json = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout (logs stay on stderr).", rich_help_panel=OUTPUT)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors (and the --json summary).", rich_help_panel=OUTPUT)]
BnBatches = Annotated[Optional[int], typer.Option(help="Recompute BatchNorm statistics on at most this many batches (default: the whole training set).", min=1)]
ValSplit = Annotated[float, typer.Option(help="Hold out this fraction of the training images as a validation split (the same images in every command).", min=0.0, max=0.9, rich_help_panel=DATA)]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from the end of its last completed epoch.", rich_help_panel=TRAIN)]
StartStep = Annotated[Optional[int], typer.Option(help="Use only checkpoints saved at this step or later (runs that save every K steps).", rich_help_panel=SELECT)]
EndStep = Annotated[Optional[int], typer.Option(help="Use only checkpoints saved before this step (exclusive).", rich_help_panel=SELECT)]
EveryStep = Annotated[Optional[int], typer.Option(help="Use only checkpoints whose step is a multiple of this.", min=1, rich_help_panel=SELECT)]
Top = Annotated[Optional[int], typer.Option(help="Keep the best N of the selected checkpoints by --by (as timm's avg_checkpoints -n).", min=1, rich_help_panel=SELECT)]
By = Annotated[Optional[str], typer.Option(help="Metric that ranks checkpoints for --top: a metadata field (timm's metric), a trainer_state.json entry (eval_loss), a name=value in the file name, or a column of the folder's metrics.jsonl (test_acc). Losses and errors are minimized, others maximized; min:NAME or max:NAME says which.", rich_help_panel=SELECT)]
StripPrefix = Annotated[Optional[str], typer.Option(help="Strip this prefix from tensor names (default: module. or model. when every key of a .pt/.ckpt file has it).", rich_help_panel=SELECT)]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print what would be read and the memory and disk the command needs, then exit.", rich_help_panel=OUTPUT)]
MaxShardSize = Annotated[Optional[str], typer.Option(help="Split the result into shards of at most this size (5GB, 500MB) with an index, as Hugging Face does.", rich_help_panel=OUTPUT)]


def _load_config(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """Eager: fills the command's defaults from the file before any other option is read, so flags win."""
    from twa_cli.config import apply_config_file

    return value if value is None or ctx.resilient_parsing else apply_config_file(ctx, value)


def _load_recorded(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    from twa_cli.config import apply_recorded

    return value if value is None or ctx.resilient_parsing else apply_recorded(ctx, value)


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="Read options from a YAML or TOML file (flags given here override it; a [command] section overrides shared keys).", is_eager=True, callback=_load_config, rich_help_panel=OUTPUT)]
ConfigFrom = Annotated[Optional[Path], typer.Option("--config-from", help="Repeat the options recorded in a result file this tool wrote (flags given here override them).", is_eager=True, callback=_load_recorded, rich_help_panel=OUTPUT)]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"twa {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error (may also follow any command).")] = False,
) -> None:
    """Trainable Weight Averaging (Li et al., ICLR 2023): sample checkpoints, build their subspace, train inside it."""


def _setup(json_out: bool, quiet: bool, ctx: typer.Context | None = None) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 speaks; the others print only errors
        quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    ui.settings.json = json_out
    ui.settings.quiet = quiet or json_out
    ui.setup_logging(quiet)
    if ctx is not None:
        _record(ctx)


def _record(ctx: typer.Context) -> None:
    """Every file this command writes records the command and its resolved options."""
    from twa_cli.checkpoints import start_recording
    from twa_cli.config import resolved

    if ctx.command.name:
        ctx.call_on_close(start_recording(ctx.command.name, resolved(ctx.params)))


def _selection(start: int, end: int | None, every: int, start_step: int | None = None, end_step: int | None = None,
               every_step: int | None = None, top: int | None = None, by: str | None = None) -> Any:
    from twa_cli.selection import Selection

    return Selection(start, end, every, start_step, end_step, every_step, top, by)


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _show_plan(plan: Any, json_out: bool) -> None:
    from twa_cli.inspect import human_bytes

    if json_out:
        ui.emit_json({"dry_run": True, **plan.to_dict()})
        return
    ui.table(f"{plan.command} --dry-run", ["", "estimate"], [
        ["checkpoints read", f"{len(plan.reads)} ({human_bytes(plan.read_bytes)})"],
        ["parameters", f"{plan.parameters:,}"],
        ["peak RAM", human_bytes(plan.peak_ram_bytes)],
        ["GPU memory", human_bytes(plan.gpu_bytes) if plan.gpu_bytes else "-"],
        ["disk written", human_bytes(plan.disk_bytes)],
    ])
    for path in plan.reads:
        ui.info(f"would read {path}")
    for note in plan.notes:
        ui.info(f"note: {note}")


def _device(device: Device) -> str:
    if device is Device.auto:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            raise TwaError("--device cuda: no CUDA device is available")
    return device.value


def _data(name: str | None, data_dir: Path | None, download: bool, val_split: float = 0.0) -> dict[str, Any] | None:
    from twa_cli.data import data_spec

    if name is None:
        if data_dir is not None:
            raise TwaError("--data-dir needs --data to say which data set it holds")
        return None
    return data_spec(name, data_dir, download, val_split)


def _model(name: str | None, data: dict[str, Any] | None, ckpt_data: dict[str, Any] | None) -> dict[str, Any] | None:
    """A --model name becomes a full spec; its number of classes and channels come from the data set."""
    if name is None:
        return None
    from twa_cli.data import load_data
    from twa_cli.models import model_spec

    spec = data or ckpt_data
    if spec is None:
        raise TwaError("--model needs --data as well, to know the number of classes and input channels")
    info = load_data(spec)
    return model_spec(name, info.num_classes, info.in_channels, info.image_size)


def _selected(ckpts_path: Path, start: int, end: int | None, every: int, selection: Any = None,
              strip_prefix: str | None = None) -> list[Any]:
    from twa_cli.checkpoints import list_folder
    from twa_cli.selection import select_checkpoints

    return select_checkpoints(list_folder(ckpts_path, strip_prefix), selection or _selection(start, end, every))


def _trainable(arch: dict[str, Any] | None, ckpt: Any) -> list[str] | None:
    if ckpt.trainable is not None:
        return ckpt.trainable
    if (arch or ckpt.arch) is None:
        return None
    from twa_cli.models import build_model, trainable_names

    return trainable_names(build_model(arch or ckpt.arch))


def _subspace_plan(src: Path, cfg: Any) -> Any:
    from twa_cli.basis import is_basis_file
    from twa_cli.checkpoints import read_checkpoint
    from twa_cli.estimates import plan_train_subspace, plan_train_subspace_basis

    if is_basis_file(src):
        return plan_train_subspace_basis(read_checkpoint(src), device=cfg.device)
    selected = _selected(src, cfg.start, cfg.end, cfg.every, cfg.selection(), cfg.strip_prefix)
    return plan_train_subspace(selected, trainable=_trainable(cfg.model, selected[0]), device=cfg.device,
                               basis_given=False)


# Commands -----------------------------------------------------------------------------------------------


@app.command()
def sample(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(help="Folder to write the checkpoints into (created).")],
    model: Annotated[str, typer.Option(autocompletion=_complete_model, help="Architecture: small-cnn, resnet20, mlp, vgg16-bn, preact-resnet164, resnet18, resnet50, torchvision:<name> or package.module:callable.", rich_help_panel=DATA)] = "small-cnn",
    data: Annotated[str, typer.Option(autocompletion=_complete_data, help="Data set: digits (bundled), cifar10, cifar100, mnist, fashion-mnist, imagefolder or package.module:callable.", rich_help_panel=DATA)] = "digits",
    data_dir: DataDir = None,
    download: Download = False,
    epochs: Annotated[int, typer.Option(help="Epochs of regular training.", min=1, rich_help_panel=TRAIN)] = 40,
    lr: Annotated[float, typer.Option(help="Initial learning rate.", rich_help_panel=TRAIN)] = 0.1,
    schedule: Annotated[Schedule, typer.Option(help="step: 10x lower at 50% and 75% of the epochs; linear or cosine to zero; constant.", rich_help_panel=TRAIN)] = Schedule.step,
    momentum: Annotated[float, typer.Option(help="SGD momentum.", rich_help_panel=TRAIN)] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.", rich_help_panel=TRAIN)] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Batch size.", min=1, rich_help_panel=TRAIN)] = 128,
    per_epoch: Annotated[int, typer.Option(help="Checkpoints saved per epoch, evenly spaced (plus the initial weights).", min=1, rich_help_panel=TRAIN)] = 1,
    init: Annotated[Optional[Path], typer.Option(help="Start from the weights of this checkpoint (fine-tuning), not at random.", rich_help_panel=TRAIN)] = None,
    val_split: ValSplit = 0.0,
    eval_every_epoch: Annotated[bool, typer.Option("--eval-every-epoch/--no-eval-every-epoch", help="Test accuracy after each epoch.")] = True,
    seed: Seed = 0,
    device: DeviceOpt = Device.auto,
    resume: Resume = False,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
    config: ConfigOpt = None,
    config_from: ConfigFrom = None,
) -> None:
    """Train with regular SGD (Appendix A.2) and save the checkpoints TWA averages."""
    from twa_cli.sampling import SampleConfig
    from twa_cli.sampling import sample as run

    _setup(json_out, quiet, ctx)
    cfg = SampleConfig(model, _data(data, data_dir, download, val_split), epochs, lr, schedule.value, momentum,
                       weight_decay, batch_size, per_epoch, seed, _device(device), str(init) if init else None,
                       eval_every_epoch)
    with _interruptible(out), ui.training_progress("sample") as reporter:
        result = run(out, cfg, resume=resume, force=force, reporter=reporter)
    last = result.history[-1] if result.history else {}
    summary = {"out": str(result.out), "checkpoints": len(result.checkpoints), "final": last}
    if json_out:
        ui.emit_json(summary)
    else:
        ui.info(f"wrote {len(result.checkpoints)} checkpoints to {result.out}")
        ui.table("SGD", ["epochs", "train acc %", "test acc %"],
                 [[last.get("epoch"), last.get("train_acc"), last.get("test_acc")]])


@app.command()
def swa(
    ctx: typer.Context,
    ckpts: Annotated[Path, typer.Argument(help="Checkpoint folder (or one file).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Result: a .safetensors file, or a folder (written in Hugging Face's layout).", rich_help_panel=OUTPUT)],
    start: Start = 0,
    end: End = None,
    every: Every = 1,
    start_step: StartStep = None,
    end_step: EndStep = None,
    every_step: EveryStep = None,
    top: Top = None,
    by: By = None,
    strip_prefix: StripPrefix = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    data_dir: DataDir = None,
    download: Download = False,
    bn_update: Annotated[bool, typer.Option("--bn-update/--no-bn-update", help="Recompute BatchNorm statistics on the training data (needs architecture and data).")] = True,
    bn_batches: BnBatches = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Greedy soup: add a checkpoint only if held-out accuracy (on --val-split) does not drop.")] = False,
    val_split: ValSplit = 0.0,
    compute_dtype: Annotated[ComputeDtype, typer.Option(help="Precision the sums are accumulated in.")] = ComputeDtype.float64,
    dtype: Annotated[OutDtype, typer.Option(help="Precision of the written average: same keeps each tensor's own (fp16/bf16 checkpoints stay fp16/bf16).", rich_help_panel=OUTPUT)] = OutDtype.same,
    max_shard_size: MaxShardSize = None,
    device: DeviceOpt = Device.auto,
    dry_run: DryRun = False,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
    config: ConfigOpt = None,
    config_from: ConfigFrom = None,
) -> None:
    """Uniform average of the selected checkpoints (SWA), BatchNorm recomputed; or the greedy soup.

    Reads .safetensors, Hugging Face checkpoint-* folders (sharded too), and .pt/.pth/.bin/.ckpt/.pth.tar state
    dicts. With no architecture known every floating tensor is averaged, as timm's and fairseq's scripts do."""
    from twa_cli.averaging import swa as run
    from twa_cli.checkpoints import check_result_output, parse_size

    _setup(json_out, quiet, ctx)
    check_result_output(output, force, inputs=[ckpts])
    selection = _selection(start, end, every, start_step, end_step, every_step, top, by)
    selected = _selected(ckpts, start, end, every, selection, strip_prefix)
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
    out_dtype = None if dtype is OutDtype.same else _dtype(dtype.value)
    data_spec = _data(data, data_dir, download, val_split)
    arch = _model(model, data_spec, selected[0].data)
    if dry_run:
        from twa_cli.estimates import plan_swa

        known = (arch or selected[0].arch) is not None and (data_spec or selected[0].data) is not None
        _show_plan(plan_swa(selected, compute_dtype=_dtype(compute_dtype.value), dtype=out_dtype,
                            model_known=known, device=_device(device)), json_out)
        return
    if greedy:
        _greedy(selected, output, arch, data_spec, val_split, _device(device), json_out)
        return
    with ui.file_progress("averaging") as progress:
        result = run(selected, output, model=arch, data=data_spec, bn_update=bn_update, bn_batches=bn_batches,
                     device=_device(device), progress=progress, compute_dtype=_dtype(compute_dtype.value),
                     dtype=out_dtype, max_shard_size=shard_bytes)
    if result.path.parent == output:  # a folder in Hugging Face's layout
        from twa_cli.checkpoints import copy_model_files

        copy_model_files(selected[-1].path, output)
    summary = {"output": str(result.path), "checkpoints": result.count, "batchnorm": result.bn,
               "sources": [str(c.path) for c in selected],
               "test": asdict(result.test) if result.test else None}
    if json_out:
        ui.emit_json(summary)
    else:
        ui.info(f"averaged {result.count} checkpoints into {result.path} (BatchNorm statistics {result.bn})")
        if result.test:
            ui.table("SWA", ["checkpoints", "test acc %", "test loss"], [[result.count, result.test.accuracy, result.test.loss]])


def _greedy(selected: list[Any], output: Path, arch: dict[str, Any] | None, data_spec: dict[str, Any] | None,
            val_split: float, device: str, json_out: bool) -> None:
    from twa_cli.soups import greedy_soup

    spec = data_spec or selected[0].data
    if spec is not None and val_split:
        spec = {**spec, "val_split": val_split}
    with ui.file_progress("soup") as progress:
        result = greedy_soup(selected, output, model=arch, data=spec, device=device, progress=progress)
    summary = {"output": str(result.path), "checkpoints": len(selected), "chosen": result.chosen,
               "individual_val_acc": result.individual, "val_acc": result.val,
               "test": asdict(result.test) if result.test else None}
    if json_out:
        ui.emit_json(summary)
        return
    ui.info(f"greedy soup of {len(result.chosen)} of {len(selected)} checkpoints -> {result.path}")
    ui.table("Greedy soup", ["checkpoints", "held-out acc %", "test acc %"],
             [[len(result.chosen), result.val, result.test.accuracy if result.test else None]])


@app.command()
def orthogonalize(
    ctx: typer.Context,
    ckpts: Annotated[Path, typer.Argument(help="Checkpoint folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Basis file (.safetensors).", rich_help_panel=OUTPUT)],
    start: Start = 0,
    end: End = None,
    every: Every = 1,
    start_step: StartStep = None,
    end_step: EndStep = None,
    every_step: EveryStep = None,
    top: Top = None,
    by: By = None,
    strip_prefix: StripPrefix = None,
    tol: Annotated[float, typer.Option(help="Drop a checkpoint whose residual is below this fraction of its norm (a near-duplicate).")] = 1e-6,
    dtype: Annotated[str, typer.Option(help="Storage precision of the basis: float32, bfloat16 or float16.")] = "float32",
    model: ModelOpt = None,
    data: DataOpt = None,
    data_dir: DataDir = None,
    dry_run: DryRun = False,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
    config: ConfigOpt = None,
    config_from: ConfigFrom = None,
) -> None:
    """Build an orthonormal basis of the span of the selected checkpoints (streamed, numerically robust)."""
    from twa_cli.basis import orthogonalize as run
    from twa_cli.basis import save_basis
    from twa_cli.checkpoints import check_output

    from twa_cli.distributed import init_group

    _setup(json_out, quiet, ctx)
    group = init_group("cpu")  # under torchrun: each rank builds its columns of the basis
    check_output(output, force, inputs=[ckpts])
    selection = _selection(start, end, every, start_step, end_step, every_step, top, by)
    selected = _selected(ckpts, start, end, every, selection, strip_prefix)
    arch = _model(model, _data(data, data_dir, False), selected[0].data)
    if dry_run:
        from twa_cli.estimates import plan_orthogonalize

        _show_plan(plan_orthogonalize(selected, dtype=dtype, trainable=_trainable(arch, selected[0])), json_out)
        return
    shards: list[dict[str, Any]] = []
    with ui.file_progress("orthogonalizing") as progress:
        if group is None:
            basis = run(selected, tol=tol, dtype=dtype, model=arch, progress=progress)
        else:
            from twa_cli.basis_shards import orthogonalize_columns

            group.barrier()  # every rank has checked the output before any writes
            basis, columns = orthogonalize_columns(selected, group, tol=tol, dtype=dtype, model=arch, progress=progress)
    if arch is None and data is not None:
        basis.data = _data(data, data_dir, False)
    if group is None:
        save_basis(basis, output)
    else:
        from twa_cli.basis_shards import save_sharded, shard_report

        save_sharded(basis, columns, output, group, force=force)
        shards = shard_report(basis.vectors, columns, group)
    dim = sum(math.prod(shape) for _, shape in basis.layout)
    summary = {"output": str(output), "checkpoints": len(selected), "rank": basis.rank, "dimension": dim,
               "dropped": basis.dropped, "errors": basis.errors, "shards": shards}
    if json_out:
        ui.emit_json(summary)
    else:
        ui.info(f"basis of rank {basis.rank} from {len(selected)} checkpoints ({dim:,} parameters) -> {output}")
        ui.info(f"max |P P^T - I| = {basis.errors['orthogonality']:.1e}")
        _print_shards(shards, basis.rank * dim * basis.vectors.element_size())


@app.command("train-subspace")
def train_subspace(
    ctx: typer.Context,
    src: Annotated[Path, typer.Argument(help="A basis file from `twa orthogonalize`, or a checkpoint folder (orthogonalized first).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder (default: a new folder beside SRC, named SRC-twa).", rich_help_panel=OUTPUT)] = None,
    epochs: Annotated[int, typer.Option(help="Epochs of subspace training.", min=1, rich_help_panel=TRAIN)] = 10,
    lr: Annotated[float, typer.Option(help="Learning rate (the paper's condensed rate: 2 on CIFAR).", rich_help_panel=TRAIN)] = 2.0,
    schedule: Annotated[Schedule, typer.Option(help="step: 10x lower at 50% and 75%; linear or cosine to zero; constant.", rich_help_panel=TRAIN)] = Schedule.step,
    momentum: Annotated[float, typer.Option(help="Momentum.", rich_help_panel=TRAIN)] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="lambda of eq. 5: an L2 penalty on the averaging coefficients.", rich_help_panel=TRAIN)] = 1e-5,
    batch_size: Annotated[int, typer.Option(help="Batch size.", min=1, rich_help_panel=TRAIN)] = 128,
    init: Annotated[str, typer.Option(help="Starting point: center (mean of the checkpoints), last, or a checkpoint file.", rich_help_panel=TRAIN)] = "center",
    start: Start = 0,
    end: End = None,
    every: Every = 1,
    start_step: StartStep = None,
    end_step: EndStep = None,
    every_step: EveryStep = None,
    top: Top = None,
    by: By = None,
    strip_prefix: StripPrefix = None,
    tol: Annotated[float, typer.Option(help="When SRC is a folder: near-duplicate tolerance of the orthogonalization.", rich_help_panel=SELECT)] = 1e-6,
    dtype: Annotated[OutDtype, typer.Option(help="Precision of the written result (training runs in fp32).", rich_help_panel=OUTPUT)] = OutDtype.same,
    basis_dtype: Annotated[Optional[str], typer.Option(help="Precision of the basis in the projection: float32, bfloat16 or float16 (accumulating in fp32; default: as stored).", rich_help_panel=TRAIN)] = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    data_dir: DataDir = None,
    download: Download = False,
    bn_update: Annotated[bool, typer.Option("--bn-update/--no-bn-update", help="Recompute BatchNorm statistics after training.")] = True,
    bn_batches: BnBatches = None,
    eval_every_epoch: Annotated[bool, typer.Option("--eval-every-epoch/--no-eval-every-epoch", help="Test accuracy after each epoch (BatchNorm recomputed first).")] = True,
    fit_on: Annotated[FitOn, typer.Option(help="Fit the coefficients on the training data, or on the held-out split (TWA-v; needs --val-split).", rich_help_panel=VARIANTS)] = FitOn.train,
    val_split: ValSplit = 0.0,
    granularity: Annotated[Granularity, typer.Option(help="model: one coefficient per checkpoint; layer: one per checkpoint and group of tensors.", rich_help_panel=VARIANTS)] = Granularity.model,
    group_size: Annotated[int, typer.Option(help="With --granularity layer: tensors per group.", min=1, rich_help_panel=VARIANTS)] = 1,
    affine: Annotated[bool, typer.Option("--affine", help="Train in the affine hull of the checkpoints: coefficients sum to exactly 1.", rich_help_panel=VARIANTS)] = False,
    sync_bn: Annotated[Optional[bool], typer.Option("--sync-bn/--no-sync-bn", help="Under torchrun: synchronize BatchNorm over the ranks' parts of each batch (default: on with GPUs; PyTorch cannot on CPU).")] = None,
    lr_check: Annotated[bool, typer.Option("--lr-check/--no-lr-check", help="Measure the span's sharpness first and lower an --lr too large to be stable in it (with a warning).")] = True,
    seed: Seed = 0,
    device: DeviceOpt = Device.auto,
    dry_run: DryRun = False,
    resume: Resume = False,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
    config: ConfigOpt = None,
    config_from: ConfigFrom = None,
) -> None:
    """Train inside the span of the checkpoints (Algorithm 1) and write the learned average."""
    from twa_cli.subspace_training import SubspaceConfig, default_output
    from twa_cli.subspace_training import train_subspace as run

    _setup(json_out, quiet, ctx)
    data_spec = _data(data, data_dir, download)
    cfg = SubspaceConfig(
        epochs=epochs, lr=lr, schedule=schedule.value, momentum=momentum, weight_decay=weight_decay,
        batch_size=batch_size, init=init, seed=seed, device=_device(device), bn_update=bn_update,
        bn_batches=bn_batches, eval_every_epoch=eval_every_epoch, lr_check=lr_check, start=start, end=end, every=every, tol=tol,
        fit_on=fit_on.value, val_split=val_split, granularity=granularity.value, group_size=group_size, affine=affine,
        data=data_spec, model=_model(model, data_spec, None) if model else None, sync_bn=sync_bn,
        start_step=start_step, end_step=end_step, every_step=every_step, top=top, by=by, strip_prefix=strip_prefix,
        dtype=None if dtype is OutDtype.same else dtype.value, basis_dtype=basis_dtype,
    )
    out = output or default_output(src)
    if dry_run:
        _show_plan(_subspace_plan(src, cfg), json_out)
        return
    with _interruptible(out), ui.training_progress("twa") as reporter:
        result = run(src, out, cfg, force=force, resume=resume, reporter=reporter)
    summary = {
        "output": str(result.out), "checkpoint": str(result.result), "coefficients": result.coefficients,
        "layers": result.layers,
        "coefficient_sum": sum(result.coefficients), "dropped": result.dropped,
        "test": asdict(result.test) if result.test else None, "shards": result.shards,
        "lr_check": result.lr_check.to_dict() if result.lr_check else None,
    }
    if json_out:
        ui.emit_json(summary)
    else:
        if result.layers is not None:
            ui.info(f"wrote {result.result} (layer-wise coefficients for {len(result.layers)} groups of tensors)")
        else:
            ui.info(f"wrote {result.result} (coefficients sum to {sum(result.coefficients):.3f})")
        if result.test:
            ui.table("TWA", ["checkpoints", "test acc %", "test loss"],
                     [[len(result.coefficients), result.test.accuracy, result.test.loss]])
        _print_shards(result.shards, None)
        if not quiet:
            ui.out.print(str(result.out), markup=False)


@app.command("eval")
def eval_(
    files: Annotated[list[Path], typer.Argument(help="Checkpoint files to score.")],
    label: Annotated[Optional[list[str]], typer.Option("--label", help="A name for each file in the table (repeat it, in order).")] = None,
    split: Annotated[Split, typer.Option(help="test, train, or both (then also the generalization gap).")] = Split.test,
    model: ModelOpt = None,
    data: DataOpt = None,
    data_dir: DataDir = None,
    download: Download = False,
    bn_update: Annotated[bool, typer.Option("--bn-update/--no-bn-update", help="Recompute BatchNorm statistics before scoring.")] = False,
    bn_batches: BnBatches = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.", min=1)] = 256,
    device: DeviceOpt = Device.auto,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Test (and train) accuracy and loss of each checkpoint; the generalization gap as in the paper's tables."""
    from twa_cli.checkpoints import read_checkpoint
    from twa_cli.evaluation import evaluate_checkpoint

    _setup(json_out, quiet)
    data_spec = _data(data, data_dir, download)
    results = []
    for f in files:
        arch = _model(model, data_spec, read_checkpoint(f).data) if model else None
        results.append(evaluate_checkpoint(f, split=split.value, model=arch, data=data_spec, bn_update=bn_update,
                                           bn_batches=bn_batches, batch_size=batch_size, device=_device(device)))
    if json_out:
        ui.emit_json({"results": [r.to_dict() for r in results]})
        return
    if label and len(label) != len(files):
        raise TwaError(f"--label given {len(label)} times for {len(files)} files")
    rows = []
    for name, r in zip(label or [r.path for r in results], results):
        rows.append([name, r.test.accuracy if r.test else None, r.test.loss if r.test else None,
                     r.train.accuracy if r.train else None, r.gap])
    ui.table("Evaluation", ["model" if label else "file", "test acc %", "test loss", "train acc %", "gap"], rows)


def _print_shards(shards: list[dict[str, Any]], whole: int | None) -> None:
    """Under torchrun: how much of the basis each rank holds."""
    total = whole or sum(s["bytes"] for s in shards)
    for s in shards:
        lo, hi = s["columns"]
        ui.info(f"rank {s['rank']}: columns {lo:,}:{hi:,} of the basis, {s['bytes'] / 2**20:.2f} MiB "
                f"({100 * s['bytes'] / max(total, 1):.1f}% of {total / 2**20:.2f} MiB)")



SURFACE = "Loss surface (--surface)"


@app.command()
def plot(
    srcs: Annotated[list[Path], typer.Argument(metavar="SRC...", help="A train-subspace output folder, a sample folder, a basis file, `twa eval --json` output or a benchmark JSON (several combine).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the pictures into (created).", rich_help_panel=OUTPUT)],
    fmt: Annotated[ImageFormat, typer.Option("--format", help="Image format.", rich_help_panel=OUTPUT)] = ImageFormat.png,
    surface: Annotated[bool, typer.Option("--surface", help="Draw the training loss and test error over the trajectory's plane (needs the data).", rich_help_panel=SURFACE)] = False,
    resolution: Annotated[int, typer.Option(help="Grid points along each axis of the surface.", min=2, rich_help_panel=SURFACE)] = 11,
    surface_batches: Annotated[int, typer.Option(help="Batches per grid point for BatchNorm statistics, training loss and test error.", min=1, rich_help_panel=SURFACE)] = 4,
    batch_size: Annotated[int, typer.Option(help="Batch size of the surface.", min=1, rich_help_panel=SURFACE)] = 128,
    start: Start = 0,
    end: End = None,
    every: Every = 1,
    model: ModelOpt = None,
    data: DataOpt = None,
    data_dir: DataDir = None,
    device: DeviceOpt = Device.auto,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Pictures of a run: averaging coefficients, trajectory with SWA and TWA, accuracy per epoch, variance
    spectrum, accuracy against epochs of checkpoints used. Needs matplotlib (pip install 'twa-cli\\[plot]')."""
    from twa_cli.plotting import PlotOptions
    from twa_cli.plotting import plot as run

    _setup(json_out, quiet)
    data_spec = _data(data, data_dir, False)
    opts = PlotOptions(fmt=fmt.value, surface=surface, resolution=resolution, surface_batches=surface_batches,
                       batch_size=batch_size, start=start, end=end, every=every, data=data_spec,
                       model=_model(model, data_spec, None) if model else None, device=_device(device), force=force)
    with ui.file_progress("loss surface") as progress:
        result = run(srcs, output, opts, progress=progress)
    if json_out:
        ui.emit_json({"drawn": [{"name": d.name, "path": str(d.path), "what": d.what} for d in result.drawn],
                      "skipped": result.skipped})
        return
    for drawn in result.drawn:
        ui.info(f"wrote {drawn.path}: {drawn.what}")
    for reason in result.skipped:
        ui.info(f"not drawn: {reason}")


@app.command("inspect")
def inspect_(
    ckpts: Annotated[Path, typer.Argument(help="Checkpoint folder, file, shard index or Hugging Face checkpoint folder.")],
    start: Start = 0,
    end: End = None,
    every: Every = 1,
    start_step: StartStep = None,
    end_step: EndStep = None,
    every_step: EveryStep = None,
    top: Top = None,
    by: By = None,
    strip_prefix: StripPrefix = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """The checkpoints the tool sees, in the order it uses them, which ones the selection flags pick, and
    whether they fit together (same tensor names and shapes). Exit 1 when the selected ones do not."""
    from twa_cli.inspect import human_bytes, inspect_checkpoints

    _setup(json_out, quiet)
    report = inspect_checkpoints(ckpts, _selection(start, end, every, start_step, end_step, every_step, top, by),
                                 strip_prefix)
    if json_out:
        ui.emit_json(report.to_dict())
    else:
        columns = ["#", "checkpoint", "format", "step", "epoch", "params", "dtype", "size", "use"]
        if report.metric:
            columns.append(report.metric)
        rows = []
        for e in report.entries:
            row = [e.index, Path(e.path).name, e.format, e.step, e.epoch, f"{e.parameters:,}", e.dtype,
                   human_bytes(e.file_bytes), "yes" if e.selected else ""]
            rows.append(row + ([e.metric] if report.metric else []))
        ui.table(f"{ckpts}", columns, rows)
        ui.info(f"{len(report.selected)} of {len(report.entries)} selected; "
                + ("compatible (same tensor names and shapes)" if report.compatible else f"NOT compatible: {report.problem}"))
        for note in report.notes:
            ui.info(f"note: {note}")
    if not report.compatible:
        raise typer.Exit(1)


# Entry point --------------------------------------------------------------------------------------------


class Interrupted(BaseException):
    """Ctrl-C, raised instead of KeyboardInterrupt, which click would turn into "Aborted!" and exit code 1."""


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted()


class _interruptible:
    """Ctrl-C during training: stop cleanly and say how to continue."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool:
        if kind is not None and issubclass(kind, (KeyboardInterrupt, Interrupted)):
            from twa_cli.sampling import STATE_FILE  # the same name for both training commands

            if (self.out / STATE_FILE).exists():
                ui.error(f"interrupted; the last completed epoch is saved in {self.out / STATE_FILE}: "
                         "run the same command with --resume to continue")
            else:
                ui.error("interrupted in the first epoch, before anything could be resumed: run the command again")
            raise typer.Exit(130)
        return False


def main() -> None:
    argv = sys.argv[1:]
    debug = "--debug" in argv or bool(os.environ.get("TWA_DEBUG"))
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        app(args=argv, prog_name="twa")
    except SystemExit as exc:
        if exc.code in (0, None):  # under torchrun: no rank tears the process group down while another still works
            from twa_cli.distributed import finish

            finish()
        raise
    except TwaError as exc:
        if debug:
            raise
        ui.error(str(exc))
        sys.exit(1)
    except OSError as exc:  # the system refused a read or a write (permissions, a full disk)
        if debug:
            raise
        ui.error(f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc))
        sys.exit(1)
    except Interrupted:
        ui.error("interrupted")
        sys.exit(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
