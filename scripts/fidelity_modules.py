"""The user code of scripts/bench_fidelity.py's Lightning and timm runs: what a user's own package would hold.

`LitMLP` is the LightningModule of the Lightning run (`--model fidelity_modules:LitMLP`) and `mnist_splits`
its data hook (`--data fidelity_modules:mnist_splits`, returning the training, validation and test sets). The
MNIST images are the 10,000 of ../shared/data/mnist-t10k, cut into fixed parts (MNIST_PARTS) that every run and
every seed share.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"
# train: what the run learns from; val: the user's validation data; dev: kept for choosing the tool's defaults
# (never reported); test: what the benchmark reports. A fixed permutation (seed 0) of the 10,000 images.
MNIST_PARTS = {"train": 5000, "val": 1000, "dev": 1000, "test": 3000}


def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the MNIST test set, in a fixed shuffled order."""
    with gzip.open(MNIST_DIR / "t10k-images-idx3-ubyte.gz", "rb") as fh:
        images = np.frombuffer(fh.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(MNIST_DIR / "t10k-labels-idx1-ubyte.gz", "rb") as fh:
        labels = np.frombuffer(fh.read(), dtype=np.uint8, offset=8).astype(np.int64)
    order = np.random.RandomState(0).permutation(len(labels))
    return images[order], labels[order]


def mnist_part(name: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = mnist_arrays()
    start = 0
    for part, size in MNIST_PARTS.items():
        if part == name:
            return images[start : start + size], labels[start : start + size]
        start += size
    raise KeyError(name)


def _tensors(name: str) -> TensorDataset:
    images, labels = mnist_part(name)
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    return TensorDataset((x - 0.1307) / 0.3081, torch.from_numpy(labels))


def mnist_splits() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """(train, val, test) as flattened, normalized TensorDatasets: the --data hook of LitMLP."""
    return _tensors("train"), _tensors("val"), _tensors("test")


def mnist_dev() -> TensorDataset:
    return _tensors("dev")


try:
    import lightning.pytorch as pl
except ImportError:  # the timm run needs only the arrays above
    pl = None

if pl is not None:

    class LitMLP(pl.LightningModule):
        """784-256-256-10 with BatchNorm and dropout, AdamW: a small image classifier as Lightning users write one."""

        def __init__(self, hidden: int = 256, lr: float = 1e-3, weight_decay: float = 1e-2, dropout: float = 0.1):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(
                nn.Linear(784, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout),
                nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout),
                nn.Linear(hidden, 10),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val_loss", F.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
