#!/usr/bin/env python
"""Basis precision benchmark: the same head-stage TWA run with the basis in float32, bfloat16 and float16.

Samples a head stage (the first epochs of a run, constant learning rate), orthogonalizes it once in fp32, then
trains in the subspace from that basis with each --basis-dtype (the projection accumulating in fp32) and prints the
test accuracy and loss of each, and their difference from float32. Same seed, same batches for every dtype.

    PYTHONPATH=$PWD python scripts/bench_precision.py                       # small-cnn on digits (CPU-size)
    PYTHONPATH=$PWD python scripts/bench_precision.py --data mnist --data-dir /path/to/mnist
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from twa_cli.commands.common import subspace_names
from twa_cli.commands.sample import SampleConfig, sample
from twa_cli.commands.train_subspace import SubspaceConfig, train_subspace
from twa_cli.core.basis import orthogonalize
from twa_cli.core.basis_files import load_basis, save_basis
from twa_cli.io.checkpoints import list_folder
from twa_cli.tasks.resolve import TaskRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small-cnn")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--data-dir")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the sampled head stage")
    parser.add_argument("--per-epoch", type=int, default=2, help="checkpoints per epoch (2 x 10 + the start = 21)")
    parser.add_argument("--sample-lr", type=float, default=0.05)
    parser.add_argument("--twa-epochs", type=int, default=3)
    parser.add_argument("--twa-lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    task = TaskRequest(model=args.model, data=args.data, data_dir=args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sample(root / "head", SampleConfig(task=task, epochs=args.epochs, lr=args.sample_lr,
                                           schedule="constant", per_epoch=args.per_epoch, seed=args.seed))
        ckpts = list_folder(root / "head")
        names, ckpts = subspace_names(TaskRequest(), ckpts)  # the trainable tensors the checkpoints record
        basis_path = save_basis(orthogonalize(ckpts, names=names, hashes=False), root / "basis.safetensors")
        errors = load_basis(basis_path).errors
        print(f"{args.model} on {args.data}: head stage of {args.epochs} epochs, {len(ckpts)} checkpoints, "
              f"fp32 basis max |PP^T - I| = {errors['orthogonality']:.1e}; TWA {args.twa_epochs} epochs, "
              f"lr {args.twa_lr}, seed {args.seed}")
        rows = []
        for dtype in ("float32", "bfloat16", "float16"):
            cfg = SubspaceConfig(epochs=args.twa_epochs, lr=args.twa_lr, basis_dtype=dtype, seed=args.seed,
                                 device="cpu", eval_every_epoch=False, select="none")
            started = time.perf_counter()
            result = train_subspace(basis_path, root / f"twa-{dtype}", cfg)
            assert result.test is not None
            rows.append((dtype, result.test.accuracy, result.test.loss, time.perf_counter() - started))
    base_acc, base_loss = rows[0][1], rows[0][2]
    print(f"{'dtype':<9} {'test acc %':>10} {'vs fp32':>8} {'test loss':>10} {'vs fp32':>9} {'seconds':>8}")
    for dtype, acc, loss, seconds in rows:
        print(f"{dtype:<9} {acc:10.2f} {acc - base_acc:+8.2f} {loss:10.4f} {loss - base_loss:+9.4f} {seconds:8.1f}")


if __name__ == "__main__":
    main()
