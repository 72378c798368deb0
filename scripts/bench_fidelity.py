#!/usr/bin/env python
"""Does `twa train-subspace RUN`, with default flags, win on the runs people have? (issue: wins by default)

Seven runs from five model families, each written by the tool that writes such runs in practice, over several
seeds. On each, the user's view: the final checkpoint, SWA (`twa swa RUN`) and TWA (`twa train-subspace RUN`),
both with no tuning flag (only the selection of checkpoints, the data, and the subspace phase's budget in
epochs, which the protocol fixes), and TWA under `--preset paper` (the paper's algorithm and defaults). Every
model is scored here on a test split no command saw; each difference comes with its paired noise.

  digits-head       twa sample, small-cnn on scikit-learn's digits, 12 epochs; the checkpoints of the first 6
  cifar-head        twa sample, small-cnn on 10,000 CIFAR-10 images, 40 epochs; the checkpoints of the first 20
  cifar-tail        the same run continued 10 epochs at a constant lr 0.1 from epoch 30; those 10 checkpoints
  sst2-head         transformers.Trainer, BERT on 8,000 SST-2 sentences, 10 epochs; the first 5 epochs'
  sst2-overfit      transformers.Trainer, BERT on 2,000 SST-2 sentences, 4 epochs; all 8 checkpoints
  shakespeare-tail  transformers.Trainer, GPT-2 on Tiny Shakespeare, 6 epochs at a constant lr; the last 2'
  timm-mnist        timm (create_model, create_optimizer_v2, CheckpointSaver, ModelEmaV3) on MNIST, 6 epochs
  lightning-mnist   lightning.Trainer with ModelCheckpoint, an MLP LightningModule on MNIST, 8 epochs

Each data set is cut into parts every seed shares: `train` (the run learns from it), `val` (the user's
validation data, given to the tool as the run's own folder layout or `--val-data`; digits has none, so the tool
holds out part of the training data itself), `dev` (used only to choose the tool's defaults, with the
development seed; never reported) and `test` (reported; no command sees it).

    python scripts/bench_fidelity.py --seeds 100 --only build      # the development seed's runs
    nohup python scripts/bench_fidelity.py > .cache/fidelity.log 2>&1 &   # seeds 0 1 2, every stage
    python scripts/bench_fidelity.py --report                       # the tables of the results so far

Results go to CACHE/results.json after every stage; a rerun skips the stages already done.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                     ("TOKENIZERS_PARALLELISM", "false"), ("WANDB_DISABLED", "true")):
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_paper import git_commit, paired  # noqa: E402
from bench_text import (  # noqa: E402
    SHAKESPEARE_FILE,
    SST2_DIR,
    bert_bpe_tokenizer,
    blocks_of,
    byte_bpe_tokenizer,
    finished,
    lm_collate,
    load_tokenizer,
    paired_blocks,
    quiet_transformers,
    read_tsv,
    train_with_trainer,
    write_tsv,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent
CIFAR_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10-jpg.tar.gz"
DEV_SEED = 100
METHODS = ("swa", "twa", "twa-paper")


# ---------------------------------------------------------------------------------------------- the CLI


class TwaFailed(RuntimeError):
    pass


def twa(argv: list[str], threads: int, env_extra: dict[str, str] | None = None) -> tuple[dict[str, Any], str, float]:
    """`twa ARGV --json` from this checkout, as a user runs it: (its JSON summary, the command, seconds)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(SCRIPTS)])
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.update(env_extra or {})
    argv = [str(a) for a in argv] + ["--json"]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "twa_cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)
    seconds = time.perf_counter() - started
    command = "twa " + " ".join(argv)
    if proc.returncode != 0:
        raise TwaFailed(f"{command}\nexit status {proc.returncode}; stderr ends:\n{proc.stderr[-3000:]}")
    try:
        return json.loads(proc.stdout), command, seconds
    except json.JSONDecodeError as exc:
        raise TwaFailed(f"{command}\n--json printed no JSON ({exc}); stdout:\n{proc.stdout[:2000]}") from exc


def shown(command: str, cache: Path) -> str:
    return command.replace(str(cache), "$CACHE").replace(str(ROOT.parent / "shared"), "$SHARED")


# ---------------------------------------------------------------------------------------------- families


class Family:
    """One kind of run: its data (fixed across seeds), how a seed's run is written, which checkpoints are
    averaged, the flags a user gives, and the scoring of a model on the test (or dev) split."""

    name: str
    kind = "accuracy"  # or "lm": per-block losses
    has_dev = True  # a dev split to choose defaults on (digits is too small to have one)
    budget: tuple[str, ...] = ()  # the subspace phase's length, fixed by the protocol (the same for every TWA)

    def __init__(self, cache: Path, threads: int):
        self.cache = cache
        self.threads = threads
        self.work = cache / self.name

    def folder(self, seed: int) -> Path:
        return self.work / f"seed{seed}"

    def prepare(self) -> None:
        """The data parts, once."""

    def build(self, seed: int) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, seed: int) -> Path:
        """The folder the user points twa at."""
        return self.folder(seed) / "run"

    def selection(self, seed: int) -> list[str]:
        return []

    def data_flags(self) -> list[str]:
        return []

    def finals(self, seed: int) -> dict[str, Path]:
        """The run's own models to compare with: `final` (the last checkpoint averaged) and, for a head, `full`
        (the last checkpoint of the whole run)."""
        raise NotImplementedError

    def score(self, path: Path, split: str = "test") -> dict[str, torch.Tensor]:
        raise NotImplementedError


# ---- images written by `twa sample`


class ImageScoring:
    """Per-image correctness of a classifier file twa can read, on an image folder of the family's."""

    def image_sets(self) -> dict[str, Any]:
        raise NotImplementedError

    def network(self, path: Path) -> torch.nn.Module:
        from twa_cli.io.checkpoints import load_tensors, read_checkpoint
        from twa_cli.tasks.models import build_model, load_weights

        ckpt = read_checkpoint(path)
        net = build_model(ckpt.arch)
        load_weights(net, load_tensors(ckpt), str(path))
        return net

    @torch.no_grad()
    def score(self, path: Path, split: str = "test") -> dict[str, torch.Tensor]:
        net = self.network(path).eval()
        data = self.image_sets()[split]
        correct, loss = [], []
        for i in range(0, len(data), 500):
            index = torch.arange(i, min(i + 500, len(data)))
            x, y = (data.tensors[0][index], data.tensors[1][index]) if hasattr(data, "tensors") else data.batch(index)
            logits = net(x).double()
            correct.append(logits.argmax(1) == y)
            loss.append(F.cross_entropy(logits, y, reduction="none"))
        return {"correct": torch.cat(correct), "loss": torch.cat(loss)}


def _image_tensors(folder: Path, reference: Path, channels: int) -> Any:
    from twa_cli.tasks.images import ImageTensors, decoded_folder

    images, labels = decoded_folder(folder, reference=reference)
    mean, std = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)) if channels == 3 else ((0.5,), (0.5,))
    return ImageTensors(images, labels, mean, std)


class DigitsHead(ImageScoring, Family):
    name = "digits-head"
    has_dev = False
    budget = ("--epochs", "3")
    EPOCHS, PER_EPOCH = 12, 2

    def build(self, seed: int) -> dict[str, Any]:
        run = self.run(seed)
        if (run / "metrics.jsonl").exists() and len(list(run.glob("ckpt-*.safetensors"))) == 1 + self.EPOCHS * 2:
            return {"reused": True}
        _, command, seconds = twa(["sample", run, "--model", "small-cnn", "--data", "digits", "--epochs", self.EPOCHS,
                                   "--per-epoch", self.PER_EPOCH, "--seed", seed, "--force"], self.threads)
        return {"command": shown(command, self.cache), "train_seconds": seconds}

    def selection(self, seed: int) -> list[str]:
        return ["--end", str(1 + self.EPOCHS // 2 * self.PER_EPOCH)]

    def finals(self, seed: int) -> dict[str, Path]:
        files = sorted(self.run(seed).glob("ckpt-*.safetensors"))
        return {"final": files[self.EPOCHS // 2 * self.PER_EPOCH], "full": files[-1]}

    def image_sets(self) -> dict[str, Any]:
        from twa_cli.tasks.resolve import TaskRequest, resolve_task

        task = resolve_task(TaskRequest(model="small-cnn", data="digits"))
        return {"test": task.dataset("test", augment=False)}


class Cifar(ImageScoring, Family):
    """10,000 CIFAR-10 training images (1000 a class) in an image folder with train/, val/ (200 a class, from the
    training images the subset leaves out) and test/ (the 10,000 test images); dev/ (300 a class) and the extra
    test images heldout/ (2000 a class) are more of the left-out training images, beside the folder."""

    EPOCHS, PER_EPOCH, TAIL_START, TAIL_EPOCHS, TAIL_LR = 40, 2, 30, 10, 0.1
    PARTS: ClassVar[dict[str, int]] = {"train": 1000, "val": 200, "dev": 300, "heldout": 2000}
    budget = ("--epochs", "4")

    def __init__(self, cache: Path, threads: int):
        super().__init__(cache, threads)
        self.shared = cache / "cifar"  # both cifar families share the data and the regular runs
        self.data = self.shared / "data"

    def prepare(self) -> None:
        import tarfile

        if (self.shared / "data.done").exists():
            return
        source = self.shared / "cifar10"
        if not (source / "train").is_dir():
            source.mkdir(parents=True, exist_ok=True)
            with tarfile.open(CIFAR_ARCHIVE) as tar:
                tar.extractall(source, filter="data")
        rng = np.random.RandomState(0)
        for cls in sorted(p.name for p in (source / "train").iterdir() if p.is_dir()):
            files = sorted((source / "train" / cls).iterdir())
            order = rng.permutation(len(files))
            start = 0
            for part, n in self.PARTS.items():
                target = self.data / part if part in ("train", "val") else self.shared / part
                _link(target / cls, [files[i] for i in order[start : start + n]])
                start += n
            _link(self.data / "test" / cls, sorted((source / "test" / cls).iterdir()))
        (self.shared / "data.done").write_text("")

    def sgd_run(self, seed: int) -> Path:
        return self.shared / f"seed{seed}" / "run"

    def tail_run(self, seed: int) -> Path:
        return self.shared / f"seed{seed}" / f"tail-lr{self.TAIL_LR:g}"

    def build(self, seed: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        run, tail = self.sgd_run(seed), self.tail_run(seed)
        if len(list(run.glob("ckpt-*.safetensors"))) != 1 + self.EPOCHS * self.PER_EPOCH:
            resume = ["--resume"] if (run / "train-state.safetensors").exists() else ["--force"]
            _, command, seconds = twa(["sample", run, "--model", "small-cnn", "--data", "imagefolder", "--data-dir",
                                       self.data, "--epochs", self.EPOCHS, "--per-epoch", self.PER_EPOCH, "--seed",
                                       seed, "--no-eval-every-epoch", *resume], self.threads)
            out.update(command=shown(command, self.cache), train_seconds=seconds)
        if len(list(tail.glob("ckpt-*.safetensors"))) != 1 + self.TAIL_EPOCHS:
            start = sorted(run.glob("ckpt-*.safetensors"))[self.TAIL_START * self.PER_EPOCH]
            _, command, seconds = twa(["sample", tail, "--model", "small-cnn", "--data", "imagefolder", "--data-dir",
                                       self.data, "--init", start, "--epochs", self.TAIL_EPOCHS, "--lr", self.TAIL_LR,
                                       "--schedule", "constant", "--per-epoch", 1, "--seed", seed + 1000,
                                       "--no-eval-every-epoch", "--force"], self.threads)
            out.update(tail_command=shown(command, self.cache), tail_seconds=seconds)
        return out or {"reused": True}

    def image_sets(self) -> dict[str, Any]:
        if not hasattr(self, "_sets"):
            test = _image_tensors(self.data / "test", self.data / "train", 3)
            heldout = _image_tensors(self.shared / "heldout", self.data / "train", 3)
            from twa_cli.tasks.images import ImageTensors

            both = ImageTensors(torch.cat([test.images, heldout.images]), torch.cat([test.targets, heldout.targets]),
                                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
            self._sets = {"test": both, "dev": _image_tensors(self.shared / "dev", self.data / "train", 3)}
        return self._sets


class CifarHead(Cifar):
    name = "cifar-head"

    def run(self, seed: int) -> Path:
        return self.sgd_run(seed)

    def selection(self, seed: int) -> list[str]:
        return ["--end", str(1 + self.EPOCHS // 2 * self.PER_EPOCH)]

    def finals(self, seed: int) -> dict[str, Path]:
        files = sorted(self.sgd_run(seed).glob("ckpt-*.safetensors"))
        return {"final": files[self.EPOCHS // 2 * self.PER_EPOCH], "full": files[-1]}


class CifarTail(Cifar):
    name = "cifar-tail"

    def build(self, seed: int) -> dict[str, Any]:
        return {"shared": "cifar-head"}

    def run(self, seed: int) -> Path:
        return self.tail_run(seed)

    def selection(self, seed: int) -> list[str]:
        return ["--start", "1"]  # the tail's own checkpoints, not its starting point

    def finals(self, seed: int) -> dict[str, Path]:
        return {"final": sorted(self.tail_run(seed).glob("ckpt-*.safetensors"))[-1]}


def _link(folder: Path, files: list[Path]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        link = folder / f.name
        if not link.exists():
            link.symlink_to(f.resolve())


# ---- transformers.Trainer runs


class SST2(Family):
    """BERT (2 layers, hidden 128, BPE of 4,000 tokens trained on its training sentences) from scratch with the
    Trainer (AdamW lr 1e-3, linear decay, batch 32, a checkpoint every half epoch). val: SST-2 dev (872
    sentences); test: SST-2 test (1,821, labelled); dev: 2,000 training sentences outside every subset."""

    SENTENCES = 8000
    EPOCHS = 10
    HIDDEN, LAYERS, VOCAB, MAX_LENGTH, BATCH, LR = 128, 2, 4000, 64, 32, 1e-3

    def prepare(self) -> None:
        data = self.work / "data"
        self.files = {part: data / f"{part}.tsv" for part in ("train", "val", "dev", "test")}
        self.tokenizer_dir = data / "tokenizer"
        if not (data / "done").exists():
            _, rows = read_tsv(SST2_DIR / "train.tsv.gz")
            order = random.Random(0).sample(range(len(rows)), len(rows))
            train = [rows[i] for i in sorted(order[: self.SENTENCES])]
            dev = [rows[i] for i in sorted(order[-2000:])]
            write_tsv(self.files["train"], "label\tsentence", train)
            write_tsv(self.files["dev"], "label\tsentence", dev)
            write_tsv(self.files["val"], "label\tsentence", read_tsv(SST2_DIR / "dev.tsv.gz")[1])
            write_tsv(self.files["test"], "label\tsentence", read_tsv(SST2_DIR / "test.tsv.gz")[1])
            bert_bpe_tokenizer([s for _, s in train], self.VOCAB, self.MAX_LENGTH).save_pretrained(
                str(self.tokenizer_dir))
            (data / "done").write_text("")
        self.rows = {part: read_tsv(path)[1] for part, path in self.files.items()}

    @property
    def half_epoch(self) -> int:
        return self.SENTENCES // self.BATCH // 2

    @property
    def steps(self) -> int:
        return 2 * self.half_epoch * self.EPOCHS

    def build(self, seed: int) -> dict[str, Any]:
        from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding, set_seed

        run = self.run(seed)
        if finished(run, self.steps):
            return {"reused": True}
        quiet_transformers()
        torch.set_num_threads(self.threads)
        tokenizer = load_tokenizer(self.tokenizer_dir)
        rows = self.rows["train"]
        encoded = tokenizer([s for _, s in rows], truncation=True, max_length=self.MAX_LENGTH)
        train = [{**{k: v[i] for k, v in encoded.items()}, "labels": y} for i, (y, _) in enumerate(rows)]
        set_seed(seed)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=self.HIDDEN, num_hidden_layers=self.LAYERS,
                            num_attention_heads=2, intermediate_size=2 * self.HIDDEN,
                            max_position_embeddings=self.MAX_LENGTH, type_vocab_size=1, num_labels=2,
                            pad_token_id=tokenizer.pad_token_id)
        started = time.perf_counter()
        out = train_with_trainer(BertForSequenceClassification(config), tokenizer, run, seed, train,
                                 DataCollatorWithPadding(tokenizer), num_train_epochs=self.EPOCHS,
                                 per_device_train_batch_size=self.BATCH, learning_rate=self.LR,
                                 lr_scheduler_type="linear", warmup_steps=self.half_epoch,
                                 save_steps=self.half_epoch, logging_steps=self.half_epoch)
        if out["steps"] != self.steps:
            raise RuntimeError(f"the Trainer ran {out['steps']} steps, not {self.steps}")
        return {**out, "train_seconds": time.perf_counter() - started}

    def data_flags(self) -> list[str]:
        return ["--data", str(self.files["train"]), "--val-data", str(self.files["val"])]

    def finals(self, seed: int) -> dict[str, Path]:
        return {"final": self.run(seed) / f"checkpoint-{self.steps}"}

    @torch.no_grad()
    def score(self, path: Path, split: str = "test") -> dict[str, torch.Tensor]:
        from transformers import AutoModelForSequenceClassification

        quiet_transformers()
        tokenizer = load_tokenizer(self.tokenizer_dir)
        model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
        rows = self.rows[split]
        correct, losses = [], []
        for i in range(0, len(rows), 128):
            chunk = rows[i : i + 128]
            enc = tokenizer([s for _, s in chunk], truncation=True, max_length=self.MAX_LENGTH, padding=True,
                            return_tensors="pt")
            labels = torch.tensor([y for y, _ in chunk])
            logits = model(**enc).logits.double()
            correct.append(logits.argmax(-1) == labels)
            losses.append(F.cross_entropy(logits, labels, reduction="none"))
        return {"correct": torch.cat(correct), "loss": torch.cat(losses)}


class SST2Head(SST2):
    name = "sst2-head"
    budget = ("--epochs", "2")

    def selection(self, seed: int) -> list[str]:
        return ["--end-step", str(self.steps // 2 + 1)]

    def finals(self, seed: int) -> dict[str, Path]:
        return {"final": self.run(seed) / f"checkpoint-{self.steps // 2}",
                "full": self.run(seed) / f"checkpoint-{self.steps}"}


class SST2Overfit(SST2):
    name = "sst2-overfit"
    SENTENCES = 2000
    EPOCHS = 4
    budget = ("--epochs", "4")


class ShakespeareTail(Family):
    """GPT-2 (2 layers, n_embd 128, tied embeddings, byte-level BPE of 1,024 tokens) from scratch with the
    Trainer at a constant lr 2e-3 after warmup, batch 32, 6 epochs, 4 checkpoints an epoch; TWA and SWA over
    the last 2 epochs' 8. The text: train the first 80%, val the next 5%, dev the next 5%, test the last 10%."""

    name = "shakespeare-tail"
    kind = "lm"
    budget = ("--epochs", "1")
    EPOCHS, TAIL_EPOCHS, SAVES, BLOCK, VOCAB, EMBD, LAYERS, BATCH, LR = 6, 2, 4, 128, 1024, 128, 2, 32, 2e-3
    CUTS: ClassVar[dict[str, tuple[float, float]]] = {
        "train": (0.0, 0.80), "val": (0.80, 0.85), "dev": (0.85, 0.90), "test": (0.90, 1.0)}

    def prepare(self) -> None:
        data = self.work / "data"
        self.files = {part: data / f"{part}.txt" for part in self.CUTS}
        self.tokenizer_dir = data / "tokenizer"
        if not (data / "done").exists():
            with gzip.open(SHAKESPEARE_FILE, "rt", encoding="utf-8") as fh:
                text = fh.read()
            data.mkdir(parents=True, exist_ok=True)
            for part, (lo, hi) in self.CUTS.items():
                self.files[part].write_text(text[int(lo * len(text)) : int(hi * len(text))], encoding="utf-8")
            byte_bpe_tokenizer(self.files["train"].read_text(encoding="utf-8"), self.VOCAB, self.BLOCK
                               ).save_pretrained(str(self.tokenizer_dir))
            (data / "done").write_text("")
        tokenizer = load_tokenizer(self.tokenizer_dir)
        self.blocks = {part: blocks_of(tokenizer, path.read_text(encoding="utf-8"), self.BLOCK)
                       for part, path in self.files.items()}

    @property
    def every(self) -> int:
        return len(self.blocks["train"]) // self.BATCH // self.SAVES

    @property
    def steps(self) -> int:
        return self.every * self.SAVES * self.EPOCHS

    def build(self, seed: int) -> dict[str, Any]:
        from transformers import GPT2Config, GPT2LMHeadModel, set_seed

        run = self.run(seed)
        if finished(run, self.steps):
            return {"reused": True}
        quiet_transformers()
        torch.set_num_threads(self.threads)
        tokenizer = load_tokenizer(self.tokenizer_dir)
        set_seed(seed)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=self.BLOCK, n_embd=self.EMBD, n_layer=self.LAYERS,
                            n_head=4, tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, use_cache=False)
        started = time.perf_counter()
        # Whole batches of whole save intervals: the Trainer's epochs end on a checkpoint, so the tail is
        # exactly the last TAIL_EPOCHS epochs' checkpoints (the few blocks left over are not trained on).
        train = self.blocks["train"][: self.steps // self.EPOCHS * self.BATCH]
        out = train_with_trainer(GPT2LMHeadModel(config), tokenizer, run, seed,
                                 [{"input_ids": b} for b in train], lm_collate,
                                 num_train_epochs=self.EPOCHS, per_device_train_batch_size=self.BATCH,
                                 learning_rate=self.LR, lr_scheduler_type="constant_with_warmup",
                                 warmup_steps=self.every, save_steps=self.every, logging_steps=self.every)
        if out["steps"] != self.steps:
            raise RuntimeError(f"the Trainer ran {out['steps']} steps, not {self.steps}")
        return {**out, "train_seconds": time.perf_counter() - started}

    def selection(self, seed: int) -> list[str]:
        return ["--start-step", str(self.every * self.SAVES * (self.EPOCHS - self.TAIL_EPOCHS) + 1)]

    def data_flags(self) -> list[str]:
        return ["--data", str(self.files["train"]), "--val-data", str(self.files["val"]),
                "--block-size", str(self.BLOCK)]

    def finals(self, seed: int) -> dict[str, Path]:
        return {"final": self.run(seed) / f"checkpoint-{self.steps}"}

    @torch.no_grad()
    def score(self, path: Path, split: str = "test") -> dict[str, torch.Tensor]:
        from transformers import AutoModelForCausalLM

        quiet_transformers()
        model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        blocks = self.blocks[split]
        loss, correct = [], []
        for i in range(0, len(blocks), 64):
            x = blocks[i : i + 64]
            logits = model(input_ids=x).logits[:, :-1].double()
            target = x[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
            loss.append(nll.view(target.shape).sum(1))
            correct.append((logits.argmax(-1) == target).sum(1))
        tokens = torch.full((len(blocks),), self.BLOCK - 1, dtype=torch.long)
        return {"loss": torch.cat(loss), "correct": torch.cat(correct), "tokens": tokens}


# ---- timm and Lightning on MNIST


class MnistFolder:
    """MNIST's parts (scripts/fidelity_modules.py) as PNG image folders: data/{train,val,test}, and dev/ beside."""

    def write_folders(self) -> None:
        from fidelity_modules import MNIST_PARTS, mnist_part
        from PIL import Image

        root = self.work
        if (root / "data.done").exists():
            return
        for part in MNIST_PARTS:
            images, labels = mnist_part(part)
            target = root / ("dev" if part == "dev" else f"data/{part}")
            for i, (img, y) in enumerate(zip(images, labels, strict=True)):
                (target / str(y)).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(target / str(y) / f"{i:05d}.png")
        (root / "data.done").write_text("")


class TimmMnist(ImageScoring, MnistFolder, Family):
    """timm's `test_resnet` (1 input channel) trained as timm's train.py does: create_model,
    create_optimizer_v2 (SGD, momentum 0.9, lr 0.05, weight decay 5e-5), a cosine schedule with one warmup epoch
    (create_scheduler_v2), ModelEmaV3, CheckpointSaver keeping every epoch; batch 64, no augmentation, inputs
    scaled to [-1, 1] (what twa reads an image folder of grey images as). TWA and SWA average the raw weights
    of all 6 epochs."""

    name = "timm-mnist"
    budget = ("--epochs", "2")
    EPOCHS, BATCH, LR = 6, 64, 0.05

    def prepare(self) -> None:
        self.write_folders()

    def build(self, seed: int) -> dict[str, Any]:
        run = self.run(seed)
        if len(list(run.glob("checkpoint-*.pth.tar"))) == self.EPOCHS:
            return {"reused": True}
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--_timm-run", str(run), str(seed), str(self.threads)],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{SCRIPTS}"},
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"the timm run failed:\n{proc.stderr[-3000:]}")
        return {"train_seconds": time.perf_counter() - started}

    def train(self, run: Path, seed: int) -> None:
        import argparse as ap

        import timm
        import timm.optim
        import timm.scheduler
        from timm.utils import CheckpointSaver, ModelEmaV3

        torch.manual_seed(seed)
        train = _image_tensors(self.work / "data" / "train", self.work / "data" / "train", 1)
        val = _image_tensors(self.work / "data" / "val", self.work / "data" / "train", 1)
        args = ap.Namespace(model="test_resnet", pretrained=False, num_classes=10, in_chans=1, batch_size=self.BATCH,
                            epochs=self.EPOCHS, opt="sgd", lr=self.LR, momentum=0.9, weight_decay=5e-5,
                            sched="cosine", warmup_epochs=1, model_ema=True, model_ema_decay=0.998, seed=seed,
                            checkpoint_hist=self.EPOCHS, eval_metric="top1")
        model = timm.create_model(args.model, pretrained=False, num_classes=10, in_chans=1)
        optimizer = timm.optim.create_optimizer_v2(model, opt=args.opt, lr=args.lr, momentum=args.momentum,
                                                   weight_decay=args.weight_decay)
        scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, sched="cosine", num_epochs=self.EPOCHS,
                                                          warmup_epochs=1)
        ema = ModelEmaV3(model, decay=args.model_ema_decay)
        run.mkdir(parents=True, exist_ok=True)
        saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=ema, checkpoint_dir=str(run),
                                recovery_dir=str(run), decreasing=False, max_history=self.EPOCHS)
        g = torch.Generator().manual_seed(seed)
        updates = 0
        for epoch in range(self.EPOCHS):
            model.train()
            for idx in torch.randperm(len(train), generator=g).split(self.BATCH):
                x, y = train.batch(idx)
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                updates += 1
                ema.update(model, step=updates)
            scheduler.step(epoch + 1)
            model.eval()
            with torch.no_grad():
                x, y = val.batch(torch.arange(len(val)))
                top1 = 100.0 * float((model(x).argmax(1) == y).float().mean())
            saver.save_checkpoint(epoch, metric=top1)

    def selection(self, seed: int) -> list[str]:
        return []

    def data_flags(self) -> list[str]:
        return ["--data", "imagefolder", "--data-dir", str(self.work / "data")]

    def finals(self, seed: int) -> dict[str, Path]:
        return {"final": self.run(seed) / f"checkpoint-{self.EPOCHS - 1}.pth.tar"}

    def network(self, path: Path) -> torch.nn.Module:
        import timm

        from twa_cli.io.checkpoints import load_tensors, read_checkpoint
        from twa_cli.tasks.models import load_weights

        net = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1)
        load_weights(net, load_tensors(read_checkpoint(path)), str(path))
        return net

    def image_sets(self) -> dict[str, Any]:
        if not hasattr(self, "_sets"):
            ref = self.work / "data" / "train"
            self._sets = {"test": _image_tensors(self.work / "data" / "test", ref, 1),
                          "dev": _image_tensors(self.work / "dev", ref, 1)}
        return self._sets


class LightningMnist(Family):
    """fidelity_modules.LitMLP (784-256-256-10, BatchNorm, dropout 0.1, AdamW lr 1e-3) with lightning.Trainer,
    batch 64, 8 epochs, ModelCheckpoint(save_top_k=-1) after every epoch. TWA and SWA average all 8."""

    name = "lightning-mnist"
    budget = ("--epochs", "2")
    EPOCHS = 8

    def build(self, seed: int) -> dict[str, Any]:
        run = self.run(seed)
        if len(list(run.glob("epoch=*.ckpt"))) == self.EPOCHS:
            return {"reused": True}
        started = time.perf_counter()
        import logging
        import warnings

        import lightning.pytorch as pl
        from fidelity_modules import LitMLP, mnist_splits
        from lightning.pytorch.callbacks import ModelCheckpoint
        from torch.utils.data import DataLoader

        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)
        torch.set_num_threads(self.threads)
        pl.seed_everything(seed, verbose=False)
        train, val, _ = mnist_splits()
        trainer = pl.Trainer(max_epochs=self.EPOCHS, accelerator="cpu", devices=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(run.parent),
                             callbacks=[ModelCheckpoint(dirpath=run, filename="{epoch}-{val_loss:.4f}",
                                                        save_top_k=-1, every_n_epochs=1)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(LitMLP(), DataLoader(train, batch_size=64, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed)),
                        DataLoader(val, batch_size=500))
        return {"train_seconds": time.perf_counter() - started}

    def data_flags(self) -> list[str]:
        return ["--model", "fidelity_modules:LitMLP", "--data", "fidelity_modules:mnist_splits"]

    def finals(self, seed: int) -> dict[str, Path]:
        files = sorted(self.run(seed).glob("epoch=*.ckpt"), key=lambda p: int(re.search(r"epoch=(\d+)", p.name)[1]))
        return {"final": files[-1]}

    @torch.no_grad()
    def score(self, path: Path, split: str = "test") -> dict[str, torch.Tensor]:
        from fidelity_modules import LitMLP, mnist_dev, mnist_splits

        from twa_cli.io.checkpoints import load_tensors, read_checkpoint
        from twa_cli.io.readers import ReadOptions

        net = LitMLP()
        tensors = load_tensors(read_checkpoint(path, ReadOptions(strip_prefix="")))
        net.load_state_dict(tensors)
        net.eval()
        data = mnist_dev() if split == "dev" else mnist_splits()[2]
        x, y = data.tensors
        logits = net(x).double()
        return {"correct": logits.argmax(1) == y, "loss": F.cross_entropy(logits, y, reduction="none")}


FAMILIES: dict[str, type[Family]] = {f.name: f for f in (DigitsHead, CifarHead, CifarTail, SST2Head, SST2Overfit,
                                                         ShakespeareTail, TimmMnist, LightningMnist)}


# ---------------------------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cache: Path = args.cache.resolve()
        self.path = self.cache / "results.json"
        self.results: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.families = {name: FAMILIES[name](self.cache, args.threads) for name in args.families}

    def save(self) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1) + "\n")
        tmp.replace(self.path)

    def stage(self, family: str, seed: int, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        entry = self.results.setdefault(family, {}).setdefault(str(seed), {})
        if name in entry and name not in self.args.redo:
            return entry[name]
        print(f"[{time.strftime('%H:%M:%S')}] {family} seed {seed}: {name} ...", flush=True)
        started = time.perf_counter()
        try:
            out = fn()
        except TwaFailed as exc:
            print(f"    FAILED: {exc}", flush=True)
            out = {"failed": str(exc)[-2000:]}
        out["seconds"] = time.perf_counter() - started
        entry[name] = out
        self.save()
        figures = {k: v for k, v in out.items() if isinstance(v, float)}
        print("    " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()), flush=True)
        return out

    def run_seed(self, family: Family, seed: int) -> None:
        split = "dev" if seed == DEV_SEED else "test"
        if split == "dev" and not family.has_dev:
            return
        folder = family.folder(seed)
        scores = folder / "scores"
        scores.mkdir(parents=True, exist_ok=True)
        self.stage(family.name, seed, "build", lambda: family.build(seed))
        if "build" in self.args.only:
            return
        for name, path in family.finals(seed).items():
            self.stage(family.name, seed, name, lambda n=name, p=path: self.scored(family, n, p, split, scores))
        for method in self.args.methods:
            self.stage(family.name, seed, method, lambda m=method: self.method(family, seed, m, split, scores))

    def method(self, family: Family, seed: int, method: str, split: str, scores: Path) -> dict[str, Any]:
        run, sel, data = family.run(seed), family.selection(seed), family.data_flags()
        hf = family.name.startswith(("sst2", "shakespeare"))
        if method == "swa":
            out = family.folder(seed) / ("swa" if hf else "swa.safetensors")
            swa_data = _without(data, "--val-data")
            summary, command, seconds = twa(["swa", run, *sel, *swa_data, "-o", out, "--force"], self.args.threads)
            result = out
        else:
            base, _, variant = method.partition(":")
            extra = self.args.variant.get(variant, "").split() if variant else []
            preset = ["--preset", "paper"] if base == "twa-paper" else []
            out = family.folder(seed) / method.replace(":", "-")
            summary, command, seconds = twa(["train-subspace", run, *sel, *data, *family.budget, *preset, *extra,
                                             "--seed", seed, "-o", out, "--force"], self.args.threads)
            result = out if hf else Path(summary["checkpoint"])
        scored = self.scored(family, method, result, split, scores)
        keep = {k: summary.get(k) for k in ("coefficients", "lr_check", "selected", "candidates") if k in summary}
        return {**scored, **keep, "twa_seconds": seconds, "command": shown(command, self.cache)}

    def scored(self, family: Family, name: str, path: Path, split: str, scores: Path) -> dict[str, Any]:
        s = family.score(path, split)
        torch.save(s, scores / f"{name.replace(':', '-')}.pt")
        if family.kind == "lm":
            return {"loss": float(s["loss"].sum()) / float(s["tokens"].sum()), "split": split, "path": str(path)}
        return {"accuracy": 100.0 * float(s["correct"].double().mean()), "loss": float(s["loss"].mean()),
                "split": split, "path": str(path)}


def _without(argv: list[str], flag: str) -> list[str]:
    """ARGV without FLAG and its value."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        else:
            out.append(a)
    return out


# ---------------------------------------------------------------------------------------------- report


def pooled(cache: Path, family: Family, seeds: list[str], name: str) -> dict[str, torch.Tensor] | None:
    parts = []
    for seed in seeds:
        path = family.folder(int(seed)) / "scores" / f"{name.replace(':', '-')}.pt"
        if not path.exists():
            return None
        parts.append(torch.load(path, weights_only=True))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def difference(family: Family, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """B - A: accuracy points (McNemar) for classifiers, nats per token (blocks as units) for language models,
    signed so that a positive difference is always B better."""
    if family.kind == "lm":
        d = paired_blocks(a["loss"], b["loss"], a["tokens"])
        return {"diff": -d["diff"], "se": d["se"], "p": d["p"], "n": d["n"]}
    return paired(a["correct"], b["correct"])


def mean_sd(values: list[float], digits: int) -> str:
    if not values:
        return ""
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} ± {sd:.{digits}f}"


def fmt(d: dict[str, float], lm: bool) -> str:
    digits = 4 if lm else 2
    p = d["p"]
    return f"{d['diff']:+.{digits}f} ± {d['se']:.{digits}f} (p={p:.2g})"


def verdict(d: dict[str, float]) -> str:
    if d["p"] < 0.05:
        return "better" if d["diff"] > 0 else "WORSE"
    return "tie"


def report(bench: Bench, seeds: list[int], methods: list[str]) -> list[str]:
    lines = []
    summary = []
    for family in bench.families.values():
        entry = bench.results.get(family.name, {})
        done = [str(s) for s in seeds if all(m in entry.get(str(s), {}) and "failed" not in entry[str(s)][m]
                                             for m in ("final", *methods))]
        if not done:
            continue
        lm = family.kind == "lm"
        key, digits = ("loss", 4) if lm else ("accuracy", 2)
        finals = [n for n in ("final", "full") if n in entry[done[0]]]
        lines += [f"### {family.name} (seeds {', '.join(done)})", "",
                  f"| model | test {'loss per token' if lm else 'accuracy %'} | seconds |", "|---|---|---|"]
        for name in (*finals, *methods):
            values = [entry[s][name][key] for s in done]
            secs = [entry[s][name].get("twa_seconds") for s in done if entry[s][name].get("twa_seconds")]
            lines.append(f"| {name} | {mean_sd(values, digits)} | {mean_sd(secs, 0) if secs else ''} |")
        lines += ["", "| B - A (pooled over seeds, B better is positive) | difference | verdict |", "|---|---|---|"]
        scores = {n: pooled(bench.cache, family, done, n) for n in (*finals, *methods)}
        row: dict[str, str] = {"run": family.name}
        for b in methods:
            if not b.startswith("twa"):
                continue
            for a in ("swa", *finals, *(m for m in methods if m.startswith("twa") and m != b)):
                if a not in scores or scores[a] is None or scores[b] is None:
                    continue
                d = difference(family, scores[a], scores[b])
                lines.append(f"| {b} - {a} | {fmt(d, lm)} | {verdict(d)} |")
                if b == "twa" and a in ("swa", "final"):
                    row[a] = f"{fmt(d, lm)} {verdict(d)}"
        summary.append(row)
        lines.append("")
    if summary:
        lines = ["| run | default TWA - SWA | default TWA - final checkpoint |", "|---|---|---|",
                 *(f"| {r['run']} | {r.get('swa', '')} | {r.get('final', '')} |" for r in summary), "", *lines]
    return lines


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench-fidelity")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help="swa, twa, twa-paper, or twa:NAME for a --variant (development)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="extra train-subspace flags for method twa:NAME (development, on the dev seed)")
    p.add_argument("--only", nargs="*", default=[], help="'build': only write the runs")
    p.add_argument("--redo", nargs="*", default=[], help="stages to run again (swa, twa, ...)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", action="store_true")
    p.add_argument("--_timm-run", nargs=3, dest="timm_run", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variant = dict(v.split("=", 1) for v in args.variant)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.timm_run:  # the timm run, in a process of its own (timm's imports stay out of the bench's)
        run, seed, threads = args.timm_run
        torch.set_num_threads(int(threads))
        TimmMnist(args.cache.resolve(), int(threads)).train(Path(run), int(seed))
        return 0
    bench = Bench(args)
    if not args.report:
        torch.set_num_threads(args.threads)
        bench.results.setdefault("environment", {}).update(torch=torch.__version__, commit=git_commit())
        invocation = "python scripts/bench_fidelity.py " + " ".join(sys.argv[1:])
        commands = bench.results.setdefault("commands", [])
        if invocation not in commands:
            commands.append(invocation)
        for family in bench.families.values():
            family.prepare()
        for seed in args.seeds:
            for family in bench.families.values():
                bench.run_seed(family, seed)
    else:
        for family in bench.families.values():
            family.prepare()
    print("\n".join(report(bench, args.seeds, [m for m in args.methods])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
