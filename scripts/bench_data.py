#!/usr/bin/env python
"""The data path of a large image folder: one epoch of augmented training batches loaded on the main thread
(workers=0, as before) against worker processes (the default), side by side, alone and under a training step.

Writes --images random JPEGs of --size x --size pixels into an ImageNet-like folder (train/ and test/, 4 classes)
under --workdir, resolves twa's own task for it (small-cnn, `--data imagefolder`, crop-flip augmentation: decode,
resize to 256, crop 224, flip, as the PyTorch ImageNet example), then times, alternating round after round:

- loading: iterating the epoch's batches and nothing else;
- training: the same, with a forward and backward pass of the small CNN and an SGD step on every batch, so the
  workers decode while the main process trains.

Prints the median seconds of each and the ratio of the main-thread time to the workers' time, and checks that
both gave the same batches (the augmentation does not depend on the number of workers).

    PYTHONPATH=$PWD python scripts/bench_data.py --images 256 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from twa_cli.core.batching import batches, default_workers
from twa_cli.tasks.resolve import TaskRequest, resolve_task


def write_folder(root: Path, images: int, size: int) -> None:
    if (root / "done").exists():
        return
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("test", 8)):
        for i in range(count):
            folder = root / split / f"class{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    (root / "done").write_text("")


def epoch(task, dataset, model, optimizer, workers: int, train: bool) -> tuple[float, list[torch.Tensor]]:
    started = time.perf_counter()
    firsts = []
    for (x, y), _ in batches(task, dataset, 32, shuffle=True, seed=0, epoch=1, workers=workers):
        firsts.append(x[0, 0, :2, :2].clone())
        if train:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return time.perf_counter() - started, firsts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="default: twa's own choice for this machine")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/twa-bench-data"))
    args = p.parse_args()
    write_folder(args.workdir, args.images, args.size)
    request = TaskRequest(model="small-cnn", data="imagefolder", data_dir=str(args.workdir), augment="crop-flip")
    task = resolve_task(request)
    dataset = task.split("train", augment=True)
    model = task.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    workers = default_workers() if args.workers is None else args.workers
    times: dict[str, list[float]] = {}
    same = True
    for r in range(args.rounds):
        for train in (False, True):
            order = [0, workers] if r % 2 == 0 else [workers, 0]
            got = {}
            for w in order:
                seconds, got[w] = epoch(task, dataset, model, optimizer, w, train)
                times.setdefault(f"{'training' if train else 'loading'} w={w}", []).append(seconds)
            same &= all(torch.equal(a, b) for a, b in zip(got[0], got[workers], strict=True))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.images} JPEGs of {args.size}px, "
          f"batch 32, {workers} workers (default here: {default_workers()}); median of {args.rounds} rounds")
    for kind in ("loading", "training"):
        alone, ahead = statistics.median(times[f"{kind} w=0"]), statistics.median(times[f"{kind} w={workers}"])
        print(f"  {kind:8s}: main thread {alone:6.2f} s, {workers} workers {ahead:6.2f} s, "
              f"main thread / workers {alone / ahead:.2f}x")
    print(f"  the same batches with and without workers: {same}")


if __name__ == "__main__":
    main()
