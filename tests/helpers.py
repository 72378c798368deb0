"""Plain helpers the tests share (not a test module): tiny runs, synthetic checkpoint folders, file-system
snapshots."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from twa_cli.commands.sample import SampleConfig, sample
from twa_cli.io.checkpoints import load_tensors, make_metadata
from twa_cli.io.safetensors import save_tensors
from twa_cli.tasks.resolve import TaskRequest


def tiny_run(out: Path, model: str = "small-cnn", epochs: int = 3, per_epoch: int = 2, seed: int = 0,
             val_split: float = 0.0) -> Path:
    cfg = SampleConfig(task=TaskRequest(model=model, data="digits", val_split=val_split), epochs=epochs, lr=0.05,
                       batch_size=64, per_epoch=per_epoch, seed=seed, device="cpu")
    sample(out, cfg)
    return out


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


def snapshot(root: Path) -> dict[str, object]:
    """Every file and folder under `root` with its size, modification time and content hash, but for the empty
    lock files a run folder's lock leaves beside it (`.OUT.lock`, twa_cli.commands.runfolder: bookkeeping, no
    result)."""
    state: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.name.startswith(".") and path.name.endswith(".lock") and path.stat().st_size == 0:
            continue
        if path.is_dir():
            state[rel] = "dir"
        else:
            stat = path.stat()
            state[rel] = (stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks_of_script(script: str, folder: Path, *args: str, world: int = 2, torchrun: bool = False) -> list[dict]:
    """Run tests/SCRIPT (directly, or under torchrun on `world` CPU processes) with FOLDER and ARGS; it leaves
    FOLDER/rank<R>.pt per process, which are returned."""
    tests = Path(__file__).parent
    folder.mkdir()
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr", "127.0.0.1",
                "--master-port", str(free_port())] if torchrun else []
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, *launcher, str(tests / script), str(folder), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world)]


def exit_once_every_rank_has_saved() -> None:
    """End a process of a multi-process test job once every process has written its file: a barrier, then
    os._exit, which skips the interpreter's teardown, where gloo's threads can abort a process that has finished
    its work ("terminate called without an active exception") and fail the launcher."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
