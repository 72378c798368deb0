""""The flag, else the checkpoint's metadata", written once: which Task a command runs.

The user's flags (or a Python caller's arguments) may name their own code (`--model`, `--data`, `--task` as
`package.module:callable`). What a file records (a checkpoint's or a basis's metadata, a shard index, a
result read by `--config-from`) may only name registry entries: a callable found there is refused in one
line naming the file and the flag that would run it, before anything is imported. A file never switches on a
download either: that is the user's `--download` alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twa_cli.errors import TwaError
from twa_cli.tasks.base import Task
from twa_cli.tasks.hooks import call_hook, import_callable, is_code_name


@dataclass(frozen=True)
class TaskRequest:
    """What the user said about the model and the data; every field may be left to the checkpoints."""

    model: str | None = None
    data: str | None = None
    data_dir: str | None = None
    download: bool = False
    val_split: float = 0.0
    task: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Recorded:
    """What a file says about the task that made it (JSON from its metadata), and which file that is."""

    source: str
    arch: Any = None
    data: Any = None
    task: Any = None

    @staticmethod
    def of(source: Any, meta_json: Mapping[str, Any]) -> Recorded:
        return Recorded(str(source), meta_json.get("arch"), meta_json.get("data"), meta_json.get("task"))


NOTHING = Recorded("")


def _name(spec: Any, field: str, source: str) -> str | None:
    if spec is None:
        return None
    if not (isinstance(spec, Mapping) and isinstance(spec.get("name"), str)):
        raise TwaError(f"{source}: metadata field '{field}' is not a description with a name")
    return spec["name"]


def _refuse_code(name: str | None, field: str, flag: str, source: str) -> None:
    if name is not None and is_code_name(name):
        raise TwaError(f"{source}: its metadata names the {field} '{name}', Python code; the tool runs code only "
                       f"when you name it: repeat it as {flag} {name} if you trust it")


def resolve_task(request: TaskRequest, recorded: Recorded = NOTHING, *, need_data: bool = True) -> Task:
    """The task of a command: the user's `--task`, else a classifier of the model and data the flags name,
    each falling back to what the file records."""
    if request.task is not None:
        return user_task(request.task)
    task_name = _name(recorded.task, "task", recorded.source)
    if task_name is not None and request.model is None:
        _refuse_code(task_name, "task", "--task", recorded.source)
    return classification_task(request, recorded, need_data=need_data)


def user_task(name: str) -> Task:
    if not is_code_name(name):
        raise TwaError(f"--task {name}: expected package.module:callable returning a twa_cli.Task")
    factory = import_callable(name, "--task")
    task = call_hook(factory, name, "--task", "return a twa_cli.Task")
    if not isinstance(task, Task):
        raise TwaError(f"--task {name}: returned {type(task).__name__}, not a twa_cli.Task")
    task.hook_name = name  # type: ignore[attr-defined]
    return task


def data_request(request: TaskRequest, recorded: Recorded) -> tuple[dict[str, Any] | None, bool]:
    """(data spec, named by the user)."""
    from twa_cli.tasks.images import data_spec

    if request.data is not None:
        return data_spec(request.data, request.data_dir, request.val_split), True
    if request.data_dir is not None:
        raise TwaError("--data-dir needs --data to say which data set it holds")
    name = _name(recorded.data, "data", recorded.source)
    if name is None:
        return None, False
    _refuse_code(name, "data set", "--data", recorded.source)
    spec = {k: v for k, v in dict(recorded.data).items() if k != "download"}  # a file never turns on a download
    if request.val_split:
        spec["val_split"] = request.val_split
    return spec, False


def classification_task(request: TaskRequest, recorded: Recorded, *, need_data: bool = True) -> Task:
    from twa_cli.tasks.classification import ClassificationTask

    data, user_data = data_request(request, recorded)
    if request.model is not None:
        if data is None:
            raise TwaError(f"--model {request.model} needs --data as well, to know the number of classes and "
                           "input channels")
        arch = ClassificationTask.sized(request.model, data, user_data=user_data)
        return ClassificationTask(arch, data, user_model=True, user_data=user_data, download=request.download)
    name = _name(recorded.arch, "arch", recorded.source)
    if name is None:
        where = f"{recorded.source}: " if recorded.source else ""
        raise TwaError(f"{where}the checkpoints name no architecture; pass --model")
    _refuse_code(name, "model", "--model", recorded.source)
    if data is None and need_data:
        raise TwaError(f"{recorded.source}: the checkpoints name no data set; pass --data")
    return ClassificationTask(dict(recorded.arch), data or {}, user_model=False, user_data=user_data,
                              download=request.download)
