"""One subspace step with the basis sharded by columns (what twa does) against by rows, side by side.

Starts WORLD processes on gloo over loopback (CPU). Each repetition times both steps in turn, so machine noise
hits both alike; prints the median times and their ratio, and the bytes each rank sends per step.

    python scripts/bench_distributed.py --dim 4000000 --rank 32 --world 2 --repeats 20

Columns: twa's own SubspaceSGD.step on a ColumnShard: sum g (on gloo an all-reduce, its reduce-scatter being slower),
         c_r = P_r g_r (n x D/N), all-reduce c (n), w_r = P_r^T a, all-gather w.
Rows:    all-reduce g (DistributedDataParallel's), c_r = P_r g (n/N x D), all-gather c, P_r^T c_r (D),
         all-reduce of the D-sized partial sums.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _row_step(p: torch.Tensor, g: torch.Tensor, w: torch.Tensor, c_r: torch.Tensor, c: torch.Tensor) -> None:
    dist.all_reduce(g)
    torch.mv(p, g, out=c_r)
    dist.all_gather_into_tensor(c, c_r)
    torch.mv(p.t(), c_r, out=w)
    dist.all_reduce(w)


def _worker(rank: int, world: int, port: int, dim: int, n: int, repeats: int) -> None:
    from twa_cli.core.placement import ColumnShard, ColumnShards
    from twa_cli.engine.subspace import FlatParameters, SubspaceSGD

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = ColumnShards(rank, world, "gloo", "cpu")
    model = torch.nn.Linear(1000, dim // 1000, bias=False)
    flat = FlatParameters(model, ["weight"], multiple_of=world)
    width = flat.params.numel() // world
    p_cols = torch.randn(n, width) / width**0.5  # this rank's columns, as twa holds them
    optimizer = SubspaceSGD(flat, ColumnShard(p_cols, flat, group), torch.zeros(n), lr=1e-3)
    g, w = torch.randn(width * world), torch.empty(width * world)
    p_rows = torch.randn(n // world, width * world)  # this rank's rows, for the alternative
    c, c_r = torch.empty(n), torch.empty(n // world)
    g_r = torch.empty(width)
    times: dict[str, list[float]] = {"columns": [], "rows": [], "all-reduce": [], "reduce-scatter": []}
    for i in range(repeats + 2):
        for name in times:
            flat.grads.normal_()
            dist.barrier()
            start = time.perf_counter()
            if name == "columns":
                optimizer.step()
            elif name == "rows":
                _row_step(p_rows, g, w, c_r, c)
            elif name == "all-reduce":
                dist.all_reduce(g)
            else:
                dist.reduce_scatter_tensor(g_r, g)
            dist.barrier()
            if i >= 2:  # the first two warm up the connections
                times[name].append(time.perf_counter() - start)
    if rank == 0:
        col, row = statistics.median(times["columns"]), statistics.median(times["rows"])
        sent = 4 * width * (world - 1)
        print(f"D={dim:,} n={n} N={world} (gloo, loopback, CPU), median of {repeats}:")
        print(f"  columns (twa's SubspaceSGD.step on a ColumnShard): {col * 1e3:8.2f} ms/step")
        print(f"  rows (all-reduce g, all-reduce D):    {row * 1e3:8.2f} ms/step")
        print(f"  rows / columns: {row / col:.2f}x")
        print(f"  the gradient alone: all-reduce {statistics.median(times['all-reduce']) * 1e3:.2f} ms, "
              f"reduce-scatter {statistics.median(times['reduce-scatter']) * 1e3:.2f} ms")
        print(f"  bytes each rank sends with a ring, nccl: columns {2 * sent / 2**20:.1f} MiB "
              f"(reduce-scatter + all-gather), rows {4 * sent / 2**20:.1f} MiB (two all-reduces)")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=4_000_000)
    parser.add_argument("--rank", type=int, default=32, help="n, the number of basis vectors")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args.world, port, args.dim, args.rank, args.repeats), nprocs=args.world)


if __name__ == "__main__":
    main()
