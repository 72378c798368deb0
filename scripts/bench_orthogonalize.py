#!/usr/bin/env python
"""Orthogonalizer benchmark: `twa`'s streaming block Gram-Schmidt against torch.linalg.qr and the reference
code's classical fp32 Gram-Schmidt, on a synthetic correlated trajectory and (optionally) real checkpoints.

Each method runs in its own subprocess so its peak RSS is its own. Printed per method: seconds, peak RSS above
the interpreter's baseline (after `import torch`) as a multiple of the fp32 basis size, max |P P^T - I| and the
worst relative reconstruction error of a checkpoint. Ratios are against torch.linalg.qr measured in the same run.

    PYTHONPATH=$PWD python scripts/bench_orthogonalize.py --n 100 --dim 2000000
    PYTHONPATH=$PWD python scripts/bench_orthogonalize.py --real runs/ckpts --end 21
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("twa", "qr", "reference-cgs")


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- inputs


def write_trajectory(folder: Path, n: int, dim: int, step: float, seed: int) -> None:
    """A random walk around a common offset, like one run's checkpoints: each step `step` of the offset's norm."""
    from twa_cli.io.checkpoints import make_metadata
    from twa_cli.io.safetensors import save_tensors

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    point = torch.randn(dim, generator=g, dtype=torch.float64)
    for i in range(n):
        point += torch.randn(dim, generator=g, dtype=torch.float64) * step
        save_tensors(folder / f"c{i:04d}.safetensors", {"w": point.float()},
                     make_metadata("checkpoint", step=str(i), trainable=["w"]))


def selected(folder: str, start: int, end: int | None):
    from twa_cli.core.selection import Selection, select_checkpoints
    from twa_cli.io.checkpoints import list_folder

    return select_checkpoints(list_folder(folder), Selection(start=start, end=end))


def stacked(ckpts, names) -> torch.Tensor:
    from twa_cli.io.checkpoints import load_tensors

    return torch.stack([torch.cat([load_tensors(c.path, names)[n].reshape(-1).float() for n in names]) for c in ckpts])


# ---------------------------------------------------------------------------------------------- methods


def reference_classical_gram_schmidt(ckpts, names) -> torch.Tensor:
    """What the reference code does, rewritten: stack every checkpoint as a numpy array, copy it to torch, then
    classical Gram-Schmidt one vector at a time in fp32 (each new vector minus its projections on the
    directions so far, all computed from the original vector)."""
    import numpy as np

    as_numpy = np.stack([stacked([c], names)[0].numpy() for c in ckpts])
    weights = torch.from_numpy(as_numpy).clone()  # the second copy
    basis = torch.zeros_like(weights)
    for i in range(weights.shape[0]):
        v = weights[i]
        if i:
            v = v - basis[:i].t() @ (basis[:i] @ v)
        basis[i] = v / v.norm()
    return basis


def run_method(method: str, folder: str, start: int, end: int | None) -> dict:
    from twa_cli.commands.common import subspace_names
    from twa_cli.core.basis import orthogonalize, reconstruction_errors, subspace_layout
    from twa_cli.core.basis_files import save_basis
    from twa_cli.engine.orthogonalizer import orthogonality_error
    from twa_cli.tasks.resolve import TaskRequest

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    ckpts = selected(folder, start, end)
    trainable, ckpts = subspace_names(TaskRequest(), ckpts)
    names = [name for name, _ in subspace_layout(ckpts, trainable)]
    baseline = rss_mb()
    started = time.perf_counter()
    out: dict = {"method": method}
    if method == "twa":
        basis = orthogonalize(ckpts, names=names, hashes=False)
        with tempfile.TemporaryDirectory() as tmp:  # writing the file is part of the command's memory
            save_basis(basis, Path(tmp) / "basis.safetensors")
        out["seconds"] = time.perf_counter() - started
        out["peak_mb"] = peak_rss_mb() - baseline
        vectors = basis.vectors
        out["rank"] = basis.rank
        out["reconstruction"] = max(reconstruction_errors(basis, ckpts))
    else:
        matrix = stacked(ckpts, names) if method == "qr" else None
        loaded = time.perf_counter()
        if method == "qr":
            q, _ = torch.linalg.qr(matrix.t())
            vectors = q.t().contiguous()
            out["compute_seconds"] = time.perf_counter() - loaded
        else:
            vectors = reference_classical_gram_schmidt(ckpts, names)
        out["seconds"] = time.perf_counter() - started
        out["peak_mb"] = peak_rss_mb() - baseline
        out["rank"] = int(vectors.shape[0])
        worst = 0.0
        for c in ckpts:
            w = stacked([c], names)[0].double()
            rebuilt = vectors.double().t() @ (vectors.double() @ w)
            worst = max(worst, float((w - rebuilt).norm() / w.norm()))
        out["reconstruction"] = worst
    out["orthogonality"] = orthogonality_error(vectors)
    dim = int(vectors.shape[1])
    out["basis_mb"] = out["rank"] * dim * 4 / 2**20
    out["model_mb"] = dim * 4 / 2**20
    return out


# ---------------------------------------------------------------------------------------------- driver


def measure(folder: str, start: int, end: int | None, repeats: int) -> list[dict]:
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    for _ in range(repeats):  # interleaved, so a noisy neighbour hurts every method alike
        for method in METHODS:
            cmd = [sys.executable, __file__, "--worker", method, "--folder", folder, "--start", str(start)]
            if end is not None:
                cmd += ["--end", str(end)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[method].append(json.loads(done.stdout.strip().splitlines()[-1]))
    # the fastest of the repeats, the usual estimate of a time on a shared machine
    return [min(runs, key=lambda r: r["seconds"]) for runs in results.values()]


def report(title: str, rows: list[dict]) -> None:
    qr = next(r for r in rows if r["method"] == "qr")
    print(f"\n{title}")
    print(f"{'method':<14} {'seconds':>8} {'vs qr':>6} {'peak MB':>8} {'x basis':>8} {'rank':>5} "
          f"{'|PP^T-I|':>9} {'reconstr.':>9}")
    for r in rows:
        print(f"{r['method']:<14} {r['seconds']:8.2f} {r['seconds'] / qr['seconds']:6.2f} {r['peak_mb']:8.0f} "
              f"{(r['peak_mb'] - r['model_mb']) / r['basis_mb']:8.2f} {r['rank']:5d} {r['orthogonality']:9.1e} "
              f"{r['reconstruction']:9.1e}")
    print(f"(qr: {qr['compute_seconds']:.2f} s of factorization, the rest reading the files; "
          f"'x basis' = (peak RSS above baseline - one model) / fp32 basis size; basis {qr['basis_mb']:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="checkpoints in the synthetic trajectory")
    parser.add_argument("--dim", type=int, default=2_000_000, help="parameters per synthetic checkpoint")
    parser.add_argument("--step", type=float, default=1e-3, help="random-walk step, relative to the offset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", help="also measure on this folder of real checkpoints (from `twa sample`)")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--end", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads in every method (default: torch's own)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_method(args.worker, args.folder, args.start, args.end)))
        return
    if args.threads:
        os.environ["BENCH_THREADS"] = str(args.threads)
    print(f"torch {torch.__version__}, {os.environ.get('BENCH_THREADS', torch.get_num_threads())} threads")
    if not args.skip_synthetic:
        with tempfile.TemporaryDirectory() as tmp:
            write_trajectory(Path(tmp), args.n, args.dim, args.step, args.seed)
            report(f"synthetic random walk: n={args.n}, D={args.dim}, step {args.step:g} of the offset",
                   measure(tmp, 0, None, args.repeats))
    if args.real:
        report(f"real checkpoints: {args.real} [{args.start}:{args.end}]",
               measure(args.real, args.start, args.end, args.repeats))


if __name__ == "__main__":
    main()
