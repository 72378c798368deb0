"""What several commands do alike: pick checkpoints from a folder, resolve the task from the flags or the
files, and say where a computation runs."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twa_cli.core.selection import Selection, select_checkpoints
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import Checkpoint, Layout, check_compatible, list_folder
from twa_cli.io.readers import ReadOptions
from twa_cli.tasks.base import Task
from twa_cli.tasks.resolve import Recorded, TaskRequest, resolve_task

log = logging.getLogger("twa")


def pick(folder: str | Path, selection: Selection = Selection(), read: ReadOptions = ReadOptions()) -> list[Checkpoint]:
    """The checkpoints of a folder (or one file) that the selection flags choose, in training order."""
    return select_checkpoints(list_folder(folder, read), selection)


def recorded(ckpt: Checkpoint) -> Recorded:
    """What a checkpoint's metadata says about its task."""
    return Recorded.of(ckpt.path, {key: ckpt.json_field(key) for key in ("arch", "data", "task")})


def recorded_json(source: Any, meta: Mapping[str, Any]) -> Recorded:
    return Recorded.of(source, meta)


def knows_task(request: TaskRequest, ckpt: Checkpoint) -> bool:
    """Whether a task can be resolved for these checkpoints without asking the user for more."""
    return request.task is not None or request.model is not None or "arch" in ckpt.meta


def task_of(request: TaskRequest, ckpt: Checkpoint, *, need_data: bool = True) -> Task:
    return resolve_task(request, recorded(ckpt), need_data=need_data)


def compatible(ckpts: list[Checkpoint]) -> Layout:
    """The checkpoints' shared layout; a warning when they store a tensor in different precisions."""
    layout = check_compatible(ckpts)
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


def subspace_names(request: TaskRequest, ckpt: Checkpoint, shapes: Mapping[str, tuple[int, ...]]) -> list[str] | None:
    """The tensors that span the subspace: the trainable parameters the checkpoint records, else those of the
    model the flags or the metadata name, else None (every floating tensor)."""
    from twa_cli.tasks.models import check_fits, trainable_names

    if request.model is None and request.task is None and ckpt.trainable is not None:
        return ckpt.trainable
    if not knows_task(request, ckpt):
        return None
    net = task_of(request, ckpt, need_data=False).build_model()
    check_fits(net, shapes, str(ckpt.path))
    return trainable_names(net)


def described(request: TaskRequest, ckpt: Checkpoint) -> dict[str, Any]:
    """What a file made from these checkpoints records about their task: the flags' task where they name one,
    else what the checkpoint itself recorded."""
    rec = recorded(ckpt)
    out = {k: v for k, v in (("arch", rec.arch), ("data", rec.data), ("task", rec.task)) if v is not None}
    if request.task is not None or request.model is not None or (request.data is not None and "arch" in out):
        out.update(task_of(request, ckpt, need_data=False).describe())
    elif request.data is not None:
        from twa_cli.tasks.images import data_spec

        out["data"] = data_spec(request.data, request.data_dir, request.val_split)
    return out
