"""`twa orthogonalize` on a Hugging Face GPT-2 run against reading the same files once plus `torch.linalg.qr`,
with the time to merely read the files (`cat` into /dev/null) as the floor.

The run is the one `scripts/bench_hf_memory.py` writes (COUNT `checkpoint-*` folders of a GPT-2 model from
`transformers.GPT2Config`, random weights a small step apart). Every method runs in a fresh process, the
methods interleaved over the repeats (the fastest repeat is kept), so a noisy neighbour hurts them alike:

- `cat`: every weight file read into /dev/null (the floor: the bytes once, nothing parsed);
- `read+qr`: each checkpoint's floating tensors read once into one n x D fp32 matrix, then the reduced QR of
  its transpose (no hash, no check, no file written);
- `twa`: the whole `twa orthogonalize RUN -o BASIS` command of this tree (listing, checks, the sha256 of
  every file, the basis written);
- `twa@base`: the same command from another checkout (`--baseline-tree`), to compare two versions in one run.

Peak RSS is each process's own (`ru_maxrss`); 'x basis' is it over the fp32 basis (n x D x 4 bytes). The
files are in the page cache after the first method reads them (the machine has the memory), so the floor
is the cost of copying the bytes out of the cache, not of the disk. Run from the repository root:

    PYTHONPATH=$PWD python scripts/bench_read_once.py --count 20 --layers 4 --width 512 --workdir /tmp/ro
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
         "stderr=subprocess.DEVNULL, check=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
READ_QR = """
import sys, torch
from pathlib import Path
from safetensors import safe_open
folders = sorted(Path(sys.argv[1]).glob('checkpoint-*'), key=lambda p: int(p.name.split('-')[1]))
rows = []
for folder in folders:
    with safe_open(str(folder / 'model.safetensors'), framework='pt') as f:
        rows.append(torch.cat([f.get_tensor(k).reshape(-1).float() for k in f.keys()
                               if f.get_slice(k).get_dtype().startswith(('F', 'BF'))]))
matrix = torch.stack(rows)
del rows
q, _ = torch.linalg.qr(matrix.t())
print(q.shape[0], q.shape[1])
"""


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one command in a fresh process, run from the tree on its PYTHONPATH:
    `python -m` puts the working directory first on the path, so from another checkout it would run that one."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=True,
                         env=env, cwd=env["PYTHONPATH"]).stdout
    return time.perf_counter() - started, int(out.strip()) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/twa-read-once"))
    parser.add_argument("--baseline-tree", type=Path, help="another checkout of twa to run beside this one")
    args = parser.parse_args()

    spec = importlib.util.spec_from_file_location("bench_hf_memory", HERE / "bench_hf_memory.py")
    hf_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hf_memory)
    run, _ = hf_memory.write_run(args.workdir, args.count, args.layers, args.width)
    files = sorted(str(p) for p in run.glob("checkpoint-*/model.safetensors"))
    total = sum(os.path.getsize(f) for f in files)
    basis = args.workdir / "basis.safetensors"

    def tree_env(tree: Path) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}

    here = tree_env(HERE.parent)
    methods: dict[str, tuple[list[str], dict[str, str]]] = {
        "cat": (["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], here),
        "read+qr": ([sys.executable, "-c", READ_QR, str(run)], here),
        "twa": ([sys.executable, "-m", "twa_cli", "orthogonalize", str(run), "-o", str(basis), "--force"], here),
    }
    if args.baseline_tree:
        methods["twa@base"] = ([sys.executable, "-m", "twa_cli", "orthogonalize", str(run), "-o", str(basis),
                                "--force"], tree_env(args.baseline_tree))
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # every method starts from the cache
    results: dict[str, list[tuple[float, int]]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for name, (argv, env) in methods.items():
            results[name].append(timed(argv, env))
    with open(files[0], "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    dim = sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    basis_bytes = args.count * dim * 4
    print(f"{args.count} files, {total / 1e9:.2f} GB; basis {basis_bytes / 1e9:.2f} GB fp32 (D = {dim:,})")
    print(f"{'method':<10} {'seconds':>8} {'vs read+qr':>11} {'vs cat':>7} {'peak GB':>8} {'x basis':>8}")
    best = {name: min(runs) for name, runs in results.items()}
    for name, (seconds, peak) in best.items():
        print(f"{name:<10} {seconds:8.2f} {seconds / best['read+qr'][0]:11.2f} {seconds / best['cat'][0]:7.2f} "
              f"{peak / 1e9:8.2f} {peak / basis_bytes:8.2f}")


if __name__ == "__main__":
    main()
