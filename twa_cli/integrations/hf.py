"""`TWACallback` for the Hugging Face `transformers.Trainer`.

    from twa_cli.integrations.hf import TWACallback

    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[TWACallback(fit_at=0.5, stop=True)])
    trainer.train()          # trains half the steps, then TWA in the span of the weights seen; stops there

Weights join the basis every `every_steps` optimizer steps (default: the steps the Trainer saves a checkpoint
at when it saves by steps, else each epoch's end). Once `fit_at` of `max_steps` is reached the callback trains in
their span (`twa_cli.TWA.fit`, the paper's Algorithm 1) on the Trainer's training batches with the model's own
loss (`model(**batch).loss`, as `Trainer.compute_loss`), unless `data` and `loss` say otherwise; the result is
left in the Trainer's model and a checkpoint is saved right after it. With `stop` the run ends there. Under DDP
(torchrun) the processes fit together, each on its part of the batches, and end with the same model.

Each checkpoint folder the Trainer writes gets `twa_basis.pt` (the basis, its coordinates and the averaged
buffers; `torch.load(weights_only=True)` reads it), and a run resumed from such a folder of its output_dir
(`trainer.train(resume_from_checkpoint=...)`) goes on adding to the basis it holds.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from twa_cli.engine import TWA, FitResult
from twa_cli.errors import TwaError

STATE_FILE = "twa_basis.pt"


def model_loss(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The loss a Hugging Face model returns for a batch that carries its labels."""
    return model(**batch).loss


class TWACallback(TrainerCallback):
    """See the module docstring. `fit_options`: keyword arguments of `TWA.fit` (epochs, lr, schedule, momentum,
    weight_decay, seed, bn_loader, bn_batches). `basis_device`: where the basis lives (default: the model's);
    `allocate`: its storage instead (`twa_cli.MappedRows(folder)`: a file mapped into memory)."""

    def __init__(self, *, every_steps: int | None = None, fit_at: float = 1.0, stop: bool = False,
                 loss: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None, data: Iterable[Any] | None = None,
                 fit_options: Mapping[str, Any] | None = None, tol: float = 1e-6,
                 basis_device: torch.device | str | None = None,
                 allocate: Callable[[int, int], torch.Tensor] | None = None):
        if not 0.0 < fit_at <= 1.0:
            raise TwaError(f"fit_at is the fraction of the training after which TWA trains, in (0, 1] (got {fit_at})")
        if every_steps is not None and every_steps < 1:
            raise TwaError(f"every_steps must be at least 1 (got {every_steps})")
        self.every_steps, self.fit_at, self.stop = every_steps, fit_at, stop
        self.loss, self.data, self.fit_options = loss or model_loss, data, dict(fit_options or {})
        self.tol, self.basis_device, self.allocate = tol, basis_device, allocate
        self.twa: TWA | None = None
        self.result: FitResult | None = None

    # ------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                       **kwargs: Any) -> None:
        every = self._every(args, state)
        capacity = max(1, state.max_steps // every) if every else max(1, math.ceil(args.num_train_epochs))
        self.twa = TWA(model, tol=self.tol, capacity=capacity, device=self.basis_device,
                       allocate=self.allocate)
        if state.global_step == 0:
            return
        # Resumed: go on with the basis the checkpoint of this step holds, in the run's folder (or the one the
        # arguments name).
        folders = [os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), args.resume_from_checkpoint]
        saved = next((os.path.join(f, STATE_FILE) for f in folders
                      if isinstance(f, str) and os.path.isfile(os.path.join(f, STATE_FILE))), None)
        if saved is None:
            warnings.warn(f"TWACallback: resumed at step {state.global_step} without its {STATE_FILE} in "
                          f"{folders[0]}: the basis holds only the weights from here on", stacklevel=2)
            return
        self.twa.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))

    def on_step_end(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                    train_dataloader: Iterable[Any] | None = None, **kwargs: Any) -> None:
        if self.result is not None:
            return
        every = self._every(args, state)
        if every and state.global_step % every == 0:
            self.twa.add(model)  # type: ignore[union-attr]
        if state.global_step >= max(1, round(self.fit_at * state.max_steps)):
            self._fit(model, train_dataloader, args, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                     **kwargs: Any) -> None:
        if self.result is None and not self._every(args, state):
            self.twa.add(model)  # type: ignore[union-attr]

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self.twa is not None and self.twa.count and os.path.isdir(folder) and args.process_index == 0:
            _save(self.twa.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_end(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                     train_dataloader: Iterable[Any] | None = None, **kwargs: Any) -> None:
        if self.result is None and self.twa is not None and self.twa.count:  # stopped before `fit_at`
            self._fit(model, train_dataloader, args, None)

    # ------------------------------------------------------------------------------------------- helpers
    def _every(self, args: Any, state: Any) -> int | None:
        """Steps between weights joining the basis, or None: at each epoch's end."""
        if self.every_steps is not None:
            return self.every_steps
        if getattr(args.save_strategy, "value", args.save_strategy) != "steps":
            return None
        steps = args.save_steps
        return math.ceil(state.max_steps * steps) if steps < 1 else int(steps)

    def _fit(self, model: torch.nn.Module, loader: Iterable[Any] | None, args: Any, control: Any) -> None:
        data = self.data if self.data is not None else loader
        if data is None:
            raise TwaError("TWACallback: the Trainer has no training DataLoader to fit on; pass data=")
        # Under DDP every process holds the model and its part of the batches: they fit together.
        options = {"parallel": args.world_size > 1, **self.fit_options}
        self.result = self.twa.fit(model, data, self.loss, **options)  # type: ignore[union-attr]
        if control is not None:
            if getattr(args.save_strategy, "value", args.save_strategy) != "no":
                control.should_save = True  # the result, and the basis beside it, where the Trainer saves
            control.should_training_stop = control.should_training_stop or self.stop


def _save(state: dict[str, Any], path: str) -> None:
    """Written whole or not at all: a temporary file beside it, then renamed over."""
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{STATE_FILE}.")
    try:
        with os.fdopen(handle, "wb") as fh:
            torch.save(state, fh)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
