"""Peak memory of `twa swa` against its `--dry-run` estimate, for each checkpoint format, side by side.

Writes N synthetic checkpoints of P float32 parameters (in tensors of a few million elements, like a
network's layers) as safetensors, a sharded Hugging Face folder, and plain `.pt` files; runs `twa swa` on each
in a fresh process and reports the growth of its peak resident memory over a process that only starts the tool
(interpreter and torch), next to the estimate. Run from the repository root:

    PYTHONPATH=$PWD python scripts/bench_swa_memory.py --params 20000000 --count 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

CHILD = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
         "stderr=subprocess.DEVNULL, check=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss_bytes(args: list[str]) -> int:
    """Peak RSS of one `twa` run (Linux reports kilobytes)."""
    out = subprocess.run([sys.executable, "-c", CHILD, sys.executable, "-m", "twa_cli", *args],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip()) * 1024


def state(seed: int, params: int, chunk: int = 2_000_000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [chunk] * (params // chunk) + ([params % chunk] if params % chunk else [])
    return {f"layer{i}.weight": torch.randn(n, generator=g) for i, n in enumerate(sizes)}


def write_layouts(root: Path, count: int, params: int) -> dict[str, Path]:
    folders = {"safetensors": root / "st", "hf-sharded": root / "hf", "pt": root / "pt"}
    for folder in folders.values():
        folder.mkdir()
    for i in range(count):
        s = state(i, params)
        save_file(s, str(folders["safetensors"] / f"ckpt-{i}.safetensors"), metadata={"step": str(i)})
        ckpt = folders["hf-sharded"] / f"checkpoint-{i + 1}"
        ckpt.mkdir()
        names = list(s)
        half = len(names) // 2 or 1
        weight_map = {}
        for k, part in enumerate((names[:half], names[half:])):
            if part:
                shard = f"model-{k + 1:05d}-of-00002.safetensors"
                save_file({n: s[n] for n in part}, str(ckpt / shard))
                weight_map.update({n: shard for n in part})
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        torch.save(s, folders["pt"] / f"epoch{i + 1}.pt")
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=20_000_000)
    parser.add_argument("--count", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = write_layouts(root, args.count, args.params)
        baseline = peak_rss_bytes(["inspect", str(folders["safetensors"] / "ckpt-0.safetensors"), "-q"])
        print(f"{args.count} checkpoints of {args.params:,} fp32 parameters; start-up peak RSS "
              f"{baseline / 1e6:.0f} MB (subtracted below)")
        print(f"{'format':<12} {'dtype args':<28} {'estimate MB':>12} {'measured MB':>12} {'measured/estimate':>18}")
        for name, folder in folders.items():
            for extra in ([], ["--compute-dtype", "float32"]):
                out = root / f"avg-{name}-{len(extra)}.safetensors"
                plan = json.loads(subprocess.run(
                    [sys.executable, "-m", "twa_cli", "swa", str(folder), "-o", str(out), "--dry-run", "--json",
                     *extra],
                    capture_output=True, text=True, check=True).stdout)
                grown = peak_rss_bytes(["swa", str(folder), "-o", str(out), "-q", *extra]) - baseline
                estimate = plan["peak_ram_bytes"]
                print(f"{name:<12} {' '.join(extra) or '(fp64 sums)':<28} {estimate / 1e6:>12.0f} "
                      f"{grown / 1e6:>12.0f} {grown / estimate:>18.2f}")


if __name__ == "__main__":
    main()
