"""The `twa` command: parses flags, calls the library, prints. No work happens here.

Exit codes: 0 success, 1 a problem with the inputs (one line on stderr; --debug shows the traceback),
2 a usage error (unknown flag, bad value), 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from twa_cli import __version__
from twa_cli import console as ui
from twa_cli.errors import TwaError

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


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Schedule(str, Enum):
    step = "step"
    linear = "linear"
    constant = "constant"
    cosine = "cosine"


class Split(str, Enum):
    test = "test"
    train = "train"
    both = "both"


# Options shared by several commands ---------------------------------------------------------------------
Start = Annotated[int, typer.Option(help="First checkpoint to use, by position in the ordered folder.", rich_help_panel=SELECT)]
End = Annotated[Optional[int], typer.Option(help="Stop before this position (exclusive); default: the end.", rich_help_panel=SELECT)]
Every = Annotated[int, typer.Option(help="Use every k-th checkpoint.", min=1, rich_help_panel=SELECT)]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Architecture, when the checkpoints' metadata names none: a registry name, torchvision:<name> or package.module:callable.", rich_help_panel=DATA)]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="Data set (default: the one recorded in the checkpoints): digits, cifar10, cifar100, mnist, fashion-mnist, imagefolder or package.module:callable.", rich_help_panel=DATA)]
DataDir = Annotated[Optional[Path], typer.Option(help="Folder of the data set (torchvision sets, imagefolder).", rich_help_panel=DATA)]
Download = Annotated[bool, typer.Option("--download", help="Let torchvision download the data set into --data-dir.", rich_help_panel=DATA)]
DeviceOpt = Annotated[Device, typer.Option(help="Where to compute: auto picks cuda when available.")]
Seed = Annotated[int, typer.Option(help="Random seed (initialization, data order, augmentation).")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.", rich_help_panel=OUTPUT)]
Json = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout (logs stay on stderr).", rich_help_panel=OUTPUT)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors (and the --json summary).", rich_help_panel=OUTPUT)]
BnBatches = Annotated[Optional[int], typer.Option(help="Recompute BatchNorm statistics on at most this many batches (default: the whole training set).", min=1)]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from the end of its last completed epoch.", rich_help_panel=TRAIN)]


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


def _setup(json_out: bool, quiet: bool) -> None:
    ui.settings.json = json_out
    ui.settings.quiet = quiet or json_out
    ui.setup_logging(quiet)


def _device(device: Device) -> str:
    if device is Device.auto:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            raise TwaError("--device cuda: no CUDA device is available")
    return device.value


def _data(name: str | None, data_dir: Path | None, download: bool) -> dict[str, Any] | None:
    from twa_cli.data import data_spec

    if name is None:
        if data_dir is not None:
            raise TwaError("--data-dir needs --data to say which data set it holds")
        return None
    return data_spec(name, data_dir, download)


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


def _selected(ckpts_path: Path, start: int, end: int | None, every: int) -> list[Any]:
    from twa_cli.checkpoints import list_folder, select

    return select(list_folder(ckpts_path), start, end, every)


# Commands -----------------------------------------------------------------------------------------------


@app.command()
def sample(
    out: Annotated[Path, typer.Argument(help="Folder to write the checkpoints into (created).")],
    model: Annotated[str, typer.Option(help="Architecture: small-cnn, resnet20, mlp, vgg16-bn, preact-resnet164, resnet18, resnet50, torchvision:<name> or package.module:callable.", rich_help_panel=DATA)] = "small-cnn",
    data: Annotated[str, typer.Option(help="Data set: digits (bundled), cifar10, cifar100, mnist, fashion-mnist, imagefolder or package.module:callable.", rich_help_panel=DATA)] = "digits",
    data_dir: DataDir = None,
    download: Download = False,
    epochs: Annotated[int, typer.Option(help="Epochs of regular training.", min=1, rich_help_panel=TRAIN)] = 40,
    lr: Annotated[float, typer.Option(help="Initial learning rate.", rich_help_panel=TRAIN)] = 0.1,
    schedule: Annotated[Schedule, typer.Option(help="step: 10x lower at 50% and 75% of the epochs; linear or cosine to zero; constant.", rich_help_panel=TRAIN)] = Schedule.step,
    momentum: Annotated[float, typer.Option(help="SGD momentum.", rich_help_panel=TRAIN)] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.", rich_help_panel=TRAIN)] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Batch size.", min=1, rich_help_panel=TRAIN)] = 128,
    per_epoch: Annotated[int, typer.Option(help="Checkpoints saved per epoch, evenly spaced (plus the initial weights).", min=1, rich_help_panel=TRAIN)] = 1,
    init: Annotated[Optional[str], typer.Option(help="Start from this checkpoint file (weights and BatchNorm statistics; momentum from zero), e.g. to sample a tail stage.", rich_help_panel=TRAIN)] = None,
    eval_every_epoch: Annotated[bool, typer.Option("--eval-every-epoch/--no-eval-every-epoch", help="Test accuracy after each epoch.")] = True,
    seed: Seed = 0,
    device: DeviceOpt = Device.auto,
    resume: Resume = False,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Train with regular SGD (Appendix A.2) and save the checkpoints TWA averages."""
    from twa_cli.sampling import SampleConfig
    from twa_cli.sampling import sample as run

    _setup(json_out, quiet)
    cfg = SampleConfig(model, _data(data, data_dir, download), epochs, lr, schedule.value, momentum, weight_decay,
                       batch_size, per_epoch, seed, _device(device), init, eval_every_epoch)
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
    ckpts: Annotated[Path, typer.Argument(help="Checkpoint folder (or one file).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Result file (.safetensors).", rich_help_panel=OUTPUT)],
    start: Start = 0,
    end: End = None,
    every: Every = 1,
    model: ModelOpt = None,
    data: DataOpt = None,
    data_dir: DataDir = None,
    download: Download = False,
    bn_update: Annotated[bool, typer.Option("--bn-update/--no-bn-update", help="Recompute BatchNorm statistics on the training data (needs architecture and data).")] = True,
    bn_batches: BnBatches = None,
    device: DeviceOpt = Device.auto,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Uniform average of the selected checkpoints (SWA), BatchNorm recomputed."""
    from twa_cli.averaging import swa as run
    from twa_cli.checkpoints import check_output

    _setup(json_out, quiet)
    check_output(output, force, inputs=[ckpts])
    selected = _selected(ckpts, start, end, every)
    data_spec = _data(data, data_dir, download)
    arch = _model(model, data_spec, selected[0].data)
    with ui.file_progress("averaging") as progress:
        result = run(selected, output, model=arch, data=data_spec, bn_update=bn_update, bn_batches=bn_batches,
                     device=_device(device), progress=progress)
    summary = {"output": str(result.path), "checkpoints": result.count, "batchnorm": result.bn,
               "test": asdict(result.test) if result.test else None}
    if json_out:
        ui.emit_json(summary)
    else:
        ui.info(f"averaged {result.count} checkpoints into {result.path} (BatchNorm statistics {result.bn})")
        if result.test:
            ui.table("SWA", ["checkpoints", "test acc %", "test loss"], [[result.count, result.test.accuracy, result.test.loss]])


@app.command()
def orthogonalize(
    ckpts: Annotated[Path, typer.Argument(help="Checkpoint folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Basis file (.safetensors).", rich_help_panel=OUTPUT)],
    start: Start = 0,
    end: End = None,
    every: Every = 1,
    tol: Annotated[float, typer.Option(help="Drop a checkpoint whose residual is below this fraction of its norm (a near-duplicate).")] = 1e-6,
    dtype: Annotated[str, typer.Option(help="Storage precision of the basis: float32, bfloat16 or float16.")] = "float32",
    model: ModelOpt = None,
    data: DataOpt = None,
    data_dir: DataDir = None,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Build an orthonormal basis of the span of the selected checkpoints (streamed, numerically robust)."""
    from twa_cli.basis import orthogonalize as run
    from twa_cli.basis import save_basis
    from twa_cli.checkpoints import check_output

    _setup(json_out, quiet)
    check_output(output, force, inputs=[ckpts])
    selected = _selected(ckpts, start, end, every)
    arch = _model(model, _data(data, data_dir, False), selected[0].data)
    with ui.file_progress("orthogonalizing") as progress:
        basis = run(selected, tol=tol, dtype=dtype, model=arch, progress=progress)
    if arch is None and data is not None:
        basis.data = _data(data, data_dir, False)
    save_basis(basis, output)
    summary = {"output": str(output), "checkpoints": len(selected), "rank": basis.rank, "dimension": basis.dim,
               "dropped": basis.dropped, "errors": basis.errors}
    if json_out:
        ui.emit_json(summary)
    else:
        ui.info(f"basis of rank {basis.rank} from {len(selected)} checkpoints ({basis.dim:,} parameters) -> {output}")
        ui.info(f"max |P P^T - I| = {basis.errors['orthogonality']:.1e}")


@app.command("train-subspace")
def train_subspace(
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
    tol: Annotated[float, typer.Option(help="When SRC is a folder: near-duplicate tolerance of the orthogonalization.", rich_help_panel=SELECT)] = 1e-6,
    model: ModelOpt = None,
    data: DataOpt = None,
    data_dir: DataDir = None,
    download: Download = False,
    bn_update: Annotated[bool, typer.Option("--bn-update/--no-bn-update", help="Recompute BatchNorm statistics after training.")] = True,
    bn_batches: BnBatches = None,
    eval_every_epoch: Annotated[bool, typer.Option("--eval-every-epoch/--no-eval-every-epoch", help="Test accuracy after each epoch (BatchNorm recomputed first).")] = True,
    lr_check: Annotated[bool, typer.Option("--lr-check/--no-lr-check", help="Measure the span's sharpness first and lower an --lr too large to be stable in it (with a warning).")] = True,
    seed: Seed = 0,
    device: DeviceOpt = Device.auto,
    resume: Resume = False,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Train inside the span of the checkpoints (Algorithm 1) and write the learned average."""
    from twa_cli.subspace_training import SubspaceConfig, default_output
    from twa_cli.subspace_training import train_subspace as run

    _setup(json_out, quiet)
    data_spec = _data(data, data_dir, download)
    cfg = SubspaceConfig(
        epochs=epochs, lr=lr, schedule=schedule.value, momentum=momentum, weight_decay=weight_decay,
        batch_size=batch_size, init=init, seed=seed, device=_device(device), bn_update=bn_update,
        bn_batches=bn_batches, eval_every_epoch=eval_every_epoch, lr_check=lr_check, start=start, end=end, every=every, tol=tol,
        data=data_spec, model=_model(model, data_spec, None) if model else None,
    )
    out = output or default_output(src)
    with _interruptible(out), ui.training_progress("twa") as reporter:
        result = run(src, out, cfg, force=force, resume=resume, reporter=reporter)
    summary = {
        "output": str(result.out), "checkpoint": str(result.result), "coefficients": result.coefficients,
        "coefficient_sum": sum(result.coefficients), "dropped": result.dropped,
        "test": asdict(result.test) if result.test else None,
        "lr_check": result.lr_check.to_dict() if result.lr_check else None,
    }
    if json_out:
        ui.emit_json(summary)
    else:
        ui.info(f"wrote {result.result} (coefficients sum to {sum(result.coefficients):.3f})")
        if result.test:
            ui.table("TWA", ["checkpoints", "test acc %", "test loss"],
                     [[len(result.coefficients), result.test.accuracy, result.test.loss]])
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


# Entry point --------------------------------------------------------------------------------------------


class _interruptible:
    """Ctrl-C during training: stop cleanly and say how to continue."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool:
        if kind is KeyboardInterrupt:
            ui.error(f"interrupted; the last completed epoch is saved in {self.out}: add --resume to continue")
            raise typer.Exit(130)
        return False


def main() -> None:
    argv = sys.argv[1:]
    debug = "--debug" in argv or bool(os.environ.get("TWA_DEBUG"))
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
    try:
        app(args=argv, prog_name="twa")
    except TwaError as exc:
        if debug:
            raise
        ui.error(str(exc))
        sys.exit(1)
