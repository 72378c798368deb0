"""What several commands do alike: pick checkpoints from a folder, resolve the task from the flags or the
files, and say where a computation runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from twa_cli.core.selection import Selection, select_checkpoints
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import TASK_FIELDS, Checkpoint, Layout, check_compatible, list_folder, no_floating_tensor
from twa_cli.io.readers import ReadOptions, as_written
from twa_cli.tasks.base import Task
from twa_cli.tasks.resolve import Recorded, TaskRequest, resolve_task

log = logging.getLogger("twa")


def pick(folder: str | Path, selection: Selection = Selection(), read: ReadOptions = ReadOptions()) -> list[Checkpoint]:
    """The checkpoints of a folder (or one file) that the selection flags choose, in training order."""
    return select_checkpoints(list_folder(folder, read), selection)


def recorded(ckpt: Checkpoint) -> Recorded:
    """What a checkpoint's metadata (and the folder it lies in) says about its task."""
    from twa_cli.io.checkpoints import tensor_specs
    from twa_cli.tasks.hf import config_dir_of

    fields = {key: ckpt.json_field(key) for key in (*TASK_FIELDS, "hparams")}
    fields["timm_arch"] = ckpt.meta.get("timm_arch")
    folder = config_dir_of(ckpt.path)
    shapes = {k: shape for k, (shape, _) in tensor_specs(ckpt).items()}
    return Recorded.of(ckpt.path, fields, model_dir=str(folder) if folder else None, shapes=shapes)


def knows_task(request: TaskRequest, ckpt: Checkpoint) -> bool:
    """Whether a task can be resolved for these checkpoints without asking the user for more: the flags name
    one, the metadata does, or the checkpoint is a model timm or transformers knows."""
    from twa_cli.tasks.models import timm_knows

    if request.task is not None or request.model is not None or any(k in ckpt.meta for k in ("arch", "task", "hf")):
        return True
    if "timm_arch" in ckpt.meta and timm_knows(ckpt.meta["timm_arch"]):
        return True
    # Text data is for a Hugging Face model: one that cannot be built is an error, not a model-free average.
    return hf_folder(ckpt, required=request.data is not None) is not None


def hf_folder(ckpt: Checkpoint, *, required: bool = False) -> Path | None:
    """The folder of a Hugging Face checkpoint whose config.json transformers can build a model from (`required`:
    else an error saying why)."""
    from twa_cli.tasks.hf import buildable, config_dir_of

    folder = config_dir_of(ckpt.path)
    return folder if folder is not None and buildable(folder, required=required) else None


def task_of(request: TaskRequest, ckpt: Checkpoint, *, need_data: bool = True) -> Task:
    return resolve_task(request, recorded(ckpt), need_data=need_data)


def compatible(ckpts: list[Checkpoint]) -> Layout:
    """The checkpoints' shared layout; a warning when they store a tensor in different precisions."""
    layout = check_compatible(ckpts)
    if not any(dtypes[0].is_floating_point for dtypes in layout.dtypes.values()):
        raise TwaError(no_floating_tensor(ckpts[0], layout))
    if layout.mixed:
        name, dtypes = next(iter(layout.mixed.items()))
        log.warning("the checkpoints store tensors in different precisions ('%s' is %s, and %d more tensors "
                    "differ); averages are computed in fp64 and written in the widest of them unless --dtype "
                    "says otherwise", name, "/".join(sorted(set(dtypes))), len(layout.mixed) - 1)
    return layout


def resolve_device(device: str) -> str:
    """`auto`: cuda when available; `cuda` checked to be there."""
    if device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return "cuda"
        if device == "cuda":
            raise TwaError("--device cuda: no CUDA device is available")
        return "cpu"
    return device


def aligned(ckpts: list[Checkpoint], net: Any) -> list[Checkpoint]:
    """The checkpoints, read so that their tensor names are the model's. A LightningModule names its weights
    `model.<name>` like its files, where reading strips that prefix by default for a bare model: then they are
    read again without stripping; an average written without the module has lost the prefix: then it is put
    back."""
    from dataclasses import replace

    from twa_cli.io.checkpoints import read_checkpoint, tensor_specs
    from twa_cli.io.readers import AUTO_PREFIXES

    own = set(net.state_dict())
    if set(tensor_specs(ckpts[0])) <= own or ckpts[0].options.strip_prefix is not None:
        return ckpts
    for change in ({"strip_prefix": ""}, *({"add_prefix": p} for p in AUTO_PREFIXES)):
        again = [read_checkpoint(c.path, replace(c.options, **change)) for c in ckpts]
        if set(tensor_specs(again[0])) <= own:
            return again
    return ckpts


def subspace_names(request: TaskRequest, ckpts: list[Checkpoint]) -> tuple[list[str] | None, list[Checkpoint]]:
    """The tensors that span the subspace: the trainable parameters the checkpoints record, else those of the
    model the flags or the metadata name, else None (every floating tensor); and the checkpoints, read with the
    model's names."""
    from twa_cli.tasks.models import check_fits, trainable_names

    ckpt = ckpts[0]
    if request.model is None and request.task is None and ckpt.trainable is not None:
        return ckpt.trainable, ckpts
    if not knows_task(request, ckpt):
        return None, ckpts
    net = task_of(request, ckpt, need_data=False).outline_model()
    ckpts = aligned(ckpts, net)
    check_fits(net, check_compatible(ckpts).shapes, str(ckpts[0].path))
    return trainable_names(net), ckpts


def described(request: TaskRequest, ckpt: Checkpoint) -> dict[str, Any]:
    """What a file made from these checkpoints records about their task: the task the flags and the files
    resolve to where one can be resolved, else what the checkpoint itself recorded."""
    out = ckpt.task_fields()
    folder = hf_folder(ckpt) if not out else None
    if folder is not None:  # later steps (a basis, a result) rebuild the model from this config
        out["hf"] = {"dir": str(folder.resolve()), "auto_class": None}
    flags = request.task or request.model or request.data or request.augment or request.normalize
    if knows_task(request, ckpt) and (flags or not out):
        out.update(task_of(request, ckpt, need_data=False).describe())
    elif request.data is not None:
        from twa_cli.tasks.resolve import data_request

        out["data"] = data_request(request, recorded(ckpt))[0]
    return out


def check_held_out(task: Task, needs: str) -> None:
    """`needs` (what scores on the validation split: `--fit-on val`, `--greedy`) on data that, as the flags and
    the files' metadata describe it (the flag, else what the checkpoints record), holds nothing out: said before
    anything is loaded or orthogonalized. Data from the user's code may hold out its own, and is checked once
    loaded."""
    from twa_cli.tasks.hooks import is_code_name
    from twa_cli.tasks.images import has_val_folder

    data = task.describe().get("data")
    if not isinstance(data, dict) or not data or is_code_name(str(data.get("name") or "")):
        return
    if data.get("name") == "imagefolder" and has_val_folder(data.get("dir")):
        return  # DIR/val/ beside DIR/test/
    if not any(value for key, value in data.items() if key.startswith("val")):
        raise TwaError(f"{needs} needs --val-split (or checkpoints sampled with one; text: --val-data FILE)")


def data_inputs(task: Task) -> list[Path]:
    """What the task's data is read from, as the flags, else the checkpoints, name it: inputs too, which no output
    may be written into or over. An image folder's split folders (what it holds beside them is never read), text
    files or a saved dataset, a tokenizer folder; a torchvision set's files are its loader's own."""
    return _spec_paths(task.describe().get("data"))


def data_paths(request: TaskRequest, ckpt: Checkpoint | None) -> list[Path]:
    """`data_inputs` without resolving the task (no model built, no `--task` hook run, which a recorded hook would
    refuse): the paths the flags name, and those the checkpoint records when the flags name no data."""
    named = [request.val_data, request.eval_data, request.tokenizer,
             request.data if request.data and Path(request.data).exists() else None]
    if request.data_dir:
        named += [str(Path(request.data_dir) / split) for split in ("train", "val", "test")]
    paths = [Path(p) for p in named if p]
    if ckpt is not None and not (request.data or request.data_dir):
        try:
            paths += _spec_paths(ckpt.data)
        except TwaError:  # damaged metadata: the command that reads it says so
            pass
    return paths


def _spec_paths(data: Any) -> list[Path]:
    if not isinstance(data, dict):
        return []
    if data.get("name") == "imagefolder" and isinstance(data.get("dir"), str):
        return [Path(data["dir"]) / split for split in ("train", "val", "test")]
    if data.get("kind") == "text":
        return [Path(data[key]) for key in ("train", "eval", "val", "tokenizer") if isinstance(data.get(key), str)]
    return []


def check_init_file(init: str | Path | None, *, keywords: tuple[str, ...] = ()) -> None:
    """`--init FILE` names a checkpoint file that exists (`keywords`: the values that name no file), by the name
    it was written to (`NAME.safetensors` for a sharded result's index)."""
    if init is not None and str(init) not in keywords and not as_written(init).is_file():
        raise TwaError(f"--init {init}: no such checkpoint file")
