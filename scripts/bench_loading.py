#!/usr/bin/env python
"""Start-up benchmark of train-subspace: loading the basis and building the projected optimizer.

Writes a synthetic basis file for a model (rows need not be orthonormal to time loading), then, each in its
own subprocess so peak RSS is clean: `mapped` is what train-subspace does (load_basis memory-maps the basis;
SubspaceSGD writes w = P^T a from it in place), `read` is reading every tensor of the file into memory first
(safetensors load) as before. Printed: seconds to a ready optimizer and peak RSS above the interpreter's
baseline, in units of the basis size. The page cache is warm for both (the file was just written).

    PYTHONPATH=$PWD python scripts/bench_loading.py --model resnet18 --checkpoints 21
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


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS:"))


def write_basis(path: Path, model: str, k: int) -> None:
    from twa_cli.core.basis import Basis
    from twa_cli.core.basis_files import save_basis
    from twa_cli.io.checkpoints import Source
    from twa_cli.tasks.models import build_model, model_spec, trainable_names

    spec = model_spec(model, 10, 3, 32)
    net = build_model(spec)
    names = trainable_names(net)
    params = dict(net.named_parameters())
    layout = [(n, tuple(params[n].shape)) for n in names]
    dim = sum(params[n].numel() for n in names)
    vectors = torch.randn(k, dim) / dim**0.5
    save_basis(Basis(vectors=vectors, coords=torch.eye(k, dtype=torch.float64), layout=layout,
                     sources=[Source(f"synthetic-{i}") for i in range(k)], recorded={"arch": spec}), path)


def worker(method: str, path: str) -> dict:
    from twa_cli.core.basis_files import load_basis
    from twa_cli.engine.subspace import FlatParameters, SubspaceSGD
    from twa_cli.io.checkpoints import load_tensors
    from twa_cli.tasks.models import build_model

    baseline = rss_mb()
    started = time.perf_counter()
    basis = load_basis(path)
    if method == "read":
        basis.vectors = load_tensors(path, ["basis"])["basis"]
    model = build_model(basis.recorded["arch"])
    flat = FlatParameters(model, [n for n, _ in basis.layout])
    vectors = basis.vectors.to(dtype=flat.params.dtype)
    SubspaceSGD(flat, vectors, basis.center_coords(), lr=0.1)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    return {"method": method, "seconds": seconds, "peak_mb": peak,
            "basis_mb": vectors.numel() * vectors.element_size() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--checkpoints", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.path)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "basis.safetensors"
        write_basis(path, args.model, args.checkpoints)
        runs: dict[str, list[dict]] = {"mapped": [], "read": []}
        for _ in range(args.repeats):
            for method in runs:
                done = subprocess.run([sys.executable, __file__, "--worker", method, "--path", str(path)],
                                      capture_output=True, text=True, check=True, env=os.environ)
                runs[method].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.model}, basis {args.checkpoints} x D fp32 ({runs['mapped'][0]['basis_mb']:.0f} MiB), "
          f"fastest of {args.repeats}")
    for method, rs in runs.items():
        best = min(rs, key=lambda r: r["seconds"])
        peaks = sorted(r["peak_mb"] / r["basis_mb"] for r in rs)
        print(f"  {method:<7} {best['seconds']:6.2f} s to a ready optimizer; peak RSS above baseline "
              f"{', '.join(f'{p:.2f}' for p in peaks)} x basis (each run; includes building the model)")


if __name__ == "__main__":
    main()
