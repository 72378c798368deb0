#!/usr/bin/env python
"""In-loop benchmark: `transformers.Trainer` steps with twa's TrainerCallback attached against the same steps
without it, and the memory of the in-memory basis against the model's.

The model is the small GPT-2 of scripts/bench_text.py (GPT2Config: vocab 1024, 128 positions, n_embd 128, 2 layers,
4 heads, tied embeddings), trained by the real Trainer with AdamW on random token blocks (128 tokens, batch 8).
Runs without and with the callback alternate, round after round, in one process (a noisy machine slows them
alike), each going first every other round. Each run trains --steps steps; the callback adds the weights every
--every steps and fits in their span
at the last step (fit_at=1.0, one epoch of the run's data). A clock callback placed after twa's records the end
of every step, so a step's time includes what the callback does after it.

Printed: the mean time of the steps 2 .. N-1 of each run (the last holds the fit, the first the warm-up), wall
time and this process's CPU time (which other processes on a busy machine move less), its median over the rounds
for both, and their ratio (the steps that add weights included: the overhead is
amortized over --every steps); the callback's own time per step (its on_step_end timed inside the run, so other
processes on a busy machine barely move it) over the step without it; the time of the fit itself; and the bytes
the callback holds: the basis (its preallocated rows and those in use) and its one flat copy of the weights,
against the model's fp32 parameters.

    PYTHONPATH=$PWD python scripts/bench_inloop.py                    # CPU, 3 rounds of 40 steps, add every 10
    PYTHONPATH=$PWD python scripts/bench_inloop.py --device cuda --steps 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                     ("WANDB_DISABLED", "true")):
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from twa_cli.integrations.hf import TWACallback  # noqa: E402


class TimedTWA(TWACallback):
    """twa's callback, with the time of each of its on_step_end calls recorded (the last one holds the fit)."""

    def __init__(self, device: str, **kwargs):
        super().__init__(**kwargs)
        self.device = device
        self.seconds: list[float] = []

    def on_step_end(self, *args, **kwargs):
        started = time.perf_counter()
        super().on_step_end(*args, **kwargs)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - started)


class StepClock(TrainerCallback):
    """Wall and process CPU time at the end of every step (after the callbacks listed before it)."""

    def __init__(self, device: str):
        self.device = device
        self.ends: list[float] = []
        self.cpu: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--every", type=int, default=10, help="the callback adds the weights every this many steps")
    p.add_argument("--rounds", type=int, default=3, help="runs of each, alternating")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def build_model(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=1024, n_positions=128, n_embd=128, n_layer=2, n_head=4, tie_word_embeddings=True)
    return GPT2LMHeadModel(config)


def run(args: argparse.Namespace, data: list[dict[str, torch.Tensor]], with_twa: bool, out: str
        ) -> tuple[float, float, float, TimedTWA | None, torch.nn.Module]:
    """One Trainer run; (mean wall and CPU time of steps 2..N-1, wall time of the last step, the callback, the
    model)."""
    model = build_model(0)
    clock = StepClock(args.device)
    twa = TimedTWA(args.device, every_steps=args.every, fit_options={"epochs": 1, "lr": 0.5}) if with_twa else None
    targs = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                              learning_rate=2e-3, save_strategy="no", logging_strategy="no", report_to="none",
                              disable_tqdm=True, use_cpu=args.device == "cpu", dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[c for c in (twa, clock) if c])
    trainer.train()
    gaps = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)]
    cpu = [b - a for a, b in zip(clock.cpu, clock.cpu[1:], strict=False)]
    return statistics.fmean(gaps[:-1]), statistics.fmean(cpu[:-1]), gaps[-1], twa, model


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    g = torch.Generator().manual_seed(0)
    n = args.steps * args.batch  # one epoch is the run: the fit's epoch sees the same data once
    blocks = torch.randint(0, 1024, (n, args.block), generator=g)
    data = [{"input_ids": b, "labels": b} for b in blocks]
    plain_times, twa_times, plain_last, fit_times, own = [], [], [], [], []
    plain_cpu, twa_cpu = [], []
    callback = model = None
    for r in range(args.rounds):
        for with_twa in ((False, True) if r % 2 == 0 else (True, False)):  # neither always runs first
            mean, cpu, last, cb, m = run(args, data, with_twa, f"/tmp/bench_inloop_{os.getpid()}")
            (twa_times if with_twa else plain_times).append(mean)
            (twa_cpu if with_twa else plain_cpu).append(cpu)
            if with_twa:
                fit_times.append(cb.seconds[-1])
                own.append(statistics.fmean(cb.seconds[1:-1]))  # the callback's own time per step, fit excluded
                callback, model = cb, m
            else:
                plain_last.append(last)
        print(f"round {r + 1}: step without {plain_times[-1] * 1e3:.2f} ms (CPU {plain_cpu[-1] * 1e3:.2f} ms), with "
              f"the callback {twa_times[-1] * 1e3:.2f} ms (CPU {twa_cpu[-1] * 1e3:.2f} ms)", flush=True)
    without, with_cb = statistics.median(plain_times), statistics.median(twa_times)
    params = sum(p.numel() for p in model.parameters())
    basis = callback.twa.basis
    mib = 1 / 2**20
    print(f"\ndevice {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}; GPT-2 "
          f"{params:,} parameters, batch {args.batch} x {args.block} tokens, {args.steps} steps a run, weights added "
          f"every {args.every} steps ({basis.count} a run), median of {args.rounds} rounds")
    print(f"training step  without callback {without * 1e3:8.2f} ms   with callback {with_cb * 1e3:8.2f} ms   "
          f"ratio {with_cb / without:.3f}   (wall time)")
    cpu_without, cpu_with = statistics.median(plain_cpu), statistics.median(twa_cpu)
    print(f"               without callback {cpu_without * 1e3:8.2f} ms   with callback {cpu_with * 1e3:8.2f} ms   "
          f"ratio {cpu_with / cpu_without:.3f}   (this process's CPU time, all its threads)")
    per_step = statistics.median(own)
    print(f"the callback's own time per step (its on_step_end, adds included, fit excluded) {per_step * 1e3:.3f} ms "
          f"= {per_step / without:.4f} of a step without it")
    print(f"the fit (1 epoch of {args.steps} steps in the span, BatchNorm none) {statistics.median(fit_times):.2f} s "
          f"(a plain last step: {statistics.median(plain_last) * 1e3:.1f} ms)")
    model_bytes = params * 4
    rows, used = basis._q.shape[0], basis.rank
    held = basis._q.numel() * 4 + callback.twa._scratch.numel() * 4
    print(f"memory  model fp32 parameters {model_bytes * mib:.2f} MiB; basis {used} rows in use of {rows} allocated "
          f"= {basis._q.numel() * 4 * mib:.2f} MiB ({rows} x the model); one flat copy of the weights "
          f"{callback.twa._scratch.numel() * 4 * mib:.2f} MiB; all the callback holds {held * mib:.2f} MiB = "
          f"{held / model_bytes:.2f} x the model")


if __name__ == "__main__":
    main()
