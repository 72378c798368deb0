#!/usr/bin/env python
"""Reproduce the paper's CIFAR claims (Tables 1 and 3, Figure 3) with twa's own library calls.

Each stage is what a user would run with the CLI (`twa sample`, `twa swa`, `twa train-subspace`), called as
library functions so one process decodes the images once. Every model is scored on the test images and on
the training images the subset leaves out (a second held-out set); each difference between two models comes
with its paired noise (McNemar). Results are written to JSON after every stage, and a rerun with the same
options skips the stages already done, so an interrupted run resumes where it stopped.

    python scripts/bench_paper.py --quick                 # smoke run on a tiny subset (3 minutes on a busy CPU)
    nohup python scripts/bench_paper.py > .cache/bench.log 2>&1 &   # the full protocol (hours on 2 CPU cores)
    python scripts/bench_paper.py --report                # print the tables of the results so far

The full protocol: 1000 training images per class, the full test set, 40 epochs of SGD (lr 0.1, 10x lower at
epochs 20 and 30, weight decay 1e-4, batch 128), checkpoints every 1/10 epoch (so 1, 2 and 5 per epoch are
subsets of one run), TWA for 4 epochs at lr 2 (step schedule, weight decay 1e-5 from the center for the head,
5e-5 from the last checkpoint for the tail), tails of 10 epochs at a constant lr 0.05 and 0.10 from epoch 30.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twa_cli.commands.sample import SampleConfig, sample  # noqa: E402
from twa_cli.commands.swa import SwaRequest, swa  # noqa: E402
from twa_cli.commands.train_subspace import SubspaceConfig, train_subspace  # noqa: E402
from twa_cli.core.batching import batches, plain_batches  # noqa: E402
from twa_cli.core.selection import Selection, select_checkpoints  # noqa: E402
from twa_cli.io.checkpoints import list_folder, load_tensors, read_checkpoint  # noqa: E402
from twa_cli.tasks.base import Task  # noqa: E402
from twa_cli.tasks.images import ImageTensors, decoded_folder  # noqa: E402
from twa_cli.tasks.models import build_model, load_weights  # noqa: E402
from twa_cli.tasks.resolve import TaskRequest, resolve_task  # noqa: E402

DEFAULT_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10-jpg.tar.gz"
SETS = ("test", "heldout")
# train-subspace's variants (twa_cli/core/variants.py), each measured against plain TWA on the same checkpoints.
VARIANTS: dict[str, dict[str, Any]] = {
    "fitval": {"fit_on": "val", "task": TaskRequest(val_split=0.1)},
    "layer": {"granularity": "layer"},
    "affine": {"affine": True},
}  # the two held-out sets every model is scored on; "train" gives the gap

# When the paper's defaults miss the head target, the issue asks why: each entry below changes one factor it
# names (learning rate, schedule, BatchNorm recalibration, starting point, checkpoints per epoch, how the
# 24-epoch budget is split between sampling and TWA). They are scored on a validation split carved from the
# training subset by a regular run of its own (seed TUNE_SEED, TUNE_SPLIT of the images), never on the test or
# held-out images; the best then runs on every seed as `head-twa-tuned`. Keys other than `density` and `shift`
# (epochs moved from sampling to TWA) are SubspaceConfig fields.
TUNE_SEED, TUNE_SPLIT = 100, 0.2
TUNING: dict[str, dict[str, Any]] = {
    "paper defaults": {},
    "lr 0.5": {"lr": 0.5},
    "lr 1": {"lr": 1.0},
    "lr 4": {"lr": 4.0},
    "cosine schedule": {"schedule": "cosine"},
    "start at the last checkpoint": {"init": "last"},
    "no BatchNorm recalibration": {"bn_update": False},
    "2 per epoch, lr check": {"density": 2, "lr_check": True},
    "5 per epoch, lr check": {"density": 5, "lr_check": True},
    "2 sampling epochs fewer, 2 TWA epochs more": {"shift": 2},
    "4 sampling epochs fewer, 4 TWA epochs more": {"shift": 4},
}


# ---------------------------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 JPEG archive (unpacked once)")
    p.add_argument("--data-dir", type=Path, help="an unpacked ImageFolder tree with train/ and test/ (e.g. "
                   "the full CIFAR-10 or CIFAR-100); overrides --archive")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench", help="working folder (reused)")
    p.add_argument("--results", type=Path, help="results JSON (default: CACHE/<tag>/results.json)")
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--heldout-per-class", type=int, help="training images outside the subset scored as a "
                   "second held-out set (default: all of them)")
    p.add_argument("--test-per-class", type=int, help="default: the full test set")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--model", default="small-cnn")
    p.add_argument("--epochs", type=int, default=40, help="regular training; the head is the first half")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--twa-epochs", type=int, default=4)
    p.add_argument("--twa-lr", type=float, default=2.0)
    p.add_argument("--densities", type=int, nargs="+", default=[1, 2, 5], help="checkpoints per head epoch")
    p.add_argument("--figure3", type=int, nargs="+", help="head lengths in epochs (default: E/8, E/4, 3E/8, E/2, 3E/4)")
    p.add_argument("--tail-lrs", type=float, nargs="+", default=[0.05, 0.10])
    p.add_argument("--tail-epochs", type=int, help="default: E/4, from the checkpoint of epoch 3E/4")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (on a busy shared CPU one is fastest)")
    p.add_argument("--variants", action="store_true", help="also train-subspace's variants (--fit-on val, "
                   "--granularity layer, --affine) on the head (first density) and every tail, against plain TWA")
    p.add_argument("--tune", action="store_true", help="when the head target is missed, try the head-stage "
                   "settings in TUNING on a validation split carved from the training subset (a regular run of its "
                   "own), and run the best on every seed as head-twa-tuned")
    p.add_argument("--lr-check", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the head-stage TWA with train-subspace's sharpness check (the paper-default "
                        "stages always run at the fixed --twa-lr)")
    p.add_argument("--only", nargs="+", metavar="REGEX", help="run only the stages whose names match one of these "
                   "(re.search: lrcheck, ^tail-, ^sgd$), e.g. beside another process running the rest (both write "
                   "one results file) or to run fewer stages for extra seeds")
    p.add_argument("--quick", action="store_true", help="smoke run: 30 training, 20 test and 20 held-out images per "
                   "class, batch 16, 8 epochs, 2 TWA epochs, Figure 3 at 2 and 4 epochs, 1 seed")
    p.add_argument("--report", action="store_true", help="only print the tables of the results so far")
    p.add_argument("--time-models", nargs="+", metavar="MODEL", help="only time training steps of these networks "
                   "on the subset, interleaved, and print seconds per epoch side by side")
    args = p.parse_args(argv)
    if args.quick:
        args.train_per_class, args.heldout_per_class, args.test_per_class = 30, 20, 20
        args.seeds, args.epochs, args.twa_epochs, args.batch_size = [0], 8, 2, 16
        args.figure3 = args.figure3 or [2, 4]
    e = args.epochs
    args.head = e // 2
    args.tail_start = (3 * e) // 4
    args.tail_epochs = args.tail_epochs or e // 4
    args.figure3 = sorted(set(args.figure3 or [max(1, e // 8), e // 4, (3 * e) // 8, e // 2, (3 * e) // 4]))
    args.per_epoch = math.lcm(*args.densities)
    return args


def tag(args: argparse.Namespace) -> str:
    parts = [args.model, f"n{args.train_per_class}", f"h{args.heldout_per_class or 'all'}",
             f"t{args.test_per_class or 'all'}", f"e{args.epochs}", f"b{args.batch_size}", f"wd{args.weight_decay:g}"]
    return "-".join(parts)


# ---------------------------------------------------------------------------------------------- data


def image_root(args: argparse.Namespace) -> Path:
    if args.data_dir is not None:
        return args.data_dir
    root = args.cache / "cifar10"
    if not (root / "train").is_dir():
        print(f"unpacking {args.archive} into {root}", flush=True)
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.archive) as tar:
            tar.extractall(root, filter="data")
    return root


def build_folders(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """A class-balanced subset (fixed across seeds) as an ImageFolder tree of links, and the held-out rest."""
    source = image_root(args)
    data_dir, heldout_dir = work / "data", work / "heldout"
    if (work / "data.done").exists():
        return data_dir, heldout_dir
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.rmtree(heldout_dir, ignore_errors=True)
    rng = np.random.RandomState(0)
    for cls in sorted(p.name for p in (source / "train").iterdir() if p.is_dir()):
        files = sorted((source / "train" / cls).iterdir())
        order = rng.permutation(len(files))
        n = args.train_per_class
        if n > len(files):
            raise SystemExit(f"--train-per-class {n}: class {cls} has only {len(files)} images")
        rest = order[n:] if args.heldout_per_class is None else order[n : n + args.heldout_per_class]
        _link(data_dir / "train" / cls, [files[i] for i in order[:n]])
        _link(heldout_dir / cls, [files[i] for i in rest])
        tests = sorted((source / "test" / cls).iterdir())
        if args.test_per_class is not None:
            tests = [tests[i] for i in rng.permutation(len(tests))[: args.test_per_class]]
        _link(data_dir / "test" / cls, tests)
    (work / "data.done").write_text("")
    return data_dir, heldout_dir


def _link(folder: Path, files: list[Path]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f.name).symlink_to(f.resolve())


def image_task(model: str, data_dir: Path, val_split: float = 0.0) -> Task:
    """The task `sample` runs on the subset: `model` on the image folder (with a validation split if asked), seen
    as `sample` sees it (its standard augmentation and normalization)."""
    return resolve_task(TaskRequest(model=model, data="imagefolder", data_dir=str(data_dir), val_split=val_split,
                                    augment="standard", normalize="standard"))


@dataclass
class EvalSets:
    task: Task  # batches the sets below
    test: Any
    heldout: Any
    train: Any


def eval_sets(model: str, data_dir: Path, heldout_dir: Path) -> EvalSets:
    task = image_task(model, data_dir)
    images, labels = decoded_folder(heldout_dir)
    test = task.dataset("test", augment=False)
    heldout = ImageTensors(images, labels, test.mean.flatten().tolist(), test.std.flatten().tolist())
    return EvalSets(task, test, heldout, task.dataset("train", augment=False))


# ---------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def correct_mask(path: Path, task: Task, dataset: Any, device: str) -> torch.Tensor:
    """Which images the model in `path` classifies correctly (for paired comparisons)."""
    net = build_model(read_checkpoint(path).arch)
    load_weights(net, load_tensors(path), str(path))
    net.to(device).eval()
    out = [(net(x.to(device)).argmax(1).cpu() == y) for x, y in plain_batches(task, dataset, 512)]
    return torch.cat(out)


def score(path: Path, sets: EvalSets, device: str, masks_file: Path,
          names: tuple[str, ...] = ("test", "heldout", "train")) -> dict[str, float]:
    masks = {name: correct_mask(path, sets.task, getattr(sets, name), device) for name in names}
    torch.save(masks, masks_file)
    acc = {name: 100.0 * float(m.float().mean()) for name, m in masks.items()}
    if "train" in acc:
        acc["gap"] = acc["train"] - acc["test"]
    return acc


def paired(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """B minus A in points, its paired standard error, and McNemar's exact two-sided p-value."""
    from scipy.stats import binomtest

    n = len(a)
    gain = int((~a & b).sum())
    loss = int((a & ~b).sum())
    diff = (gain - loss) / n
    se = math.sqrt(max(gain + loss - n * diff * diff, 0.0)) / n
    p = binomtest(gain, gain + loss).pvalue if gain + loss else 1.0
    return {"diff": 100 * diff, "se": 100 * se, "p": float(p), "n": n, "b_only": gain, "a_only": loss}


# ---------------------------------------------------------------------------------------------- stages


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = args.cache / tag(args)
        self.work.mkdir(parents=True, exist_ok=True)
        self.results_path = args.results or self.work / "results.json"
        self.results: dict[str, Any] = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        self.results["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        command = "python scripts/bench_paper.py " + " ".join(sys.argv[1:])
        self.results.pop("command", None)
        if command not in self.results.setdefault("commands", []):
            self.results["commands"].append(command)
        self.sets: EvalSets | None = None
        self.data_dir: Path | None = None

    def save(self, seed: int | None = None, name: str | None = None) -> None:
        """Write the results; a stage's result is merged into what is on disk, so that two processes running
        different stages of one benchmark (see --only) keep each other's results."""
        on_disk = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        if seed is not None and name is not None:
            on_disk.setdefault("seeds", {}).setdefault(str(seed), {})[name] = self.results["seeds"][str(seed)][name]
        for key, value in self.results.items():
            if key == "commands":
                on_disk[key] = on_disk.get(key, []) + [c for c in value if c not in on_disk.get(key, [])]
            elif key != "seeds":
                on_disk[key] = value
        for s, stages in self.results.get("seeds", {}).items():
            on_disk.setdefault("seeds", {}).setdefault(s, {}).update(stages)
        self.results = on_disk
        tmp = self.results_path.with_suffix(f".{id(self)}.tmp")
        tmp.write_text(json.dumps(self.results, indent=1) + "\n")
        tmp.replace(self.results_path)

    def stage(self, seed: int, name: str, fn) -> dict[str, Any]:
        """Run a stage once: its result (with its wall time) is stored and reused by later runs."""
        if self.results_path.exists():  # another process may have finished it meanwhile
            done = json.loads(self.results_path.read_text()).get("seeds", {}).get(str(seed), {})
            self.results.setdefault("seeds", {}).setdefault(str(seed), {}).update(done)
        runs = self.results.setdefault("seeds", {}).setdefault(str(seed), {})
        if name in runs:
            return runs[name]
        if self.args.only and not any(re.search(pattern, name) for pattern in self.args.only):
            return {}
        started = time.perf_counter()
        out = fn()
        out["seconds"] = time.perf_counter() - started
        runs[name] = out
        self.save(seed, name)
        print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items() if isinstance(v, float)),
              flush=True)
        return out

    def prepare(self) -> None:
        self.data_dir, heldout_dir = build_folders(self.args, self.work)
        self.sets = eval_sets(self.args.model, self.data_dir, heldout_dir)

    def tune(self) -> None:
        """Score every TUNING entry on the validation split and record the best (see TUNING)."""
        run = TuneRun(self)
        self.stage("tune", "sgd", run.regular_run)
        for name, change in TUNING.items():
            head, change = self.tuned_head(run, change)
            self.stage("tune", name, lambda n=name, h=head, c=change: run.twa(
                "tune-" + re.sub(r"[^a-z0-9.]+", "-", n.lower()), h, "center", 1e-5, variant=c, mask_name=n))
        runs = self.results["seeds"]["tune"]
        tried = [n for n in TUNING if n in runs]
        if len(tried) == len(TUNING):
            self.results["tuning"] = {"seed": TUNE_SEED, "split": TUNE_SPLIT,
                                      "best": max(tried, key=lambda n: runs[n]["val"])}
            self.save()

    def tuned_head(self, run: SeedRun, change: dict[str, Any]) -> tuple[list, dict[str, Any]]:
        """The head checkpoints a TUNING entry selects, and its SubspaceConfig changes."""
        a, change = self.args, dict(change)
        shift = min(change.pop("shift", 0), a.head - 1)
        if shift:
            change["epochs"] = a.twa_epochs + shift
        return run.head_ckpts(a.head - shift, change.pop("density", 1)), change

    def head_twa(self, seed: int, run: SeedRun, name: str, ckpts: list, **kw: Any) -> None:
        """Head-stage TWA at the paper's fixed lr (`name`) and, with --lr-check, with the check (`name-lrcheck`).

        The check only ever lowers the lr and draws its batches from a generator of its own, so where it keeps
        the lr the two runs are the same run, bit for bit: the fixed-lr stage then reuses the checked one's
        result instead of training again (about a fifth of the benchmark's time)."""
        checked: dict[str, Any] = {}
        if self.args.lr_check:
            checked = self.stage(seed, f"{name}-lrcheck", lambda: run.twa(
                f"{name}-lrcheck", ckpts, "center", 1e-5, lr_check=True, **kw))

        def fixed() -> dict[str, Any]:
            lr = checked.get("lr_check")
            if lr is None or lr["used"] != lr["requested"]:
                return run.twa(name, ckpts, "center", 1e-5, **kw)
            if (run.masks / f"{name}-lrcheck.pt").exists():
                shutil.copyfile(run.masks / f"{name}-lrcheck.pt", run.masks / f"{name}.pt")
            kept = {k: v for k, v in checked.items() if k not in ("lr_check", "seconds")}
            return kept | {"reused": f"{name}-lrcheck"}

        self.stage(seed, name, fixed)

    def run_seed(self, seed: int) -> None:
        a = self.args
        run = SeedRun(self, seed)
        self.stage(seed, "sgd", run.regular_run)
        for e in a.figure3:
            self.stage(seed, f"sgd@{e}", lambda e=e: run.score(run.epoch_ckpt(e), f"sgd@{e}", ("test",)))

        for d in a.densities:
            head = run.head_ckpts(a.head, d)
            self.stage(seed, f"head-swa-d{d}", lambda h=head, d=d: run.swa(f"head-swa-d{d}", h))
            self.head_twa(seed, run, f"head-twa-d{d}", head, per_epoch_eval=d == a.densities[0])
        for e in a.figure3:
            if e != a.head or 1 not in a.densities:
                self.head_twa(seed, run, f"head-twa-e{e}", run.head_ckpts(e, 1), full_scores=False)

        for lr in a.tail_lrs:
            t = f"lr{lr:g}"
            self.stage(seed, f"tail-sgd-{t}", lambda lr=lr: run.tail_run(lr))
            self.stage(seed, f"tail-swa-{t}", lambda lr=lr, t=t: run.swa(f"tail-swa-{t}", run.tail_ckpts(lr)))
            self.stage(seed, f"tail-twa-{t}", lambda lr=lr, t=t: run.twa(
                f"tail-twa-{t}", run.tail_ckpts(lr), "last", 5e-5))

        best = self.results.get("tuning", {}).get("best")
        if a.tune and best is not None:
            head, change = self.tuned_head(run, TUNING[best])
            self.stage(seed, "head-twa-tuned", lambda: {**run.twa("head-twa-tuned", head, "center", 1e-5,
                                                                   variant=change), "setting": best})

        if a.variants:  # the same checkpoints and settings as plain TWA, one option changed
            head = run.head_ckpts(a.head, a.densities[0])
            for v, options in VARIANTS.items():
                name = f"head-twa-d{a.densities[0]}-{v}"
                self.stage(seed, name, lambda n=name, o=options: run.twa(n, head, "center", 1e-5, variant=o))
                for lr in a.tail_lrs:
                    name = f"tail-twa-lr{lr:g}-{v}"
                    self.stage(seed, name, lambda n=name, lr=lr, o=options: run.twa(
                        n, run.tail_ckpts(lr), "last", 5e-5, variant=o))


class SeedRun:
    """The stages of one seed; each writes its outputs under CACHE/<tag>/seed<N>/ (or `folder`) under the stage's
    name."""

    def __init__(self, bench: Bench, seed: int, folder: Path | None = None):
        self.args, self.sets, self.data_dir, self.seed = bench.args, bench.sets, bench.data_dir, seed
        self.folder = folder or bench.work / f"seed{seed}"
        self.val_split = 0.0
        self.regular = self.folder / "regular"
        self.masks = self.folder / "masks"
        self.masks.mkdir(parents=True, exist_ok=True)

    def score(self, path: Path, name: str, names: tuple[str, ...] = ("test", "heldout", "train")) -> dict[str, Any]:
        return score(path, self.sets, self.args.device, self.masks / f"{name}.pt", names)

    def sample_config(self, **kw: Any) -> SampleConfig:
        a = self.args
        task = TaskRequest(model=a.model, data="imagefolder", data_dir=str(self.data_dir), val_split=self.val_split)
        return SampleConfig(task=task, weight_decay=a.weight_decay,
                            batch_size=a.batch_size, device=a.device, eval_every_epoch=False, **kw)

    def regular_run(self) -> dict[str, Any]:
        a = self.args
        cfg = self.sample_config(epochs=a.epochs, lr=a.lr, per_epoch=a.per_epoch, seed=self.seed)
        result = _sample_resumable(self.regular, cfg)
        out = self.score(self.epoch_ckpt(a.epochs), "sgd")
        out["history"] = result.history
        return out

    def epoch_ckpt(self, epoch: int) -> Path:
        return list_folder(self.regular)[epoch * self.args.per_epoch].path

    def head_ckpts(self, epochs: int, density: int) -> list:
        """The initial weights and `density` checkpoints per epoch of the first `epochs` epochs."""
        p = self.args.per_epoch
        return select_checkpoints(list_folder(self.regular), Selection(start=0, end=epochs * p + 1, every=p // density))

    def tail_run(self, lr: float) -> dict[str, Any]:
        a = self.args
        cfg = self.sample_config(epochs=a.tail_epochs, lr=lr, schedule="constant", per_epoch=1, seed=self.seed + 1000,
                                 init=str(self.epoch_ckpt(a.tail_start)))
        _sample_resumable(self.folder / f"tail-lr{lr:g}", cfg)
        return self.score(self.tail_ckpts(lr)[-1].path, f"tail-sgd-lr{lr:g}")

    def tail_ckpts(self, lr: float) -> list:
        # the tail's own, not its starting point
        return select_checkpoints(list_folder(self.folder / f"tail-lr{lr:g}"), Selection(start=1))

    def linked(self, name: str, ckpts: list) -> Path:
        """The chosen checkpoints, linked into a folder of their own: swa and train-subspace read a folder."""
        selection = self.folder / f".{name}-ckpts"
        shutil.rmtree(selection, ignore_errors=True)
        selection.mkdir(parents=True)
        for c in ckpts:
            (selection / c.path.name).symlink_to(c.path.resolve())
        return selection

    def swa(self, name: str, ckpts: list) -> dict[str, Any]:
        out = self.folder / f"{name}.safetensors"
        swa(self.linked(name, ckpts), out, SwaRequest(device=self.args.device), force=True)
        result = self.score(out, name)
        result["checkpoints"] = len(ckpts)
        return result

    def twa(self, name: str, ckpts: list, init: str, wd: float, *, full_scores: bool = True,
            per_epoch_eval: bool = False, lr_check: bool = False,
            variant: dict[str, Any] | None = None, mask_name: str | None = None) -> dict[str, Any]:
        a = self.args
        out = self.folder / name
        selection = self.linked(name, ckpts)
        options = {"epochs": a.twa_epochs, "lr": a.twa_lr, "weight_decay": wd, "batch_size": a.batch_size,
                   "init": init, "seed": self.seed, "device": a.device, "eval_every_epoch": per_epoch_eval,
                   "lr_check": lr_check, "preset": "paper"}  # the paper's algorithm: fitted on train, its end kept
        cfg = SubspaceConfig(**{**options, **(variant or {})})
        result = train_subspace(selection, out, cfg, force=True)
        scores = self.score(result.result, mask_name or name) if full_scores else {"test": result.test.accuracy}
        scores.update(checkpoints=len(ckpts), rank=len(ckpts) - len(result.report.dropped),
                      history=result.history, coefficient_sum=float(sum(result.coefficients)))
        if result.lr_check is not None:
            scores["lr_check"] = result.lr_check.to_dict()
        return scores


class TuneRun(SeedRun):
    """The tuning run: a regular run on the training subset minus a validation split, scored on that split only."""

    def __init__(self, bench: Bench):
        super().__init__(bench, TUNE_SEED, bench.work / "tune")
        self.val_split = TUNE_SPLIT
        self.val_task = image_task(self.args.model, self.data_dir, TUNE_SPLIT)
        self.val = self.val_task.dataset("val", augment=False)

    def score(self, path: Path, name: str, names: tuple[str, ...] = ()) -> dict[str, Any]:
        mask = correct_mask(path, self.val_task, self.val, self.args.device)
        torch.save({"val": mask}, self.masks / f"{name}.pt")
        return {"val": 100.0 * float(mask.float().mean())}


def _sample_resumable(out: Path, cfg: SampleConfig):
    resume = (out / "train-state.safetensors").exists()
    return sample(out, cfg, resume=resume, force=not resume)


def time_models(names: list[str], data_dir: Path, batch_size: int, rounds: int = 3, steps: int = 3) -> list[str]:
    """Seconds per training epoch of each network, measured in alternating rounds on one busy machine."""
    import torch.nn.functional as F

    tasks = {n: image_task(n, data_dir) for n in names}  # each network sized for the data
    train = tasks[names[0]].dataset("train", augment=True)
    per_epoch = -(-len(train) // batch_size)
    nets = {n: task.build_model() for n, task in tasks.items()}
    opts = {n: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for n, m in nets.items()}
    spent = {n: 0.0 for n in names}
    for _ in range(rounds):
        for n, net in nets.items():
            source = batches(tasks[n], train, batch_size, shuffle=True)
            started = time.perf_counter()
            for _, ((x, y), _weight) in zip(range(steps), source, strict=False):
                opts[n].zero_grad()
                F.cross_entropy(net(x), y).backward()
                opts[n].step()
            spent[n] += time.perf_counter() - started
    base = spent[names[0]]
    lines = ["| network | parameters | seconds per epoch | relative |", "|---|---|---|---|"]
    for n in names:
        params = sum(p.numel() for p in nets[n].parameters())
        lines.append(f"| {n} | {params:,} | {spent[n] / (rounds * steps) * per_epoch:.1f} | {spent[n] / base:.2f} |")
    return lines


# ---------------------------------------------------------------------------------------------- report


def mean_sd_of(values: list[float]) -> str:
    if not values:
        return "-"
    m = float(np.mean(values))
    return f"{m:.2f}" if len(values) < 2 else f"{m:.2f} ± {float(np.std(values, ddof=1)):.2f}"


def pooled_masks(work: Path, seeds: list[str], name: str) -> dict[str, torch.Tensor] | None:
    """Test, held-out and both together ("all"), over every seed, in one order."""
    parts: dict[str, list[torch.Tensor]] = {"test": [], "heldout": []}
    for s in seeds:
        f = work / f"seed{s}" / "masks" / f"{name}.pt"
        if not f.exists():
            return None
        m = torch.load(f)
        for k in parts:
            parts[k].append(m[k])
    out = {k: torch.cat(v) for k, v in parts.items()}
    out["all"] = torch.cat([out["test"], out["heldout"]])
    return out


def compare(work: Path, seeds: list[str], a: str, b: str) -> dict[str, dict[str, float]] | None:
    """Paired differences over the seeds that have both models."""
    seeds = [s for s in seeds if all((work / f"seed{s}" / "masks" / f"{m}.pt").exists() for m in (a, b))]
    if not seeds:
        return None
    ma, mb = pooled_masks(work, seeds, a), pooled_masks(work, seeds, b)
    if ma is None or mb is None:
        return None
    return {k: paired(ma[k], mb[k]) for k in ma}


def fmt_diff(d: dict[str, float]) -> str:
    return f"{d['diff']:+.2f} ± {d['se']:.2f} (p={d['p']:.2g})"


def report(results: dict[str, Any], work: Path) -> list[str]:
    """The tables, the differences with their paired noise, and the targets, as markdown lines."""
    cfg = results["config"]
    last = f"tail-twa-lr{cfg['tail_lrs'][-1]:g}"
    started = sorted(s for s in results.get("seeds", {}) if s.isdigit())
    seeds = [s for s in started if last in results["seeds"][s]]
    lines: list[str] = []
    if len(seeds) < len(started):
        partial = [s for s in started if s not in seeds]
        lines += [f"(seeds {', '.join(partial)} unfinished: left out of the tables; their stages are in the JSON)", ""]
    if not seeds:
        seeds = started  # nothing complete yet: show what there is
    runs = [results["seeds"][s] for s in seeds]

    def col(name: str, key: str) -> list[float]:
        return [r[name][key] for r in runs if name in r and key in r[name]]

    def same(name: str, other: str, key: str) -> list[float]:  # `name` over the seeds that also have `other`
        return [r[name][key] for r in runs if name in r and other in r and key in r[name]]

    def mean_sd(values: list[float]) -> str:
        """Mean (± standard deviation over seeds), marked when not every seed has the figure."""
        text = mean_sd_of(values)
        return text if len(values) in (0, len(runs)) else f"{text} ({len(values)} of {len(runs)} seeds)"

    def row(label: str, name: str, epochs: str) -> str:
        return (f"| {label} | {epochs} | {mean_sd(col(name, 'test'))} | {mean_sd(col(name, 'heldout'))} | "
                f"{mean_sd(col(name, 'train'))} | {mean_sd(col(name, 'gap'))} |")

    e, head, twa_e = cfg["epochs"], cfg["head"], cfg["twa_epochs"]
    lines += [f"seeds: {', '.join(seeds)}; {cfg['model']}, {cfg['train_per_class']} training images per class", ""]
    header = ["| method | epochs | test acc % | held-out acc % | train acc % | gap (train - test) |",
              "|---|---|---|---|---|---|"]
    lines += ["### Head stage (Table 3)", "", *header]
    lines.append(row(f"SGD ({e} epochs)", "sgd", str(e)))
    for d in cfg["densities"]:
        lines.append(row(f"SWA (0..{head}, {d}/epoch)", f"head-swa-d{d}", str(head)))
        lines.append(row(f"TWA ({head} + {twa_e}, {d}/epoch)", f"head-twa-d{d}", f"{head}+{twa_e}"))
    tuned = results.get("tuning", {}).get("best")
    if tuned and col("head-twa-tuned", "test"):
        shift = min(TUNING[tuned].get("shift", 0), head - 1)
        lines.append(row(f"TWA, tuned on validation: {tuned}", "head-twa-tuned", f"{head - shift}+{twa_e + shift}"))
    lines.append("")

    lines += ["### Figure 3: TWA over the first epochs (test acc %)", "",
              f"| epochs of checkpoints | SGD at that epoch | TWA (+{twa_e} epochs, lr {cfg['twa_lr']:g}) "
              "| TWA with --lr-check | lr used |", "|---|---|---|---|---|"]
    for epoch in cfg["figure3"]:
        twa_name = "head-twa-d1" if epoch == head and 1 in cfg["densities"] else f"head-twa-e{epoch}"
        used = [r[f"{twa_name}-lrcheck"]["lr_check"]["used"] for r in runs if f"{twa_name}-lrcheck" in r]
        lines.append(f"| {epoch} | {mean_sd(col(f'sgd@{epoch}', 'test'))} | {mean_sd(col(twa_name, 'test'))} "
                     f"| {mean_sd(col(f'{twa_name}-lrcheck', 'test'))} | {mean_sd(used)} |")
    lines.append(f"| {e} (SGD final) | {mean_sd(col('sgd', 'test'))} | | | |")
    lines.append("")

    first = f"head-twa-d{cfg['densities'][0]}"
    hist = [r[first].get("history", []) for r in runs if first in r]
    if hist and all("test_acc" in h for h in hist[0]):
        lines += [f"TWA per-epoch test accuracy ({first}, BatchNorm recomputed before each figure): "
                  + "; ".join(f"epoch {h['epoch']}: " + mean_sd([hs[i]["test_acc"] for hs in hist])
                              for i, h in enumerate(hist[0])), ""]

    if any(f"head-twa-d{d}-lrcheck" in r for r in runs for d in cfg["densities"]):
        lines += ["### Head-stage TWA with the sharpness check (train-subspace --lr-check)", "",
                  f"| checkpoints per epoch | sharpness | stable lr limit | lr used "
                  f"| test acc % (lr {cfg['twa_lr']:g}) | "
                  f"test acc % (checked) | held-out acc % (lr {cfg['twa_lr']:g}) | held-out acc % (checked) |",
                  "|---|---|---|---|---|---|---|---|"]
        for d in cfg["densities"]:
            name = f"head-twa-d{d}-lrcheck"
            checks = [r[name]["lr_check"] for r in runs if name in r]
            if not checks:
                continue
            lines.append(f"| {d} | {mean_sd([c['sharpness'] for c in checks])} "
                         f"| {mean_sd([c['limit'] for c in checks])} "
                         f"| {mean_sd([c['used'] for c in checks])} "
                         f"| {mean_sd(same(f'head-twa-d{d}', name, 'test'))} | "
                         f"{mean_sd(col(name, 'test'))} | {mean_sd(same(f'head-twa-d{d}', name, 'heldout'))} | "
                         f"{mean_sd(col(name, 'heldout'))} |")
        lines.append("")

    lines += tuning_report(results, work)

    lines += ["### Tail stage (Table 1)", "", *header]
    for lr in cfg["tail_lrs"]:
        t = f"lr{lr:g}"
        lines.append(row(f"SGD tail, lr {lr:g}", f"tail-sgd-{t}", f"{cfg['tail_start']}+{cfg['tail_epochs']}"))
        lines.append(row(f"SWA tail, lr {lr:g}", f"tail-swa-{t}", f"{cfg['tail_start']}+{cfg['tail_epochs']}"))
        lines.append(row(f"TWA tail, lr {lr:g}", f"tail-twa-{t}", f"{cfg['tail_start']}+{cfg['tail_epochs']}+{twa_e}"))
    lines.append("")

    lines += ["### Paired differences (B - A, points ± standard error, McNemar p), pooled over seeds", "",
              "| A | B | test | held-out | both (test + held-out) | images |", "|---|---|---|---|---|---|"]
    pairs = [("sgd", f"head-twa-d{d}") for d in cfg["densities"]]
    pairs += [(f"head-swa-d{d}", f"head-twa-d{d}") for d in cfg["densities"]]
    pairs += [(f"head-twa-d{d}", f"head-twa-d{d}-lrcheck") for d in cfg["densities"]]
    pairs += [(f"tail-swa-lr{lr:g}", f"tail-twa-lr{lr:g}") for lr in cfg["tail_lrs"]]
    pairs += [("sgd", "head-twa-tuned"), ("head-twa-d1", "head-twa-tuned"), ("head-swa-d1", "head-twa-tuned")]
    diffs: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for a, b in pairs:
        d = compare(work, seeds, a, b)
        if d is not None:
            diffs[(a, b)] = d
            lines.append(f"| {a} | {b} | {fmt_diff(d['test'])} | {fmt_diff(d['heldout'])} | {fmt_diff(d['all'])} "
                         f"| {d['all']['n']:,} |")
    lines.append("")

    if any(k.endswith("-affine") for r in runs for k in r):
        lines += ["### Variants of train-subspace against plain TWA (same checkpoints and settings)", "",
                  "| stage | variant | test acc % | held-out acc % | gap | seconds | B - A on test + held-out |",
                  "|---|---|---|---|---|---|---|"]
        stages = [f"head-twa-d{cfg['densities'][0]}"] + [f"tail-twa-lr{lr:g}" for lr in cfg["tail_lrs"]]
        for stage in stages:
            for v in ("", *VARIANTS):
                name = f"{stage}-{v}" if v else stage
                d = compare(work, seeds, stage, name) if v else None
                lines.append(f"| {stage} | {v or 'plain'} | {mean_sd(col(name, 'test'))} | "
                             f"{mean_sd(col(name, 'heldout'))} | {mean_sd(col(name, 'gap'))} | "
                             f"{mean_sd(col(name, 'seconds'))} | {fmt_diff(d['all']) if d else ''} |")
        lines.append("")

    lines += ["### Targets (judged on test + held-out images together, pooled over seeds)", ""]
    lines += targets(cfg, diffs, col)
    lines.append("")

    lines += ["### Wall time per stage (seconds, mean over seeds)", "", "| stage | seconds |", "|---|---|"]
    names = list(runs[0]) if runs else []
    for name in names:
        lines.append(f"| {name} | {np.mean([r[name]['seconds'] for r in runs if name in r]):.0f} |")
    return lines


def tuning_report(results: dict[str, Any], work: Path) -> list[str]:
    runs = results.get("seeds", {}).get("tune", {})
    if not runs:
        return []
    masks = {n: work / "tune" / "masks" / f"{n}.pt" for n in ("sgd", *TUNING)}
    base = torch.load(masks["paper defaults"])["val"] if masks["paper defaults"].exists() else None
    title = (f"### Head stage: settings tried on a validation split ({TUNE_SPLIT:.0%} of the training subset, "
             f"a regular run of its own, seed {TUNE_SEED})")
    lines = [title, "",
             "| setting | validation acc % | minus paper defaults (McNemar) | lr used | seconds |",
             "|---|---|---|---|---|"]
    for name in ("sgd", *TUNING):
        if name not in runs:
            continue
        diff = ""
        if base is not None and name != "paper defaults" and masks[name].exists():
            diff = fmt_diff(paired(base, torch.load(masks[name])["val"]))
        used = runs[name].get("lr_check", {}).get("used")
        label = f"SGD, {results['config']['epochs']} epochs (reference)" if name == "sgd" else name
        lines.append(f"| {label} | {runs[name]['val']:.2f} | {diff} | {f'{used:.2f}' if used else ''} "
                     f"| {runs[name]['seconds']:.0f} |")
    best = results.get("tuning", {}).get("best")
    lines += ["", f"Chosen (highest validation accuracy): {best}" if best else "(tuning unfinished)", ""]
    return lines


def targets(cfg: dict[str, Any], diffs, col) -> list[str]:
    lines = []

    def verdict(ok: bool | None, d: dict[str, float] | None = None) -> str:
        if ok is None:
            return "not measured"
        noisy = d is not None and d["p"] > 0.05
        note = f" (the difference is within the noise, p = {d['p']:.2g})" if noisy else ""
        return ("MET" if ok else "NOT MET") + note

    d1 = f"head-twa-d{min(cfg['densities'])}" if 1 not in cfg["densities"] else "head-twa-d1"
    s1 = d1.replace("twa", "swa")
    vs_sgd = diffs.get(("sgd", d1))
    vs_swa = diffs.get((s1, d1))
    saved = 1 - (cfg["head"] + cfg["twa_epochs"]) / cfg["epochs"]
    if vs_sgd is not None:
        ok = vs_sgd["all"]["diff"] >= -0.1
        lines.append(f"- Head: TWA ({cfg['head']}+{cfg['twa_epochs']} epochs, {saved:.0%} of the epochs saved) within "
                     f"0.1 points of SGD at {cfg['epochs']}: {fmt_diff(vs_sgd['all'])} -> {verdict(ok, vs_sgd['all'])}")
    else:
        lines.append("- Head: TWA vs SGD: not measured")
    tuned = diffs.get(("sgd", "head-twa-tuned"))
    if tuned is not None:
        ok = tuned["all"]["diff"] >= -0.1
        lines.append(f"- Head, with the setting chosen on the validation split: TWA within 0.1 points of SGD at "
                     f"{cfg['epochs']}: {fmt_diff(tuned['all'])} -> {verdict(ok, tuned['all'])}")
    if vs_swa is not None:
        lines.append(f"- Head: TWA beats SWA over the same checkpoints: {fmt_diff(vs_swa['all'])} -> "
                     f"{verdict(vs_swa['all']['diff'] > 0, vs_swa['all'])}")
    for lr, rule, word in ((cfg["tail_lrs"][0], lambda x: x >= 0, "at least matches"),
                           (cfg["tail_lrs"][-1], lambda x: x > 0, "beats")):
        d = diffs.get((f"tail-swa-lr{lr:g}", f"tail-twa-lr{lr:g}"))
        text = fmt_diff(d["all"]) if d else "-"
        ok = rule(d["all"]["diff"]) if d else None
        lines.append(f"- Tail, lr {lr:g}: TWA {word} SWA: {text} -> {verdict(ok, d['all'] if d else None)}")
    gap_sgd, gap_twa = col("sgd", "gap"), col(d1, "gap")
    if gap_sgd and gap_twa:
        ok = float(np.mean(gap_twa)) <= float(np.mean(gap_sgd))
        lines.append(f"- Gap: TWA's generalization gap ({np.mean(gap_twa):.2f}) no larger than SGD's "
                     f"({np.mean(gap_sgd):.2f}) -> {verdict(ok)}")
    return lines


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    if args.time_models:
        data_dir, _ = build_folders(args, bench.work)
        print("\n".join(time_models(args.time_models, data_dir, args.batch_size)))
        return 0
    if not args.report:
        print(f"working in {bench.work}; results in {bench.results_path}", flush=True)
        started = time.perf_counter()
        bench.prepare()
        bench.results["environment"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                        "commit": git_commit()}
        if args.tune:
            bench.tune()
        for seed in args.seeds:
            bench.run_seed(seed)
        bench.results["total_seconds"] = bench.results.get("total_seconds", 0.0) + time.perf_counter() - started
        bench.save()
    if "seeds" not in bench.results:
        print("no results yet")
        return 1
    print("\n".join(report(bench.results, bench.work)))
    return 0


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
