"""A run of TinyClassifier with twa's Lightning callback under the real Trainer, on `devices` CPU processes
(strategy "ddp", gloo, which starts the other processes by running this script again); each process saves the
model it ends with and the callback's coefficients to OUT/rank<R>.pt. Used by tests/test_inloop_lightning.py.

    python tests/lightning_ddp_run.py OUT DEVICES [alone]

`alone`: each process fits on its own batches only (`TWA.fit(parallel=False)`), to show what the default avoids.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import realtools
import torch
from helpers import exit_once_every_rank_has_saved
from torch.utils.data import DataLoader

from twa_cli.integrations.lightning import TWACallback


def main(out: Path, devices: int, alone: bool) -> None:
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    train, _ = realtools.lightning_data()
    module = realtools._tiny_classifier_class()(lr=0.1)
    callback = TWACallback(fit_options={"epochs": 2, "lr": 0.5, **({"parallel": False} if alone else {})})
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, DataLoader(train, batch_size=16 // devices, shuffle=False))
    torch.save({"state": module.state_dict(), "coefficients": callback.result.coefficients,
                "count": callback.twa.count}, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] == ["alone"])
    exit_once_every_rank_has_saved()
