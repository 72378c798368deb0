#!/usr/bin/env python
"""Block sizes of the orthogonalizer (`twa_cli.engine.orthogonalizer`), side by side in one process.

`twa orthogonalize` reads its checkpoints in blocks (`twa_cli.core.basis.block_size`) straight into the basis's
free rows, so a block costs no memory and its size is a matter of speed only: each block sweeps the basis built
so far a fixed number of times, so larger blocks sweep it less often, while the rows of one block are projected
out of each other one by one. This times adding N nearly collinear vectors of D weights (a random walk, like the
checkpoints of one run) in blocks of each given size, the sizes interleaved over the repeats so a noisy machine
hurts them alike, and prints every repeat, the fastest, and its ratio to the default rule's block size.

    PYTHONPATH=$PWD python scripts/bench_blocks.py --n 20 --dim 14700000 --blocks 2,4,5,10
"""

from __future__ import annotations

import argparse
import time

import torch

from twa_cli.core.basis import block_size
from twa_cli.engine.orthogonalizer import Orthogonalizer, orthogonality_error


def walk(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dim)
    w = torch.randn(dim, generator=g)
    for i in range(n):
        w += 1e-2 * torch.randn(dim, generator=g)
        out[i] = w
    return out


def timed(vectors: torch.Tensor, block: int) -> tuple[float, float]:
    n, dim = vectors.shape
    grower = Orthogonalizer(dim, capacity=n)
    grower.free_rows(n).fill_(0.0)  # every page touched before the clock starts, as for every block size
    started = time.perf_counter()
    for b0 in range(0, n, block):
        rows = grower.free_rows(min(block, n - b0))
        rows.copy_(vectors[b0 : b0 + rows.shape[0]])
        grower.add_block(rows)
    seconds = time.perf_counter() - started
    return seconds, orthogonality_error(grower.vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--dim", type=int, default=14_700_000)
    parser.add_argument("--blocks", default="2,4,5,10", help="block sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    blocks = sorted({int(b) for b in args.blocks.split(",")} | {block_size(args.n)})
    vectors = walk(args.n, args.dim, args.seed)
    runs: dict[int, list[float]] = {b: [] for b in blocks}
    errors: dict[int, float] = {}
    for _ in range(args.repeats):
        for b in blocks:
            seconds, errors[b] = timed(vectors, b)
            runs[b].append(seconds)
    default = block_size(args.n)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.n} vectors of {args.dim:,} weights; "
          f"default block {default}")
    print(f"{'block':>5} {'fastest s':>9} {'vs default':>10} {'max|PP^T-I|':>12}  repeats")
    for b in blocks:
        best = min(runs[b])
        print(f"{b:>5} {best:9.2f} {best / min(runs[default]):10.2f} {errors[b]:12.1e}  "
              + " ".join(f"{s:.2f}" for s in runs[b]))


if __name__ == "__main__":
    main()
