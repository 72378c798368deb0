""""The flag, else the checkpoint's metadata", written once: which Task a command runs.

The user's flags (or a Python caller's arguments) may name their own code (`--model`, `--data`, `--task` as
`package.module:callable`). What a file records (a checkpoint's or a basis's metadata, a shard index, a
result read by `--config-from`) may only name registry entries: a callable found there is refused in one
line naming the file and the flag that would run it, before anything is imported. A file never switches on a
download either: that is the user's `--download` alone.

Registries, looked up by name and never importing what a name says: the tool's own architectures and image
sets, `torchvision:<name>`, `timm:<name>`, and the transformers class a Hugging Face checkpoint's `config.json`
names (or `hf:AutoModelFor...`), built from that config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twa_cli.errors import TwaError
from twa_cli.tasks.base import Task
from twa_cli.tasks.hooks import call_hook, import_callable, is_code_name
from twa_cli.tasks.models import timm_knows


@dataclass(frozen=True)
class TaskRequest:
    """What the user said about the model and the data; every field may be left to the checkpoints."""

    model: str | None = None
    data: str | None = None
    data_dir: str | None = None
    download: bool = False
    val_split: float = 0.0
    task: str | None = None
    # Text data for Hugging Face models (twa_cli.tasks.text)
    eval_data: str | None = None
    val_data: str | None = None  # validation data the run did not train on: what train-subspace selects on
    text_column: str | None = None
    label_column: str | None = None
    block_size: int | None = None
    tokenizer: str | None = None
    # Image data: the view of the images training saw (twa_cli.tasks.images.stated_views); None: as recorded.
    augment: str | None = None
    normalize: str | None = None

    def __post_init__(self) -> None:
        if self.val_data is not None and self.val_split:
            raise TwaError("--val-data and --val-split both name a validation split; give one of them")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


VAL_DATA_TEXT_ONLY = ("--val-data: a validation file is for text data (Hugging Face models); an image folder takes "
                      "its validation images from DIR/val/ beside DIR/test/, a --data hook returns (train, val, test)")


@dataclass(frozen=True)
class Recorded:
    """What a file says about the task that made it (JSON from its metadata), and which file that is.
    `model_dir`: the folder with the Hugging Face `config.json` beside the checkpoint; `shapes`: its tensors'."""

    source: str
    arch: Any = None
    data: Any = None
    task: Any = None
    hf: Any = None
    timm_arch: str | None = None
    hparams: Any = None
    model_dir: str | None = None
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    @staticmethod
    def of(source: Any, meta_json: Mapping[str, Any], **extra: Any) -> Recorded:
        keys = ("arch", "data", "task", "hf", "timm_arch", "hparams")
        return Recorded(str(source), **{k: meta_json.get(k) for k in keys}, **extra)


NOTHING = Recorded("")


def _name(spec: Any, field_name: str, source: str) -> str | None:
    if spec is None or (isinstance(spec, Mapping) and not spec):  # {}: written by 0.2 for "no data known"
        return None
    if not (isinstance(spec, Mapping) and isinstance(spec.get("name"), str)):
        raise TwaError(f"{source}: metadata field '{field_name}' is not a description with a name")
    return spec["name"]


def _refuse_code(name: str | None, what: str, flag: str, source: str) -> None:
    if name is not None and is_code_name(name):
        raise TwaError(f"{source}: its metadata names the {what} '{name}', Python code; the tool runs code only "
                       f"when you name it: repeat it as {flag} {name} if you trust it")


def resolve_task(request: TaskRequest, recorded: Recorded = NOTHING, *, need_data: bool = True) -> Task:
    """The task of a command: the user's `--task`, else the model the flags or the files name, on the data the
    flags or the files name."""
    if request.task is not None:
        _no_image_views(request, "--task")
        if request.val_data is not None:
            raise TwaError("--val-data: a --task gives its own validation split (dataset('val'))")
        return user_task(request.task)
    if request.model is None:
        _refuse_code(_name(recorded.task, "task", recorded.source), "task", "--task", recorded.source)
    model = request.model
    if model is not None and (model.startswith("hf:") or _config_folder(model) is not None):
        return _hf(request, recorded, model)
    if model is not None and is_code_name(model):
        from twa_cli.tasks.lightning import LightningTask, is_lightning_module

        if is_lightning_module(import_callable(model, "--model")):
            _no_image_views(request, "a LightningModule")
            if request.val_data is not None:
                raise TwaError(VAL_DATA_TEXT_ONLY)
            hparams = recorded.hparams if isinstance(recorded.hparams, Mapping) else {}
            return LightningTask(model, hparams, request.data, request.data_dir)
    if model is None:
        if recorded.hf is not None or (recorded.arch is None and recorded.model_dir is not None):
            return _hf(request, recorded, None)
        if recorded.arch is None and recorded.timm_arch is not None and timm_knows(recorded.timm_arch):
            return classification_task(_with_model(request, f"timm:{recorded.timm_arch}"), recorded,
                                       need_data=need_data)
    return classification_task(request, recorded, need_data=need_data)


def _with_model(request: TaskRequest, model: str) -> TaskRequest:
    return TaskRequest(**{**request.to_dict(), "model": model})


def _config_folder(value: str) -> Path | None:
    path = Path(value.removeprefix("hf:"))
    return path if (path / "config.json").is_file() else None


def _no_image_views(request: TaskRequest, what: str) -> None:
    for flag, value in (("--augment", request.augment), ("--normalize", request.normalize)):
        if value not in (None, "standard"):
            raise TwaError(f"{flag} {value}: describes the images of an image data set; {what} makes its own batches")


def _hf(request: TaskRequest, recorded: Recorded, model: str | None) -> Task:
    from twa_cli.tasks.hf import hf_task

    _no_image_views(request, "a Hugging Face model")

    auto_class, folder = None, None
    if model is not None:
        folder = _config_folder(model)
        if folder is None:
            auto_class = model.removeprefix("hf:")
    if folder is None and isinstance(recorded.hf, Mapping) and isinstance(recorded.hf.get("dir"), str):
        folder = Path(recorded.hf["dir"])
        auto_class = auto_class or recorded.hf.get("auto_class")
    if folder is None and recorded.model_dir is not None:
        folder = Path(recorded.model_dir)
    if folder is None or not (folder / "config.json").is_file():
        where = f"{recorded.source}: " if recorded.source else ""
        raise TwaError(f"{where}no config.json beside the checkpoints to build the model from; pass --model with a "
                       "folder holding one")
    return hf_task(folder, auto_class, _text_data(request, recorded))


def _text_data(request: TaskRequest, recorded: Recorded) -> dict[str, Any] | None:
    """The text a Hugging Face model learns from and is scored on: the flags, else what the checkpoint records,
    each text flag given taking the place of the recorded value. `--eval-data` or `--val-data` alone scores, with
    no training text."""
    from twa_cli.tasks.text import text_spec

    given = text_spec(request.data, request.eval_data, text_column=request.text_column,
                      label_column=request.label_column, block_size=request.block_size, tokenizer=request.tokenizer,
                      val_split=request.val_split, val_path=request.val_data)
    if request.data is not None:
        return given
    if isinstance(recorded.data, Mapping) and recorded.data.get("kind") == "text":
        data = dict(recorded.data)
        _check_recorded_fraction(data, recorded.source)
        return {**data, **given}
    if request.eval_data is None and request.val_data is None:
        return None
    if request.val_split:
        raise TwaError("--val-split carves held-out text from the training text: pass --data FILE too")
    return given


def user_task(name: str) -> Task:
    if not is_code_name(name):
        raise TwaError(f"--task {name}: expected package.module:callable returning a twa_cli.Task")
    factory = import_callable(name, "--task")
    task = call_hook(factory, name, "--task", "return a twa_cli.Task")
    if not isinstance(task, Task):
        raise TwaError(f"--task {name}: returned {type(task).__name__}, not a twa_cli.Task")
    task.hook_name = name
    return task


def data_request(request: TaskRequest, recorded: Recorded) -> tuple[dict[str, Any] | None, bool]:
    """(image data spec, named by the user): the flags, else the recorded data set, with the view training saw
    (`--augment`, `--normalize`) stated as `twa_cli.tasks.images.stated_views` says."""
    from twa_cli.tasks.images import data_spec, stated_views

    if request.data is not None:
        run = recorded.data if isinstance(recorded.data, Mapping) else None
        spec = data_spec(request.data, request.data_dir, request.val_split)
        return stated_views(spec, request.augment, request.normalize, run=run, fresh=True), True
    if request.data_dir is not None:
        raise TwaError("--data-dir needs --data to say which data set it holds")
    name = _name(recorded.data, "data", recorded.source)
    if name is None:
        if request.augment is not None or request.normalize is not None:
            raise TwaError("--augment and --normalize describe the images of a data set: pass --data too")
        return None, False
    _refuse_code(name, "data set", "--data", recorded.source)
    spec = {k: v for k, v in dict(recorded.data).items() if k != "download"}  # a file never turns on a download
    if request.val_split:
        spec["val_split"] = request.val_split
    else:
        _check_recorded_fraction(spec, recorded.source)
    return stated_views(spec, request.augment, request.normalize, fresh=False, source=recorded.source), False


def _check_recorded_fraction(spec: Mapping[str, Any], source: str | None) -> None:
    """A val_split read from a file is that file's error, not the --val-split flag's."""
    value = spec.get("val_split")
    if value is None or value == 0:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) < 1.0:
        where = f"{source}: " if source else ""
        raise TwaError(f"{where}its recorded val_split {value!r} is not a fraction between 0 and 1; pass --val-split")


def classification_task(request: TaskRequest, recorded: Recorded, *, need_data: bool = True) -> Task:
    from twa_cli.tasks.classification import ClassificationTask

    if request.val_data is not None:
        raise TwaError(VAL_DATA_TEXT_ONLY)
    data, user_data = data_request(request, recorded)
    if request.model is not None:
        if request.model.startswith("timm:") and recorded.shapes:
            arch = _timm_sized(request.model, recorded, data, user_data)
        elif data is None:
            raise TwaError(f"--model {request.model} needs --data as well, to know the number of classes and "
                           "input channels")
        else:
            arch = ClassificationTask.sized(request.model, data, user_data=user_data)
        if data is None and need_data:
            where = f"{recorded.source}: " if recorded.source else ""
            raise TwaError(f"{where}the checkpoints name no data set; pass --data")
        return ClassificationTask(arch, data or {}, user_model=True, user_data=user_data, download=request.download)
    name = _name(recorded.arch, "arch", recorded.source)
    if name is None:
        where = f"{recorded.source}: " if recorded.source else ""
        raise TwaError(f"{where}the checkpoints name no architecture; pass --model")
    _refuse_code(name, "model", "--model", recorded.source)
    if data is None and need_data:
        raise TwaError(f"{recorded.source}: the checkpoints name no data set; pass --data")
    return ClassificationTask(dict(recorded.arch), data or {}, user_model=False, user_data=user_data,
                              download=request.download, source=recorded.source)


def _timm_sized(model: str, recorded: Recorded, data: dict[str, Any] | None, user_data: bool) -> dict[str, Any]:
    """A timm model with the checkpoint's number of classes (its classifier's rows) and the data's channels."""
    from twa_cli.tasks.images import data_shape
    from twa_cli.tasks.models import timm_classifier

    head = timm_classifier(model.removeprefix("timm:"))
    weight = recorded.shapes.get(f"{head}.weight") if head else None
    channels, size = (data_shape(data, allow_code=user_data)[1:] if data else (3, 224))
    if weight is None:
        if data is None:
            raise TwaError(f"--model {model}: cannot tell its number of classes from the checkpoint; pass --data")
        classes = data_shape(data, allow_code=user_data)[0]
    else:
        classes = int(weight[0])
    return {"name": model, "kwargs": {"num_classes": classes, "in_channels": channels, "image_size": size}}
