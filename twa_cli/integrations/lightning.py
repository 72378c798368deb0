"""`TWACallback` for the Lightning `Trainer`.

    from twa_cli.integrations.lightning import TWACallback

    trainer = lightning.Trainer(max_epochs=20, callbacks=[TWACallback(fit_at=0.5, stop=True)])
    trainer.fit(module, train_loader)   # 10 epochs, then TWA in the span of their weights; stops there

Weights join the basis at the end of every `every_epochs` training epochs, or every `every_steps` optimizer
steps. At the end of the epoch that completes `fit_at` of `max_epochs` the callback trains in their span
(`twa_cli.TWA.fit`, the paper's Algorithm 1) on the Trainer's training batches with the module's own
`training_step` as the loss, unless `data` and `loss` say otherwise. That happens before ModelCheckpoint saves the
epoch (Lightning runs checkpoint callbacks last), so the epoch's checkpoint holds the result, and the basis
travels in it as this callback's state (`state_dict`), from which a resumed `fit(ckpt_path=...)` goes on. With
`stop` the run ends there. Under the `ddp` strategy the processes fit together, each on its part of the batches,
and end with the same model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch

from twa_cli.engine import TWA, FitResult
from twa_cli.errors import TwaError


def training_step_loss(module: pl.LightningModule, batch: Any) -> torch.Tensor:
    """The loss the module's `training_step` returns (a tensor, or a dict's 'loss')."""
    out = module.training_step(batch, 0)
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        raise TwaError(f"{type(module).__name__}.training_step returned {type(out).__name__}, not a scalar loss "
                       "(or a dict with 'loss')")
    return loss


class TWACallback(pl.Callback):
    """See the module docstring. `fit_options`: keyword arguments of `TWA.fit` (epochs, lr, schedule, momentum,
    weight_decay, seed, bn_loader, bn_batches). `basis_device`: where the basis lives (default: the module's);
    `allocate`: its storage instead (`twa_cli.MappedRows(folder)`: a file mapped into memory)."""

    def __init__(self, *, every_epochs: int | None = 1, every_steps: int | None = None, fit_at: float = 1.0,
                 stop: bool = False, loss: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
                 data: Iterable[Any] | None = None, fit_options: Mapping[str, Any] | None = None, tol: float = 1e-6,
                 basis_device: torch.device | str | None = None,
                 allocate: Callable[[int, int], torch.Tensor] | None = None):
        if not 0.0 < fit_at <= 1.0:
            raise TwaError(f"fit_at is the fraction of the training after which TWA trains, in (0, 1] (got {fit_at})")
        if (every_epochs is None) == (every_steps is None):
            raise TwaError("give one of every_epochs and every_steps")
        self.every_epochs, self.every_steps, self.fit_at, self.stop = every_epochs, every_steps, fit_at, stop
        self.loss, self.data, self.fit_options = loss or training_step_loss, data, dict(fit_options or {})
        self.tol, self.basis_device, self.allocate = tol, basis_device, allocate
        self.twa: TWA | None = None
        self.result: FitResult | None = None
        self._saved: dict[str, Any] | None = None  # a checkpoint's state, until the module is there to take it
        self._last_added_step = -1

    # ------------------------------------------------------------------------------------------- events
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs = max(1, trainer.max_epochs or 1)
        capacity = epochs // self.every_epochs if self.every_epochs else max(1, trainer.estimated_stepping_batches
                                                                            // self.every_steps)
        self.twa = TWA(pl_module, tol=self.tol, capacity=max(1, int(capacity)), device=self.basis_device,
                       allocate=self.allocate)
        if self._saved is not None:
            self.twa.load_state_dict(self._saved["basis"])
            self._saved = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.result is None and self.every_steps and step % self.every_steps == 0 and step != self._last_added_step:
            self._last_added_step = step  # once per optimizer step, however many batches it accumulates
            self.twa.add(pl_module)  # type: ignore[union-attr]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.result is not None:
            return
        done = trainer.current_epoch + 1
        if self.every_epochs and done % self.every_epochs == 0:
            self.twa.add(pl_module)  # type: ignore[union-attr]
        if done >= max(1, round(self.fit_at * (trainer.max_epochs or done))):
            self._fit(trainer, pl_module)
            trainer.should_stop = trainer.should_stop or self.stop

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.result is None and self.twa is not None and self.twa.count:  # stopped before `fit_at`
            self._fit(trainer, pl_module)

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"basis": self.twa.state_dict() if self.twa is not None else None, "fitted": self.result is not None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("basis") is not None:
            self._saved = state_dict

    # ------------------------------------------------------------------------------------------- helpers
    def _fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = self.data if self.data is not None else trainer.train_dataloader
        if data is None:
            raise TwaError("TWACallback: the Trainer has no training DataLoader to fit on; pass data=")
        with _outside_the_loop(pl_module):
            # Under DDP every process holds the module and its part of the batches: they fit together.
            options = {"parallel": trainer.world_size > 1, **self.fit_options}
            self.result = self.twa.fit(pl_module, data, self.loss, **options)  # type: ignore[union-attr]


@contextmanager
def _outside_the_loop(module: pl.LightningModule) -> Iterator[None]:
    """`training_step` run by the fit, not by the Trainer: its `self.log` calls are let pass (Lightning then only
    warns) instead of landing in the run's metrics or failing in a hook that may not log."""
    trainer = module._trainer
    module._trainer = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")
            yield
    finally:
        module._trainer = trainer


