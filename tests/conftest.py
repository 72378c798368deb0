"""Shared fixtures: tiny runs on the bundled digits data, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from twa_cli.checkpoints import list_folder, load_tensors, make_metadata, save_tensors
from twa_cli.data import data_spec
from twa_cli.sampling import SampleConfig, sample


def tiny_run(out: Path, model: str = "small-cnn", epochs: int = 3, per_epoch: int = 2, seed: int = 0) -> Path:
    cfg = SampleConfig(model=model, data=data_spec("digits"), epochs=epochs, lr=0.05, batch_size=64,
                       per_epoch=per_epoch, seed=seed)
    sample(out, cfg)
    return out


@pytest.fixture(scope="session")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small-cnn on digits: 3 epochs, 2 samples per epoch, plus the initial weights (7 checkpoints)."""
    return tiny_run(tmp_path_factory.mktemp("cnn") / "ckpts")


@pytest.fixture(scope="session")
def mlp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("mlp") / "ckpts", model="mlp", epochs=2, per_epoch=3)


def flat_trainable(path: Path, names: list[str]) -> torch.Tensor:
    tensors = load_tensors(path)
    return torch.cat([tensors[n].reshape(-1).double() for n in names])


def write_synthetic_folder(folder: Path, matrix: torch.Tensor, name: str = "w") -> list[Path]:
    """One model-free checkpoint per row of `matrix` (a single tensor named `name`)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, row in enumerate(matrix):
        paths.append(save_tensors(folder / f"c{i:04d}.safetensors", {name: row.float()},
                                  make_metadata("checkpoint", step=str(i), trainable=[name])))
    return paths


def trajectory(n: int, dim: int, seed: int = 0, step: float = 1e-3) -> torch.Tensor:
    """A random walk around a common offset, like the checkpoints of one run: nearly collinear."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(dim, generator=g, dtype=torch.float64)
    steps = torch.randn(n, dim, generator=g, dtype=torch.float64) * step
    return offset + torch.cumsum(steps, dim=0)


__all__ = ["flat_trainable", "list_folder", "tiny_run", "trajectory", "write_synthetic_folder"]
