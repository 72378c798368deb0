"""Peak memory of `twa` on a Hugging Face run against its `--dry-run` estimate, at the size of GPT-2 small.

Writes COUNT checkpoint folders of a GPT-2 model (`transformers.GPT2Config`, 124M parameters by default;
random weights, each checkpoint a small step from the last, as along a run), each with `config.json` and a
byte-level BPE tokenizer trained here on a few lines of text, then for `orthogonalize`, `train-subspace` (from
the basis, one short epoch on a few blocks of text) and `swa` prints the `--dry-run` estimate of peak RAM and the
peak resident memory measured in a fresh process: in all, and its growth over a process that only starts the tool
and reads one checkpoint's header (the interpreter and the libraries, which the estimate does not count).
Nothing is downloaded. Run from the repository root:

    PYTHONPATH=$PWD python scripts/bench_hf_memory.py --count 20 --workdir /tmp/hfmem

(about 10 GB of disk for 20 checkpoints of 124M fp32 parameters, and the basis beside them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
         "stderr=subprocess.DEVNULL, check=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
TEXT = "the cat sees a tree. a dog likes the river at night. our team follows the old car once more.\n" * 400


def peak_rss_bytes(args: list[str]) -> tuple[int, float]:
    """Peak RSS (Linux reports kilobytes) and wall time of one `twa` run in a fresh process."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, sys.executable, "-m", "twa_cli", *args],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip()) * 1024, time.perf_counter() - started


def plan(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "twa_cli", *args, "--dry-run", "--json"], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def write_run(root: Path, count: int, layers: int, width: int) -> tuple[Path, Path]:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.txt").write_text(TEXT)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64))
    model = GPT2LMHeadModel(config)
    run = root / "run"
    for i in range(count):
        folder = run / f"checkpoint-{100 * (i + 1)}"
        if not (folder / "model.safetensors").exists():
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p), alpha=1e-3)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    print(f"{count} checkpoints of GPT-2 ({layers} layers, width {width}): {params / 1e6:.1f}M parameters")
    return run, data / "train.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/twa-hf-memory"))
    parser.add_argument("--estimate-only", action="store_true", help="Only the --dry-run estimates.")
    args = parser.parse_args()
    run, train = write_run(args.workdir, args.count, args.layers, args.width)
    basis = args.workdir / "basis.safetensors"
    text = ["--data", str(train), "--val-split", "0.2", "--block-size", "64"]
    commands = {
        "orthogonalize": ["orthogonalize", str(run), "-o", str(basis), "--force"],
        "train-subspace": ["train-subspace", str(basis), "-o", str(args.workdir / "twa"), "--force", "--epochs", "1",
                           "--batch-size", "4", "--device", "cpu", *text],
        "swa": ["swa", str(run), "-o", str(args.workdir / "swa"), "--force"],
    }
    baseline, _ = peak_rss_bytes(["inspect", str(run / "checkpoint-100"), "-q"])
    print(f"start-up peak RSS {baseline / 1e9:.2f} GB (twa inspect of one checkpoint)")
    print(f"{'command':16s} {'estimate GB':>12s} {'measured GB':>12s} {'growth GB':>10s} {'growth/estimate':>16s} "
          f"{'seconds':>8s}")
    for name, command in commands.items():
        if name == "train-subspace" and not basis.exists():
            estimate = None  # the plan reads the basis's header: made by the run above
        else:
            estimate = plan(command)["peak_ram_bytes"]
        if args.estimate_only:
            print(f"{name:16s} {estimate / 1e9 if estimate else float('nan'):12.2f}")
            continue
        measured, seconds = peak_rss_bytes(command)
        if estimate is None:
            estimate = plan(command)["peak_ram_bytes"]
        grown = measured - baseline
        print(f"{name:16s} {estimate / 1e9:12.2f} {measured / 1e9:12.2f} {grown / 1e9:10.2f} {grown / estimate:16.2f} "
              f"{seconds:8.0f}")


if __name__ == "__main__":
    main()
