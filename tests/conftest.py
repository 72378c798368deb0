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



def run_twa(*args: object) -> tuple[int, str, str]:
    """The `twa` entry point, run in this process: (exit code, stdout, stderr)."""
    import io
    import sys
    from contextlib import redirect_stderr, redirect_stdout

    from twa_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_argv, code = sys.argv, 0
    sys.argv = ["twa", *map(str, args)]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
    return code, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict[str, object]:
    """Every file and folder under `root` with its size, modification time and content hash."""
    import hashlib

    state: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            state[rel] = "dir"
        else:
            stat = path.stat()
            state[rel] = (stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


__all__ = ["flat_trainable", "list_folder", "run_twa", "snapshot", "tiny_run", "trajectory", "write_synthetic_folder"]
