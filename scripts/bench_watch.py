#!/usr/bin/env python
"""`twa watch` against rebuilding: what following a run costs when the basis grows, against a job that reruns
`twa orthogonalize` over every checkpoint so far each time it wants an up-to-date basis.

Synthetic model-free checkpoints (one fp32 tensor of --dim weights each, a random walk like a run's) arrive one at
a time. Both sides see the same arrivals and produce the basis of every checkpoint so far after each --every of
them, in one process, alternating which goes first round by round (a noisy machine slows both alike):

- watch: `twa_cli.watch` (model-free: each round writes the basis; SWA after each look), one look per arrival;
- rebuild: `twa_cli.orthogonalize` of the whole folder after each --every arrivals.

Printed: the seconds of each side (median over --rounds), their ratio, and the spans' agreement (max distance of
the watch's rows from the rebuilt span: 0 means the same subspace).

    PYTHONPATH=$PWD python scripts/bench_watch.py                             # 24 checkpoints of 2M weights
    PYTHONPATH=$PWD python scripts/bench_watch.py --n 40 --dim 10000000 --threads 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import trajectory, write_synthetic_folder

from twa_cli.commands.orthogonalize import orthogonalize
from twa_cli.commands.watch import BASIS_FILE, WatchRequest, watch
from twa_cli.core.basis_files import load_basis


def with_watch(src: list[Path], work: Path, every: int) -> float:
    run = work / "run"
    run.mkdir()
    queue = list(src)

    def arrive(_seconds: float) -> None:
        if queue:
            shutil.copy(queue.pop(0), run)

    arrive(0)
    started = time.perf_counter()
    watch(run, work / "out", WatchRequest(every=every, interval=1e-3, settle=0, polls=2 * len(src) + 1), sleep=arrive)
    return time.perf_counter() - started


def with_rebuild(src: list[Path], work: Path, every: int) -> float:
    run = work / "run"
    run.mkdir()
    seconds = 0.0
    for i, path in enumerate(src, 1):
        shutil.copy(path, run)
        if i % every == 0 or i == len(src):
            started = time.perf_counter()
            orthogonalize(run, work / "basis.safetensors", force=True)
            seconds += time.perf_counter() - started
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=24, help="checkpoints")
    p.add_argument("--dim", type=int, default=2_000_000, help="weights per checkpoint")
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {"watch": [], "rebuild": []}
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        root = Path(tmp)
        src = write_synthetic_folder(root / "src", trajectory(args.n, args.dim, step=1e-2))
        for r in range(args.rounds):
            order = ("watch", "rebuild") if r % 2 == 0 else ("rebuild", "watch")
            for side in order:
                work = root / f"{side}-{r}"
                work.mkdir()
                fn = with_watch if side == "watch" else with_rebuild
                times[side].append(fn(src, work, args.every))
        last = args.rounds - 1
        watched = load_basis(root / f"watch-{last}" / "out" / BASIS_FILE).vectors.double()
        rebuilt = load_basis(root / f"rebuild-{last}" / "basis.safetensors").vectors.double()
        distance = float((watched - (watched @ rebuilt.T) @ rebuilt).norm(dim=1).max())
    w, b = statistics.median(times["watch"]), statistics.median(times["rebuild"])
    print(f"torch {torch.__version__}, {args.threads} threads; {args.n} checkpoints of {args.dim:,} fp32 weights, "
          f"a basis every {args.every}; median of {args.rounds} rounds")
    print(f"watch (grows the basis, SWA after each checkpoint)  {w:8.2f} s   rounds: "
          + " ".join(f"{t:.2f}" for t in times["watch"]))
    print(f"rebuild (orthogonalize everything each time)        {b:8.2f} s   rounds: "
          + " ".join(f"{t:.2f}" for t in times["rebuild"]))
    print(f"ratio watch / rebuild {w / b:.3f}; rank {watched.shape[0]} vs {rebuilt.shape[0]}; max distance of the "
          f"watch's rows from the rebuilt span {distance:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
