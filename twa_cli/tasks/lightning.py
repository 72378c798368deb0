"""A LightningModule as a task: its own `training_step` is the loss, the Trainer's loop taken out.

The class is the user's (`--model package.module:Class`, a LightningModule subclass), built with the
hyper-parameters its checkpoints saved (as `load_from_checkpoint` does). The data is the user's too: `--data
package.module:function` returning (train_set, test_set), or (train_set, val_set, test_set), whose items the
module's `training_step` takes once collated (default collation, as a DataLoader would). The figure is the mean
of `training_step`'s loss per example, in eval mode; `self.log` calls, which need a Trainer, are let pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from twa_cli.errors import TwaError
from twa_cli.tasks.base import Batch, Task
from twa_cli.tasks.hooks import accepted_kwargs, call_hook, hook_splits, import_callable
from twa_cli.units import first_line


def is_lightning_module(cls: Any) -> bool:
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl  # type: ignore[no-redef]
        except ImportError:
            return False
    return isinstance(cls, type) and issubclass(cls, pl.LightningModule)


class LightningTask(Task):
    def __init__(self, name: str, hparams: Mapping[str, Any] | None, data: str | None, data_dir: str | None):
        self.name = name
        self.cls = import_callable(name, "--model")
        self.hparams = dict(hparams or {})
        self.data_name = data
        self.data_dir = data_dir

    @property
    def has_data(self) -> bool:
        return self.data_name is not None

    def build_model(self) -> nn.Module:
        kwargs = accepted_kwargs(self.cls, self.hparams)
        return call_hook(self.cls, self.name, "--model", "build the LightningModule from its saved hyper-parameters",
                         **kwargs)

    @cached_property
    def _splits(self) -> dict[str, Dataset]:
        if self.data_name is None:
            raise TwaError(f"--model {self.name}: which data does it learn from? pass --data package.module:function "
                           "returning (train_set, test_set)")
        factory = import_callable(self.data_name, "--data")
        args = (self.data_dir,) if self.data_dir is not None else ()
        train, val, test = hook_splits(factory, self.data_name, args)
        return {"train": train, "val": val, "test": test}

    def dataset(self, split: str, *, augment: bool) -> Dataset | None:
        return self._splits.get(split)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log() without a Trainer
            try:
                out = model.training_step(batch, 0)  # type: ignore[operator]
            except TwaError:
                raise
            except Exception as exc:
                raise TwaError(f"--model {self.name}: training_step raised {type(exc).__name__} "
                               f"({first_line(exc)})") from exc
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
            raise TwaError(f"--model {self.name}: training_step returned {type(out).__name__}, not a scalar loss "
                           "(or a dict with 'loss')")
        return loss

    def export(self, state: Mapping[str, torch.Tensor], folder: Any) -> list[Any]:
        """`twa.ckpt`, which `Class.load_from_checkpoint` reads: the weights and the hyper-parameters."""
        from pathlib import Path

        import lightning

        from twa_cli.io.atomic import atomic_file

        path = Path(folder) / "twa.ckpt"
        with atomic_file(path) as fh:
            torch.save({"state_dict": dict(state), "hyper_parameters": self.hparams,
                        "pytorch-lightning_version": lightning.__version__}, fh)
        return [path]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"arch": {"name": self.name, "kwargs": self.hparams}}
        if self.data_name is not None:
            out["data"] = {"name": self.data_name, **({"dir": self.data_dir} if self.data_dir else {})}
        return out
