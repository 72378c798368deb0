"""The `twa` command: each command parses its flags, calls one library function, and prints what it returned.

No work happens here, and nothing that imports torch is imported before a command runs, so `twa --help` and
`twa --version` answer at once. (No `from __future__ import annotations`: Typer reads these annotations.)
"""

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from twa_cli import __version__
from twa_cli.cli.options import Flag, OptionGroup, with_groups
from twa_cli.cli.render import Output, setup_logging
from twa_cli.engine.schedules import SCHEDULES
from twa_cli.units import AUGMENTATIONS, NORMALIZATIONS, STORAGE_DTYPES, human_bytes, parse_size

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
SURFACE = "Loss surface (--surface)"
TEXT = "Text data (Hugging Face models)"
MODEL_NAMES = ("small-cnn", "resnet20", "mlp", "vgg16-bn", "preact-resnet164", "resnet18", "resnet50")
DATA_NAMES = ("digits", "cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder")


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum whose members are `values` (typer shows and checks them as the option's choices)."""
    return Enum(name, {v: v for v in values}, type=str)


Device = _choices("Device", ("auto", "cpu", "cuda"))
Schedule = _choices("Schedule", SCHEDULES)
FitOn = _choices("FitOn", ("train", "val"))
Preset = _choices("Preset", ("default", "paper"))
SelectOn = _choices("SelectOn", ("val", "none"))
Granularity = _choices("Granularity", ("model", "layer"))
Split = _choices("Split", ("test", "train", "both"))
ComputeDtype = _choices("ComputeDtype", ("float64", "float32"))
OutDtype = _choices("OutDtype", ("same", *STORAGE_DTYPES))
BasisDtype = _choices("BasisDtype", STORAGE_DTYPES)
ImageFormat = _choices("ImageFormat", ("png", "svg", "pdf"))
Augment = _choices("Augment", AUGMENTATIONS)
Normalize = _choices("Normalize", NORMALIZATIONS)


def _complete_model(incomplete: str) -> list[str]:
    return [name for name in [*MODEL_NAMES, "torchvision:"] if name.startswith(incomplete)]


def _complete_data(incomplete: str) -> list[str]:
    return [name for name in DATA_NAMES if name.startswith(incomplete)]


# Option groups: each declared once, used by every command that takes it ---------------------------------


def _selection(**flags: Any) -> Any:
    from twa_cli.core.selection import Selection

    return Selection(**flags)


def _read(**flags: Any) -> Any:
    from twa_cli.io.readers import ReadOptions

    return ReadOptions(**flags)


def _task(**flags: Any) -> Any:
    from twa_cli.tasks.resolve import TaskRequest

    for key in ("data_dir", "eval_data", "val_data", "tokenizer"):
        if flags.get(key) is not None:
            flags[key] = str(Path(flags[key]).resolve())
    for key in ("augment", "normalize"):
        if isinstance(flags.get(key), Enum):
            flags[key] = flags[key].value
    return TaskRequest(**flags)


SELECTION = OptionGroup(_selection, [
    Flag("start", int, 0, "First checkpoint to use, by position in the ordered folder."),
    Flag("end", int | None, None, "Stop before this position (exclusive); default: the end."),
    Flag("every", int, 1, "Use every k-th checkpoint.", extra={"min": 1}),
    Flag("start_step", int | None, None, "Use only checkpoints saved at this step or later (runs that save every "
         "K steps)."),
    Flag("end_step", int | None, None, "Use only checkpoints saved before this step (exclusive)."),
    Flag("every_step", int | None, None, "Use only checkpoints whose step is a multiple of this.",
         extra={"min": 1}),
    Flag("top", int | None, None, "Keep the best N of the selected checkpoints by --by (as timm's "
         "avg_checkpoints -n).", extra={"min": 1}),
    Flag("by", str | None, None, "Metric that ranks checkpoints for --top: a metadata field (timm's metric), a "
         "trainer_state.json entry (eval_loss), a name=value in the file name, or a column of the folder's "
         "metrics.jsonl (test_acc). Losses and errors are minimized, others maximized; min:NAME or max:NAME says "
         "which."),
], SELECT)

READ = OptionGroup(_read, [
    Flag("strip_prefix", str | None, None, "Strip this prefix from tensor names (default: module. or model. when "
         "every key of a .pt/.ckpt file has it)."),
    Flag("ema", bool, False, "Read the running average a training tool kept beside the weights (timm's EMA, "
         "Lightning's WeightAveraging) instead of the raw weights of the run (the default: the trajectory TWA "
         "averages).", decls=("--ema/--no-ema",)),
], SELECT)

TASK = OptionGroup(_task, [
    Flag("model", str | None, None, "Architecture, when the checkpoints' metadata names none: a registry name, "
         "torchvision:<name> or package.module:callable.", extra={"autocompletion": _complete_model}),
    Flag("data", str | None, None, "Data set (default: the one recorded in the checkpoints): digits, cifar10, "
         "cifar100, mnist, fashion-mnist, imagefolder or package.module:callable.",
         extra={"autocompletion": _complete_data}),
    Flag("data_dir", Path | None, None, "Folder of the data set (torchvision sets, imagefolder)."),
    Flag("download", bool, False, "Let torchvision download the data set into --data-dir.", decls=("--download",)),
    Flag("val_split", float, 0.0, "Hold out this fraction of the training data as a validation split (the same "
         "examples in every command).", extra={"min": 0.0, "max": 0.9}),
    Flag("augment", Augment | None, None, "Image data: the augmentation the run trained with, which BatchNorm "
         "recomputation repeats: none, crop-flip (CIFAR's padded random crop and flip), resized-crop-flip "
         "(ImageNet's), or standard (the set's own: crop-flip for CIFAR). Default: what the checkpoints record, "
         "else none; sample: standard."),
    Flag("normalize", Normalize | None, None, "Image data: the mean and std the run normalized with: a set's "
         "(cifar10, imagenet, ...), half (0.5), none, or standard (the set's own). Default: what the checkpoints "
         "record, else the set's own (an image folder's is said in a warning); sample: standard."),
    Flag("task", str | None, None, "A whole task of your own, package.module:callable returning a "
         "twa_cli.Task (its model, batches, loss and figures), instead of --model/--data."),
    Flag("eval_data", Path | None, None, "Hugging Face models: held-out text (a file like --data, or a saved "
         "dataset's test split) to report scores on; never chosen on.", panel=TEXT),
    Flag("val_data", Path | None, None, "Hugging Face models: validation text the run did not train on (a file "
         "like --data), which train-subspace chooses its result on; else --val-split, else it holds part of --data "
         "out itself.", panel=TEXT),
    Flag("text_column", str | None, None, "Hugging Face models: the column holding the text (default: text; or the "
         "one column besides the label).", panel=TEXT),
    Flag("label_column", str | None, None, "Hugging Face classifiers: the column holding the label (default: "
         "label).", panel=TEXT),
    Flag("block_size", int | None, None, "Causal language models: tokens per training block (default: the "
         "model's length, at most 1024).", extra={"min": 2}, panel=TEXT),
    Flag("tokenizer", Path | None, None, "Hugging Face models: the folder of the tokenizer (default: the "
         "checkpoint's own).", panel=TEXT),
], DATA)


def _sample_task(model: str, data: str, **flags: Any) -> Any:
    return _task(model=model, data=data, **flags)


SAMPLE_TASK = OptionGroup(_sample_task, [
    Flag("model", str, "small-cnn", "Architecture: small-cnn, resnet20, mlp, vgg16-bn, preact-resnet164, resnet18, "
         "resnet50, torchvision:<name> or package.module:callable.", extra={"autocompletion": _complete_model}),
    Flag("data", str, "digits", "Data set: digits (bundled), cifar10, cifar100, mnist, fashion-mnist, imagefolder "
         "or package.module:callable.", extra={"autocompletion": _complete_data}),
    *TASK.without("model", "data").flags,
], DATA)

# Single options shared by several commands -------------------------------------------------------------

DeviceOpt = Annotated[Device, typer.Option(help="Where to compute: auto picks cuda when available.")]
Seed = Annotated[int, typer.Option(help="Random seed (initialization, data order, augmentation).")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.", rich_help_panel=OUTPUT)]
Json = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout (logs stay on stderr).",
                                    rich_help_panel=OUTPUT)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors (and the --json summary).",
                                     rich_help_panel=OUTPUT)]
BnBatches = Annotated[int | None, typer.Option(help="Recompute BatchNorm statistics on at most this many batches "
                                                       "(default: the whole training set).", min=1)]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from the end of its last "
                                      "completed epoch.", rich_help_panel=TRAIN)]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print what would be read and the memory and disk the "
                                      "command needs, then exit.", rich_help_panel=OUTPUT)]
Epochs = Annotated[int, typer.Option(help="Epochs of training.", min=1, rich_help_panel=TRAIN)]
Momentum = Annotated[float, typer.Option(help="Momentum.", rich_help_panel=TRAIN)]
BatchSize = Annotated[int, typer.Option(help="Batch size.", min=1, rich_help_panel=TRAIN)]
ScheduleOpt = Annotated[Schedule, typer.Option(help="step: 10x lower at 50% and 75% of the epochs; linear or "
                                               "cosine to zero; constant.", rich_help_panel=TRAIN)]


class _Command(TyperCommand):
    """Notes a help request before any option is read: --config and --config-from are eager and may come before
    -h, and a help page reads no file (nor imports torch to read one)."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        ctx.meta["twa_help"] = any(a in ctx.help_option_names for a in args)
        return super().parse_args(ctx, args)


def _reading_files(ctx: typer.Context) -> bool:
    return not (ctx.resilient_parsing or ctx.meta.get("twa_help"))


def _load_config(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """Eager: fills the command's defaults from the file before any other option is read, so flags win."""
    from twa_cli.cli.config import apply_config_file

    return apply_config_file(ctx, value) if value is not None and _reading_files(ctx) else value


def _load_recorded(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    from twa_cli.cli.config import apply_recorded

    return apply_recorded(ctx, value) if value is not None and _reading_files(ctx) else value


ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="Read options from a YAML or TOML file (flags given here override it; a [command] section "
    "overrides shared keys).", is_eager=True, callback=_load_config, rich_help_panel=OUTPUT)]
ConfigFrom = Annotated[Path | None, typer.Option(
    "--config-from", help="Repeat the options recorded in a result file this tool wrote (flags given here override "
    "them; a model, data set or task that is your own code must be given again).", is_eager=True,
    callback=_load_recorded, rich_help_panel=OUTPUT)]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"twa {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error (may also follow any "
                                        "command).")] = False,
) -> None:
    """Trainable Weight Averaging (Li et al., ICLR 2023): sample checkpoints, build their subspace, train inside it."""


def _start(json_out: bool, quiet: bool, ctx: typer.Context | None = None) -> tuple[Output, dict | None]:
    """The command's output settings, and the record of the invocation that every file it writes keeps."""
    silent = os.environ.get("RANK", "0") != "0"  # under torchrun only rank 0 speaks; the others print only errors
    output = Output(json=json_out, quiet=quiet, silent=silent)
    setup_logging(quiet or silent)
    if ctx is None or not ctx.command.name:
        return output, None
    from twa_cli.cli.config import check_refused, resolved

    check_refused(ctx)
    return output, {"command": ctx.command.name, "options": resolved(ctx.params)}


def _out_dtype(dtype: Enum) -> str | None:
    return None if dtype.value == "same" else dtype.value


def _show_plan(plan: Any, output: Output) -> None:
    if output.json:
        output.emit_json({"dry_run": True, **plan.to_dict()})
        return
    output.table(f"{plan.command} --dry-run", ["", "estimate"], [
        ["checkpoints read", f"{len(plan.reads)} ({human_bytes(plan.read_bytes)})"],
        ["parameters", f"{plan.parameters:,}"],
        ["peak RAM", human_bytes(plan.peak_ram_bytes)],
        ["GPU memory", human_bytes(plan.gpu_bytes) if plan.gpu_bytes else "-"],
        ["disk written", human_bytes(plan.disk_bytes)],
    ])
    for path in plan.reads:
        output.info(f"would read {path}")
    for note in plan.notes:
        output.info(f"note: {note}")


LABELS = {"accuracy": "acc %", "token_accuracy": "token acc %"}


def _score_columns(prefix: str, metrics: Any) -> list[tuple[str, Any]]:
    """(column, value) for a Metrics: accuracies first (as the paper's tables), then the loss, then the rest."""
    if metrics is None:
        return []
    names = sorted(metrics.values, key=lambda k: (k not in LABELS, k != "loss", k))
    return [(f"{prefix} {LABELS.get(k, k)}", metrics.values[k]) for k in names]


def _print_shards(output: Output, shards: list[dict[str, Any]]) -> None:
    """Under torchrun: how much of the basis each rank holds."""
    total = sum(s["bytes"] for s in shards)
    for s in shards:
        lo, hi = s["columns"]
        output.info(f"rank {s['rank']}: columns {lo:,}:{hi:,} of the basis, {s['bytes'] / 2**20:.2f} MiB "
                    f"({100 * s['bytes'] / max(total, 1):.1f}% of {total / 2**20:.2f} MiB)")


# Commands -----------------------------------------------------------------------------------------------


@app.command(cls=_Command)
@with_groups(task=SAMPLE_TASK)
def sample(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(help="Folder to write the checkpoints into (created).")],
    task: Any,
    epochs: Epochs = 40,
    lr: Annotated[float, typer.Option(help="Initial learning rate.", rich_help_panel=TRAIN)] = 0.1,
    schedule: ScheduleOpt = Schedule.step,
    momentum: Momentum = 0.9,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.", rich_help_panel=TRAIN)] = 1e-4,
    batch_size: BatchSize = 128,
    per_epoch: Annotated[int, typer.Option(help="Checkpoints saved per epoch, evenly spaced (plus the initial "
                                           "weights).", min=1, rich_help_panel=TRAIN)] = 1,
    init: Annotated[Path | None, typer.Option(help="Start from the weights of this checkpoint (fine-tuning), not "
                                                 "at random.", rich_help_panel=TRAIN)] = None,
    eval_every_epoch: Annotated[bool, typer.Option("--eval-every-epoch/--no-eval-every-epoch",
                                                   help="Test figures after each epoch.")] = True,
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
    from twa_cli.commands.common import resolve_device
    from twa_cli.commands.sample import SampleConfig
    from twa_cli.commands.sample import sample as run_sample

    output, invocation = _start(json_out, quiet, ctx)
    cfg = SampleConfig(task, epochs, lr, schedule.value, momentum, weight_decay, batch_size, per_epoch, seed,
                       resolve_device(device.value), str(init) if init else None, eval_every_epoch)
    with _interruptible(out, output), output.training_progress("sample") as reporter:
        result = run_sample(out, cfg, resume=resume, force=force, reporter=reporter, invocation=invocation)
    last = result.history[-1] if result.history else {}
    if json_out:
        output.emit_json({"out": str(result.out), "checkpoints": len(result.checkpoints), "final": last})
        return
    output.info(f"wrote {len(result.checkpoints)} checkpoints to {result.out}")
    figures = [(k.replace("_", " ").replace("acc", "acc %"), v) for k, v in last.items()
               if k.startswith(("train_", "test_"))]
    output.table("SGD", ["epochs", *[k for k, _ in figures]], [[last.get("epoch"), *[v for _, v in figures]]])


@app.command(cls=_Command)
@with_groups(selection=SELECTION, read=READ, task=TASK)
def swa(
    ctx: typer.Context,
    ckpts: Annotated[Path, typer.Argument(help="Checkpoint folder (or one file).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Result: a .safetensors file, or a folder (written "
                                         "in Hugging Face's layout).", rich_help_panel=OUTPUT)],
    selection: Any,
    read: Any,
    task: Any,
    bn_update: Annotated[bool, typer.Option("--bn-update/--no-bn-update", help="Recompute BatchNorm statistics on "
                                            "the training data (needs architecture and data).")] = True,
    bn_batches: BnBatches = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Greedy soup: add a checkpoint only if held-out accuracy "
                                         "on the validation split (--val-split or --val-data, else the "
                                         "checkpoints') does not drop.")] = False,
    compute_dtype: Annotated[ComputeDtype, typer.Option(help="Precision the sums are accumulated in.")
                             ] = ComputeDtype.float64,
    dtype: Annotated[OutDtype, typer.Option(help="Precision of the written average: same keeps each tensor's own "
                                            "(the widest among the checkpoints).", rich_help_panel=OUTPUT)
                     ] = OutDtype.same,
    max_shard_size: Annotated[str | None, typer.Option(help="Split the result into shards of at most this size "
                                                          "(5GB, 500MB) with an index, as Hugging Face does.",
                                                          rich_help_panel=OUTPUT)] = None,
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
    from twa_cli.commands.swa import SwaRequest
    from twa_cli.commands.swa import swa as run_swa

    out, invocation = _start(json_out, quiet, ctx)
    request = SwaRequest(selection, read, task, bn_update, bn_batches, greedy, compute_dtype.value, _out_dtype(dtype),
                         parse_size(max_shard_size) if max_shard_size is not None else None, device.value)
    with out.file_progress("averaging") as progress:
        result = run_swa(ckpts, output, request, force=force, dry_run=dry_run, progress=progress,
                         invocation=invocation)
    if dry_run:
        _show_plan(result, out)
        return
    if json_out:
        out.emit_json(result.to_dict())
        return
    scores = _score_columns("test", result.test)
    if result.chosen is not None:
        out.info(f"greedy soup of {len(result.chosen)} of {len(result.sources)} checkpoints -> {result.path}")
        out.table("Greedy soup", ["checkpoints", f"held-out {result.metric}", *[c for c, _ in scores]],
                  [[len(result.chosen), result.val, *[v for _, v in scores]]])
        return
    batchnorm = {"recomputed": "BatchNorm statistics recomputed", "averaged": "BatchNorm statistics averaged",
                 "none": "the model has no BatchNorm"}[result.bn]
    out.info(f"averaged {len(result.sources)} checkpoints into {result.path} ({batchnorm})")
    if result.test:
        out.table("SWA", ["checkpoints", *[c for c, _ in scores]], [[len(result.sources), *[v for _, v in scores]]])


@app.command(cls=_Command)
@with_groups(selection=SELECTION, read=READ,
             task=TASK.only("model", "data", "data_dir", "augment", "normalize", "task"))
def orthogonalize(
    ctx: typer.Context,
    ckpts: Annotated[Path, typer.Argument(help="Checkpoint folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Basis file (.safetensors; any name is read back by "
                                         "its content).", rich_help_panel=OUTPUT)],
    selection: Any,
    read: Any,
    task: Any,
    tol: Annotated[float, typer.Option(help="Drop a checkpoint whose residual is below this fraction of its norm (a "
                                       "near-duplicate); in [0, 1).")] = 1e-6,
    dtype: Annotated[BasisDtype, typer.Option(help="Storage precision of the basis.")] = BasisDtype.float32,
    dry_run: DryRun = False,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
    config: ConfigOpt = None,
    config_from: ConfigFrom = None,
) -> None:
    """Build an orthonormal basis of the span of the selected checkpoints (streamed, numerically robust)."""
    from twa_cli.commands.orthogonalize import OrthogonalizeRequest
    from twa_cli.commands.orthogonalize import orthogonalize as run_orthogonalize

    out, invocation = _start(json_out, quiet, ctx)
    request = OrthogonalizeRequest(selection, read, task, tol, dtype.value)
    with out.file_progress("orthogonalizing") as progress:
        result = run_orthogonalize(ckpts, output, request, force=force, dry_run=dry_run, progress=progress,
                                   invocation=invocation)
    if dry_run:
        _show_plan(result, out)
        return
    if json_out:
        out.emit_json(result.to_dict())
        return
    out.info(f"basis of rank {result.rank} from {result.checkpoints} checkpoints ({result.dimension:,} parameters) "
             f"-> {result.path}")
    out.info(f"max |P P^T - I| = {result.errors['orthogonality']:.1e}")
    _print_shards(out, result.holdings)


@app.command("train-subspace", cls=_Command)
@with_groups(selection=SELECTION, read=READ, task=TASK)
def train_subspace(
    ctx: typer.Context,
    src: Annotated[Path, typer.Argument(help="A basis file from `twa orthogonalize`, or a checkpoint folder "
                                        "(orthogonalized first).")],
    selection: Any,
    read: Any,
    task: Any,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output folder (default: a new folder "
                                                   "beside SRC, named SRC-twa).", rich_help_panel=OUTPUT)] = None,
    epochs: Epochs = 10,
    lr: Annotated[float, typer.Option(help="Learning rate (the paper's condensed rate: 2 on CIFAR).",
                                      rich_help_panel=TRAIN)] = 2.0,
    schedule: ScheduleOpt = Schedule.step,
    momentum: Momentum = 0.9,
    weight_decay: Annotated[float, typer.Option(help="lambda of eq. 5: an L2 penalty on the averaging coefficients.",
                                                rich_help_panel=TRAIN)] = 1e-5,
    batch_size: BatchSize = 128,
    preset: Annotated[Preset, typer.Option(help="default: choose the start and the result on validation data "
                                           "(--select val, --init best) and check the lr against the span's "
                                           "curvature; paper: the paper's Algorithm 1 as published (fit on the "
                                           "training data from the center at the fixed lr, keep the end). Flags "
                                           "below override it.", rich_help_panel=TRAIN)] = Preset.default,
    init: Annotated[str | None, typer.Option(help="Starting point: best (the better of center and last on the "
                                             "validation split), center (mean of the checkpoints), last, or a "
                                             "checkpoint file (default: best; paper: center).",
                                             rich_help_panel=TRAIN)] = None,
    select: Annotated[SelectOn | None, typer.Option(help="val: score the start and the run on the validation split "
                                                    "(--val-data, the data's own, else a part of the training data "
                                                    "held out of the fit) and return the best point; none: return "
                                                    "where the run ends (default: val; paper: none).",
                                                    rich_help_panel=TRAIN)] = None,
    tol: Annotated[float, typer.Option(help="When SRC is a folder: near-duplicate tolerance of the "
                                       "orthogonalization.", rich_help_panel=SELECT)] = 1e-6,
    dtype: Annotated[OutDtype, typer.Option(help="Precision of the written result (training runs in fp32).",
                                            rich_help_panel=OUTPUT)] = OutDtype.same,
    basis_dtype: Annotated[BasisDtype | None, typer.Option(help="Precision of the basis in the projection "
                                                              "(accumulating in fp32; default: as stored).",
                                                              rich_help_panel=TRAIN)] = None,
    bn_update: Annotated[bool, typer.Option("--bn-update/--no-bn-update", help="Recompute BatchNorm statistics "
                                            "after training.")] = True,
    bn_batches: BnBatches = None,
    eval_every_epoch: Annotated[bool, typer.Option("--eval-every-epoch/--no-eval-every-epoch", help="Test figures "
                                                   "after each epoch (BatchNorm recomputed first).")] = True,
    fit_on: Annotated[FitOn, typer.Option(help="Fit the coefficients on the training data, or on the held-out split "
                                          "(TWA-v; needs --val-split).", rich_help_panel=VARIANTS)] = FitOn.train,
    granularity: Annotated[Granularity, typer.Option(help="model: one coefficient per checkpoint; layer: one per "
                                                     "checkpoint and group of tensors.",
                                                     rich_help_panel=VARIANTS)] = Granularity.model,
    group_size: Annotated[int, typer.Option(help="With --granularity layer: tensors per group.", min=1,
                                            rich_help_panel=VARIANTS)] = 1,
    affine: Annotated[bool, typer.Option("--affine", help="Train in the affine hull of the checkpoints: coefficients "
                                         "sum to exactly 1.", rich_help_panel=VARIANTS)] = False,
    sync_bn: Annotated[bool | None, typer.Option("--sync-bn/--no-sync-bn", help="Under torchrun: synchronize "
                                                    "BatchNorm over the ranks' parts of each batch (default: on with "
                                                    "GPUs; PyTorch cannot on CPU).")] = None,
    lr_check: Annotated[bool | None, typer.Option("--lr-check/--no-lr-check", help="Measure the span's sharpness "
                                                  "first and lower an --lr too large to be stable in it (with a "
                                                  "warning; default: on; paper: off).")] = None,
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
    from twa_cli.commands.train_subspace import SubspaceConfig, default_output
    from twa_cli.commands.train_subspace import train_subspace as run_train_subspace

    out, invocation = _start(json_out, quiet, ctx)
    cfg = SubspaceConfig(
        epochs=epochs, lr=lr, schedule=schedule.value, momentum=momentum, weight_decay=weight_decay,
        batch_size=batch_size, preset=preset.value, init=init, select=select.value if select else None, seed=seed,
        device=device.value, bn_update=bn_update, bn_batches=bn_batches,
        eval_every_epoch=eval_every_epoch, lr_check=lr_check, selection=selection, read=read, tol=tol, task=task,
        fit_on=fit_on.value, granularity=granularity.value, group_size=group_size, affine=affine,
        basis_dtype=basis_dtype.value if basis_dtype else None, sync_bn=sync_bn, dtype=_out_dtype(dtype),
    )
    folder = output or default_output(src)
    with _interruptible(folder, out), out.training_progress("twa") as reporter:
        result = run_train_subspace(src, folder, cfg, force=force, resume=resume, dry_run=dry_run, reporter=reporter,
                                    invocation=invocation)
    if dry_run:
        _show_plan(result, out)
        return
    if json_out:
        out.emit_json(result.to_dict())
        return
    report = result.report
    if report.groups is not None:
        out.info(f"wrote {result.result} (layer-wise coefficients for {len(report.groups)} groups of tensors)")
    else:
        out.info(f"wrote {result.result} (coefficients sum to {report.sum:.3f})")
    scores = _score_columns("test", result.test)
    if result.test:
        out.table("TWA", ["checkpoints", *[c for c, _ in scores]], [[len(report.sources), *[v for _, v in scores]]])
    _print_shards(out, result.holdings)
    out.line(str(result.out))


@app.command("watch", cls=_Command)
@with_groups(read=READ, task=TASK)
def watch(
    ctx: typer.Context,
    run: Annotated[Path, typer.Argument(help="The folder a training job is writing its checkpoints into.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for SWA, the basis, TWA, watch.jsonl and "
                                         "the state to resume from.", rich_help_panel=OUTPUT)],
    read: Any,
    task: Any,
    every: Annotated[int, typer.Option(help="Train TWA in the span after this many new checkpoints.", min=1)] = 4,
    interval: Annotated[float, typer.Option(help="Seconds between looks at the folder.")] = 30.0,
    settle: Annotated[float, typer.Option(help="Seconds a checkpoint's files must stay unchanged before it is "
                                          "read (a checkpoint still being written is waited for).")] = 10.0,
    idle_exit: Annotated[float | None, typer.Option(help="End (after a last TWA round) when no new checkpoint came "
                                                    "for this many seconds (default: keep watching).")] = None,
    target: Annotated[float | None, typer.Option(help="End with exit code 0 as soon as TWA's held-out figure "
                                                 "(accuracy in percent, or loss for a language model) is this "
                                                 "good; if the watch ends otherwise, exit code 3.")] = None,
    polls: Annotated[int | None, typer.Option(help="End after this many looks (a checkpoint is taken in at the "
                                              "second look that finds it unchanged).", min=1)] = None,
    epochs: Annotated[int, typer.Option(help="Epochs of each TWA round.", min=1, rich_help_panel=TRAIN)] = 2,
    lr: Annotated[float, typer.Option(help="Learning rate of each round (checked against the span's "
                                      "curvature by default).", rich_help_panel=TRAIN)] = 2.0,
    batch_size: BatchSize = 128,
    preset: Annotated[Preset, typer.Option(help="As train-subspace's --preset.", rich_help_panel=TRAIN)
                      ] = Preset.default,
    bn_batches: BnBatches = None,
    seed: Seed = 0,
    device: DeviceOpt = Device.auto,
    resume: Annotated[bool, typer.Option("--resume", help="Go on from what an earlier watch of the same run into "
                                         "OUTPUT took in (after a crash or kill -9).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over in an OUTPUT an earlier watch wrote.",
                                        rich_help_panel=OUTPUT)] = False,
    json_out: Json = False,
    quiet: Quiet = False,
    config: ConfigOpt = None,
    config_from: ConfigFrom = None,
) -> None:
    """Follow a run as it trains: SWA kept up to date, TWA every few checkpoints, held-out scores as it goes.

    The basis grows with each checkpoint (never rebuilt); a checkpoint still being written is waited for, one
    deleted is skipped, and a killed watch resumes with --resume."""
    from twa_cli.commands.train_subspace import SubspaceConfig
    from twa_cli.commands.watch import WatchRequest
    from twa_cli.commands.watch import watch as run_watch

    out, invocation = _start(json_out, quiet, ctx)
    request = WatchRequest(
        subspace=SubspaceConfig(epochs=epochs, lr=lr, batch_size=batch_size, preset=preset.value, seed=seed,
                                device=device.value, bn_batches=bn_batches, read=read, task=task),
        every=every, interval=interval, settle=settle, idle_exit=idle_exit, target=target, polls=polls)

    def said(round_: Any) -> None:
        figures = ", ".join(f"{name} {value:.4g}" for name, value in (("SWA", round_.swa), ("TWA", round_.twa))
                            if value is not None)
        metric = f"held-out {round_.metric.split(':', 1)[1]}" if round_.metric else "held-out"
        out.info(f"round {round_.round}: {round_.checkpoints} checkpoints (rank {round_.rank}); {metric}: "
                 f"{figures or 'not scored'}" + (f" (kept: {round_.kept})" if round_.kept else ""))

    result = run_watch(run, output, request, resume=resume, force=force, on_round=said, invocation=invocation)
    if json_out:
        out.emit_json(result.to_dict())
    else:
        how = {"target": "the target was reached", "idle": "no new checkpoint came", "polls": "the looks ran out"}
        out.info(f"watched {result.checkpoints} checkpoints in {len(result.rounds)} rounds; ended: "
                 f"{how[result.ended]} -> {result.out}")
    if target is not None and not result.reached:
        raise typer.Exit(3)


@app.command("eval", cls=_Command)
@with_groups(read=READ.only("strip_prefix"), task=TASK.without("val_split", "val_data"))
def eval_(
    files: Annotated[list[Path], typer.Argument(help="Checkpoint files to score.")],
    read: Any,
    task: Any,
    label: Annotated[list[str] | None, typer.Option("--label", help="A name for each file in the table (repeat "
                                                       "it, in order).")] = None,
    split: Annotated[Split, typer.Option(help="test, train, or both (then also the generalization gap).")] = Split.test,
    bn_update: Annotated[bool, typer.Option("--bn-update/--no-bn-update", help="Recompute BatchNorm statistics "
                                            "before scoring.")] = False,
    bn_batches: BnBatches = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.", min=1)] = 256,
    device: DeviceOpt = Device.auto,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Test (and train) figures of each checkpoint; the generalization gap as in the paper's tables."""
    from twa_cli.commands.evaluate import EvalRequest, evaluate_checkpoints
    from twa_cli.errors import TwaError

    out, _ = _start(json_out, quiet)
    if label and len(label) != len(files):
        raise TwaError(f"--label given {len(label)} times for {len(files)} files")
    request = EvalRequest(task, read, split.value, bn_update, bn_batches, batch_size, device.value)
    results = evaluate_checkpoints(files, request)
    if json_out:
        out.emit_json({"results": [r.to_dict() for r in results]})
        return
    columns: list[str] = []
    rows = []
    for name, r in zip(label or [r.path for r in results], results, strict=True):
        cells = _score_columns("test", r.test)
        if r.train is not None:
            train = _score_columns("train", r.train)
            cells += train[:1]  # the training figure the gap is made of
        cells.append(("gap", r.gap))
        columns = columns or [c for c, _ in cells]
        rows.append([name, *[v for _, v in cells]])
    out.table("Evaluation", ["model" if label else "file", *columns], rows)


@app.command(cls=_Command)
@with_groups(selection=SELECTION.only("start", "end", "every"),
             task=TASK.only("model", "data", "data_dir", "augment", "normalize", "task"))
def plot(
    srcs: Annotated[list[Path], typer.Argument(metavar="SRC...", help="A train-subspace output folder, a sample "
                                               "folder, a basis file, `twa eval --json` output or a benchmark JSON "
                                               "(several combine).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the pictures into (created).",
                                         rich_help_panel=OUTPUT)],
    selection: Any,
    task: Any,
    fmt: Annotated[ImageFormat, typer.Option("--format", help="Image format.", rich_help_panel=OUTPUT)
                   ] = ImageFormat.png,
    surface: Annotated[bool, typer.Option("--surface", help="Draw the training loss and test error over the "
                                          "trajectory's plane (needs the data).", rich_help_panel=SURFACE)] = False,
    resolution: Annotated[int, typer.Option(help="Grid points along each axis of the surface (2 to 1000).",
                                            rich_help_panel=SURFACE)] = 11,
    surface_batches: Annotated[int, typer.Option(help="Batches per grid point for BatchNorm statistics, training loss "
                                                 "and test error.", min=1, rich_help_panel=SURFACE)] = 4,
    batch_size: Annotated[int, typer.Option(help="Batch size of the surface.", min=1, rich_help_panel=SURFACE)] = 128,
    device: DeviceOpt = Device.auto,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Pictures of a run: averaging coefficients, trajectory with SWA and TWA, accuracy per epoch, variance
    spectrum, accuracy against epochs of checkpoints used. Needs matplotlib (pip install 'twa-cli\\[plot]')."""
    from twa_cli.commands.plot import PlotOptions
    from twa_cli.commands.plot import plot as run_plot

    out, _ = _start(json_out, quiet)
    opts = PlotOptions(fmt=fmt.value, surface=surface, resolution=resolution, surface_batches=surface_batches,
                       batch_size=batch_size, selection=selection, task=task, device=device.value, force=force)
    with out.file_progress("loss surface") as progress:
        result = run_plot(srcs, output, opts, progress=progress)
    if json_out:
        out.emit_json({"drawn": [{"name": d.name, "path": str(d.path), "what": d.what} for d in result.drawn],
                       "skipped": result.skipped})
        return
    for drawn in result.drawn:
        out.info(f"wrote {drawn.path}: {drawn.what}")
    for reason in result.skipped:
        out.info(f"not drawn: {reason}")


@app.command("inspect", cls=_Command)
@with_groups(selection=SELECTION, read=READ)
def inspect_(
    ckpts: Annotated[Path, typer.Argument(help="Checkpoint folder, file, shard index or Hugging Face checkpoint "
                                          "folder.")],
    selection: Any,
    read: Any,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """The checkpoints the tool sees, in the order it uses them, which ones the selection flags pick, and
    whether they fit together (same tensor names and shapes). Exit 1 when the selected ones do not."""
    from twa_cli.commands.inspect import inspect

    out, _ = _start(json_out, quiet)
    report = inspect(ckpts, selection, read)
    if json_out:
        out.emit_json(report.to_dict())
    else:
        columns = ["#", "checkpoint", "format", "step", "epoch", "params", "buffers", "dtype", "size", "use"]
        if report.metric:
            columns.append(report.metric)
        rows = []
        for e in report.entries:
            row = [e.index, Path(e.path).name, e.format, e.step, e.epoch, f"{e.parameters:,}", f"{e.buffers:,}",
                   e.dtype, human_bytes(e.file_bytes), "yes" if e.selected else ""]
            rows.append(row + ([f"{e.metric:.6g}" if e.metric is not None else None] if report.metric else []))
        out.table(f"{ckpts}", columns, rows)
        if report.architecture:
            out.info(f"architecture: {report.architecture}" + (f", data: {report.data}" if report.data else ""))
        out.info(f"{len(report.selected)} of {len(report.entries)} selected; "
                 + ("compatible (same tensor names and shapes)" if report.compatible
                    else f"NOT compatible: {report.problem}"))
        for note in report.notes:
            out.info(f"note: {note}")
    if not report.compatible:
        raise typer.Exit(1)


# Interruption ----------------------------------------------------------------------------------------


class _interruptible:
    """Ctrl-C during training: stop cleanly and say how to continue."""

    def __init__(self, out: Path | None, output: Output):
        self.out = out
        self.output = output

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool:
        from twa_cli.cli.signals import Interrupted

        if kind is not None and issubclass(kind, (KeyboardInterrupt, Interrupted)):
            from twa_cli.io.runfiles import state_of

            state = state_of(self.out) if self.out is not None else None
            if state is not None:
                self.output.error(f"interrupted; the last completed epoch is saved in {state}: run the same "
                                  "command with --resume to continue")
            else:
                self.output.error("interrupted in the first epoch, before anything could be resumed: run the "
                                  "command again")
            raise typer.Exit(130)
        return False
