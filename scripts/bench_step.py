#!/usr/bin/env python
"""Step benchmark: a TWA training step (projected SGD, eq. 8) against a plain SGD step on the same model and batch.

Three variants are timed interleaved, round after round, in one process (a noisy machine slows them alike):
  sgd        torch.optim.SGD with momentum and weight decay, gradients set to None between steps
  twa        FlatParameters + SubspaceSGD, what `twa train-subspace` runs
  reference  the reference code's way: concatenate the gradients, project, copy them back, then SGD
Printed: median step times, their ratios to sgd, and the projection alone (c = P g and w = P^T a) in GB/s of
basis read. The basis is synthetic (orthonormal, containing the starting weights); the batch is random data
of the given image size, fixed across steps.

    PYTHONPATH=$PWD python scripts/bench_step.py                          # small-cnn, batch 128, 21 checkpoints
    PYTHONPATH=$PWD python scripts/bench_step.py --dtype bfloat16
    PYTHONPATH=$PWD python scripts/bench_step.py --device cuda --model resnet18 --checkpoints 100
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from twa_cli.engine.subspace import FlatParameters, Projector, SubspaceSGD
from twa_cli.tasks.models import build_model, model_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-5


def synthetic_basis(start: torch.Tensor, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k orthonormal rows whose span contains `start`, and the coordinates of `start` in them."""
    g = torch.Generator(device=start.device).manual_seed(seed)
    columns = torch.randn(start.numel(), k, generator=g, device=start.device)
    columns[:, 0] = start
    q, _ = torch.linalg.qr(columns)
    basis = q.t().contiguous()
    coords = basis @ start
    del q, columns
    return basis.to(dtype), coords


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Variant:
    def __init__(self, name: str, args: argparse.Namespace, device: torch.device):
        torch.manual_seed(args.seed)
        spec = model_spec(args.model, 10, 3, args.image_size)
        self.name = name
        self.model = build_model(spec).to(device).train()
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if name == "twa":
            self.flat = FlatParameters(self.model, self.names)
            self.basis, coords = synthetic_basis(self.flat.params.detach(), args.checkpoints,
                                                 DTYPES[args.dtype], args.seed)
            self.optimizer: torch.optim.Optimizer = SubspaceSGD(
                self.flat, self.basis, coords, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
            if name == "reference":
                flat = torch.cat([p.detach().reshape(-1) for p in params])
                self.basis, _ = synthetic_basis(flat, args.checkpoints, torch.float32, args.seed)
                self.params = params

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=self.name != "twa")
        loss.backward()
        if self.name == "reference":
            # The reference code's projection: a new vector per step, projected, copied back tensor by tensor.
            grad = torch.cat([p.grad.reshape(-1) for p in self.params])
            grad = self.basis.t() @ (self.basis @ grad)
            offset = 0
            for p in self.params:
                p.grad.copy_(grad[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        self.optimizer.step()


def time_steps(variant: Variant, x: torch.Tensor, y: torch.Tensor, steps: int, device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        variant.step(x, y)
    sync(device)
    return (time.perf_counter() - started) / steps


def time_projection(projection: Projector, flat: FlatParameters, coords: torch.Tensor, repeats: int,
                    device: torch.device) -> float:
    out = torch.empty_like(coords)
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        projection.coords_of(flat.grads, out)
        projection.point_of(coords, flat.params)
    sync(device)
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small-cnn")
    parser.add_argument("--checkpoints", type=int, default=21, help="rows of the synthetic basis")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32, help="CIFAR-size inputs by default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="precision of the stored basis")
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = [Variant(name, args, device) for name in ("sgd", "twa", "reference")]
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    for v in variants:  # warm-up: allocator, kernels, momentum buffers
        time_steps(v, x, y, 3, device)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            times[v.name].append(time_steps(v, x, y, args.steps, device))

    twa = next(v for v in variants if v.name == "twa")
    basis_bytes = twa.basis.numel() * twa.basis.element_size()
    optimizer: SubspaceSGD = twa.optimizer  # type: ignore[assignment]
    proj_s = statistics.median(
        time_projection(optimizer.projector, twa.flat, optimizer.coords, 20, device) for _ in range(5))

    dim = twa.flat.params.numel()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; model {args.model} "
          f"(D={dim:,}), batch {args.batch_size}x3x{args.image_size}x{args.image_size}, basis {args.checkpoints} x D "
          f"{args.dtype} ({basis_bytes / 2**20:.1f} MiB); {args.rounds} interleaved rounds of {args.steps} steps")
    base = statistics.median(times["sgd"])
    for name, ts in times.items():
        med = statistics.median(ts)
        # ratio per round (the variants of one round ran back to back), then the median of those ratios
        paired = statistics.median(t / s for t, s in zip(ts, times["sgd"], strict=True))
        print(f"  {name:<10} median step {1e3 * med:8.2f} ms   ratio to sgd {med / base:6.4f}   "
              f"(median of per-round ratios {paired:6.4f})")
    print(f"  projection alone (c = P g, then w = P^T a): {1e3 * proj_s:.3f} ms per step, "
          f"{2 * basis_bytes / proj_s / 1e9:.1f} GB/s of basis read, {100 * proj_s / base:.2f}% of a plain step")


if __name__ == "__main__":
    main()
