#!/usr/bin/env python
"""TWA on text: Hugging Face transformers runs written by the real `transformers.Trainer`, averaged by the twa CLI.

Two parts, each over several seeds, every model trained from scratch on CPU (no pretrained weights offline):

sst2         A small BERT classifier (BertConfig, trained with `Trainer`, linear decay, checkpoints every half
             epoch) on a fixed subset of the SST-2 training sentences. TWA over the checkpoints of the first half
             of the run plus a short subspace phase (`twa train-subspace`, the paper's head stage, Table 3), against
             the run's final checkpoint and SWA over the same checkpoints (`twa swa`). All are scored on SST-2 dev
             and test together (2,693 sentences); each difference comes with its paired noise (McNemar).
shakespeare  A small GPT-2 (GPT2Config, tied embeddings, trained with `Trainer` at a constant learning rate after
             warmup, checkpoints every quarter epoch) on blocks of a byte-level BPE of the first 90% of Tiny
             Shakespeare. TWA and SWA over the checkpoints of the last two epochs of six (the paper's tail stage,
             Table 1: TWA starts at the last checkpoint) against the last checkpoint, scored on the last 10% of
             the text: per-token loss and perplexity, each difference with its paired noise over blocks.

Every twa step is the CLI a user would run (`python -m twa_cli inspect|swa|train-subspace|eval ... --json`, in a
subprocess); the commands are recorded with the figures. Every result folder is then loaded again with
transformers' own `from_pretrained` and scored here, example by example (the paired tests need that), and the
figures are checked against `twa eval`'s.

    python scripts/bench_text.py --quick              # smoke run, both parts, one seed (a couple of minutes)
    nohup python scripts/bench_text.py > /tmp/bench_text.log 2>&1 &   # the default protocol (30 min on 2 busy cores)
    python scripts/bench_text.py --report             # the tables of the results so far, as markdown

Results go to OUT/results.json after every stage; a rerun with the same settings skips the stages already done.
The training data, the tokenizers and the model sizes are fixed across seeds; a seed sets the model's
initialization, the data order (and dropout) of the regular run, and the data order of the subspace phase.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import random
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                     ("TOKENIZERS_PARALLELISM", "false"), ("WANDB_DISABLED", "true")):
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_paper import git_commit, paired  # noqa: E402  (the CIFAR benchmark's paired noise, the same test)

ROOT = Path(__file__).resolve().parent.parent
TEXT_DATA = ROOT.parent / "shared" / "data" / "text"
SST2_DIR = TEXT_DATA / "sst2"
SHAKESPEARE_FILE = TEXT_DATA / "tinyshakespeare" / "input.txt.gz"
SST2_EVAL_SIZE = 872 + 1821  # dev + test
PARTS = ("sst2", "shakespeare")
STAGES = ("train", "inspect", "swa", "twa", "eval", "score")  # each seed's, in order; each needs the ones before
SUBSET_SEED = 0  # the SST-2 training subset: the same sentences for every seed

# The subspace phase, as the paper's Appendix A.2 sets it per stage (also scripts/bench_paper.py): the head stage
# starts at the center of the checkpoints with lambda 1e-5, the tail stage at the last checkpoint with lambda 5e-5.
HEAD_TWA = {"init": "center", "weight_decay": 1e-5}
TAIL_TWA = {"init": "last", "weight_decay": 5e-5}


# ---------------------------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=[*PARTS, "both"], default="both")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, help="runs, result folders and results.json (default: .cache/bench-text, "
                   "or .cache/bench-text-quick with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, here and in the twa subprocesses (on the "
                   "busy shared 2-core machine one thread ran these small models 3-17x faster than two)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, tiny data and runs (a couple of minutes)")
    p.add_argument("--report", action="store_true", help="only print the tables of OUT/results.json")
    p.add_argument("--redo", choices=STAGES[1:], help="recompute this stage and the ones after it for the seeds "
                   "and parts named (e.g. `--redo twa` after a change to train-subspace); the Trainer's runs are "
                   "kept (delete a run's folder to train it again)")

    s = p.add_argument_group("sst2")
    s.add_argument("--sst2-train", type=int, default=8000, help="training sentences (a fixed random subset)")
    s.add_argument("--sst2-vocab", type=int, default=4000, help="BPE vocabulary, trained on those sentences")
    s.add_argument("--sst2-max-length", type=int, default=64, help="tokens per sentence (and model positions)")
    s.add_argument("--sst2-hidden", type=int, default=128)
    s.add_argument("--sst2-layers", type=int, default=2)
    s.add_argument("--sst2-epochs", type=int, default=10, help="the regular run; the head is its first half")
    s.add_argument("--sst2-batch", type=int, default=32)
    s.add_argument("--sst2-lr", type=float, default=1e-3, help="AdamW, linear decay to 0 after a half-epoch warmup")
    s.add_argument("--sst2-twa-epochs", type=int, default=2)
    s.add_argument("--sst2-twa-lr", type=float, default=2.0, help="train-subspace --lr (the tool's default; its "
                   "sharpness check lowers it where it is unstable)")

    m = p.add_argument_group("shakespeare")
    m.add_argument("--lm-train-chars", type=int, help="use only the first N characters of the 90%% training text")
    m.add_argument("--lm-heldout-chars", type=int, help="score only the first N characters of the held-out 10%%")
    m.add_argument("--lm-vocab", type=int, default=1024, help="byte-level BPE vocabulary, trained on the train text")
    m.add_argument("--lm-block", type=int, default=128, help="tokens per block (and model positions)")
    m.add_argument("--lm-embd", type=int, default=128)
    m.add_argument("--lm-layers", type=int, default=2)
    m.add_argument("--lm-heads", type=int, default=4)
    m.add_argument("--lm-epochs", type=int, default=6, help="the regular run")
    m.add_argument("--lm-tail-epochs", type=int, default=2, help="SWA and TWA use the checkpoints of the last N epochs")
    m.add_argument("--lm-saves", type=int, default=4, help="checkpoints per epoch")
    m.add_argument("--lm-batch", type=int, default=32)
    m.add_argument("--lm-lr", type=float, default=2e-3, help="AdamW, constant after a warmup of 1/4 epoch")
    m.add_argument("--lm-twa-epochs", type=int, default=1)
    m.add_argument("--lm-twa-lr", type=float, default=2.0, help="train-subspace --lr (see --sst2-twa-lr)")
    args = p.parse_args(argv)
    if not 0 < args.lm_tail_epochs < args.lm_epochs:
        p.error("--lm-tail-epochs must be at least 1 and fewer than --lm-epochs")
    if args.quick:
        args.seeds = [0]
        args.sst2_train, args.sst2_vocab, args.sst2_epochs, args.sst2_twa_epochs = 2048, 2000, 4, 1
        args.lm_train_chars, args.lm_heldout_chars, args.lm_vocab, args.lm_epochs = 60_000, 20_000, 300, 2
        args.lm_tail_epochs = 1
        args.lm_block, args.lm_layers, args.lm_embd = 64, 1, 64
    args.out = args.out or ROOT / ".cache" / ("bench-text-quick" if args.quick else "bench-text")
    args.parts = list(PARTS) if args.part == "both" else [args.part]
    return args


def part_config(args: argparse.Namespace, part: str) -> dict[str, Any]:
    """The settings of one part (they name its folder: other settings, other runs)."""
    prefix = "sst2_" if part == "sst2" else "lm_"
    return {k.removeprefix(prefix): v for k, v in sorted(vars(args).items()) if k.startswith(prefix)}


def config_tag(cfg: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------- the twa CLI


class TwaFailed(RuntimeError):
    """A twa command that failed: the command as a user would type it, and the end of its error output."""


def shown(argv: list[str], out: Path) -> str:
    """A command as a user would type it, with the working folder and the shared data shortened."""
    text = shlex.join(["twa", *argv])
    return text.replace(str(out.resolve()), "$OUT").replace(str(TEXT_DATA), "$DATA")


def run_twa(argv: list[str], out: Path, threads: int) -> tuple[Any, str]:
    """`python -m twa_cli ARGV --json` from this checkout; its JSON summary and the command as shown."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    argv = [*argv, "--json"]
    proc = subprocess.run([sys.executable, "-m", "twa_cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)
    command = shown(argv, out)
    if proc.returncode != 0:
        raise TwaFailed(f"{command}\nexit status {proc.returncode}; stderr ends:\n{proc.stderr[-3000:]}")
    try:
        return json.loads(proc.stdout), command
    except json.JSONDecodeError as exc:
        raise TwaFailed(f"{command}\n--json printed no JSON ({exc}); stdout starts:\n{proc.stdout[:2000]}") from exc


# ---------------------------------------------------------------------------------------------- transformers


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


def train_with_trainer(model: Any, tokenizer: Any, run: Path, seed: int, train: list[dict[str, Any]], collator: Any,
                       **overrides: Any) -> dict[str, Any]:
    """`transformers.Trainer(...).train()` on CPU, a checkpoint every `save_steps`; what it logged at the end."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    kw = {"output_dir": str(run), "use_cpu": True, "seed": seed, "data_seed": seed, "report_to": "none",
          "disable_tqdm": True, "dataloader_num_workers": 0, "dataloader_drop_last": True, "save_strategy": "steps",
          "save_only_model": True, "save_total_limit": None, "eval_strategy": "no", "logging_strategy": "steps",
          "weight_decay": 0.01}
    trainer = Trainer(model=model, args=TrainingArguments(**{**kw, **overrides}), train_dataset=train,
                      data_collator=collator, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    out = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"steps": trainer.state.global_step, "train_loss": float(out.training_loss),
            "last_logged_loss": losses[-1] if losses else None}


def checkpoints(run: Path) -> list[Path]:
    """The Trainer's checkpoint-N folders, by step."""
    return sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))


def finished(run: Path, steps: int) -> bool:
    last = run / f"checkpoint-{steps}" / "trainer_state.json"
    return last.exists() and json.loads(last.read_text()).get("global_step") == steps


def tokenizer_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("tokenizer"))


# ---------------------------------------------------------------------------------------------- paired noise


def paired_blocks(a: torch.Tensor, b: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """B minus A in per-token loss (nats), with the standard error over blocks (blocks are the independent units;
    tokens inside one are not) and a two-sided normal p-value."""
    from scipy.stats import norm

    d = (b - a).double()
    total = float(tokens.sum())
    diff = float(d.sum()) / total
    # ratio estimator: the per-block residuals of the loss difference against the mean difference per token
    resid = d - diff * tokens.double()
    se = math.sqrt(float((resid**2).sum()) * len(d) / max(len(d) - 1, 1)) / total
    p = 2 * norm.sf(abs(diff) / se) if se > 0 else 1.0
    return {"diff": diff, "se": se, "p": float(p), "n": len(d), "tokens": int(total)}


# ---------------------------------------------------------------------------------------------- bench


class Bench:
    """One results file for both parts; each stage's figures are saved as soon as it ends."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out: Path = args.out.resolve()
        self.path = self.out / "results.json"
        self.results: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.path)

    def part(self, name: str) -> dict[str, Any]:
        """This part's entry, started afresh when the settings changed (the old runs stay in their folder)."""
        cfg = part_config(self.args, name)
        tag = config_tag(cfg)
        entry = self.results.get(name)
        if entry is None or entry.get("tag") != tag:
            if entry is not None:
                print(f"{name}: settings changed ({entry.get('tag')} -> {tag}): its results start afresh", flush=True)
            entry = self.results[name] = {"tag": tag, "config": cfg, "seeds": {}}
        if self.args.redo:
            drop = STAGES[STAGES.index(self.args.redo):]
            for seed in self.args.seeds:
                for stage in drop:
                    entry["seeds"].get(str(seed), {}).pop(stage, None)
        command = "python scripts/bench_text.py " + " ".join(sys.argv[1:])
        if command.strip() not in entry.setdefault("commands", []):
            entry["commands"].append(command.strip())
        return entry

    def stage(self, part: str, seed: int, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        runs = self.results[part]["seeds"].setdefault(str(seed), {})
        if name in runs:
            return runs[name]
        print(f"[{time.strftime('%H:%M:%S')}] {part} seed {seed}: {name} ...", flush=True)
        started = time.perf_counter()
        out = fn()
        out["seconds"] = time.perf_counter() - started
        runs[name] = out
        self.save()
        figures = {k: v for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        print(f"    {', '.join(f'{k} {v:.4g}' for k, v in figures.items())}", flush=True)
        return out


# ---------------------------------------------------------------------------------------------- SST-2


def read_tsv(path: Path) -> tuple[str, list[tuple[int, str]]]:
    """The header line and the (label, text) rows of an SST-2 file, gzipped or not (no quoting: a tab separates)."""
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
    rows = [(int(label), text) for label, text in (line.split("\t") for line in lines[1:])]
    return lines[0], rows


def write_tsv(path: Path, header: str, rows: list[tuple[int, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(f"{y}\t{s}\n" for y, s in rows), encoding="utf-8")


def bert_bpe_tokenizer(texts: list[str], vocab: int, max_length: int) -> Any:
    """BPE trained here with `tokenizers` (BERT normalization and pre-tokenization, [CLS] ... [SEP]); tokenizers'
    BpeTrainer is deterministic on a given text (its WordPieceTrainer is not)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.BPEDecoder()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length)


class SST2:
    """Data (fixed across seeds) and the stages of one seed."""

    def __init__(self, bench: Bench):
        self.bench, self.args = bench, bench.args
        self.entry = bench.part("sst2")
        self.work = bench.out / f"sst2-{self.entry['tag']}"
        self.data = self.work / "data"
        self.train_file, self.eval_file = self.data / "train.tsv", self.data / "dev+test.tsv"
        self.tokenizer_dir = self.data / "tokenizer"
        self.prepare()

    def prepare(self) -> None:
        a = self.args
        if not (self.data / "done").exists():
            header, rows = read_tsv(SST2_DIR / "train.tsv.gz")
            if a.sst2_train > len(rows):
                raise SystemExit(f"--sst2-train {a.sst2_train}: SST-2 has {len(rows)} training sentences")
            subset = sorted(random.Random(SUBSET_SEED).sample(range(len(rows)), a.sst2_train))
            train = [rows[i] for i in subset]
            eval_rows = []
            for name in ("dev", "test"):
                eval_header, part = read_tsv(SST2_DIR / f"{name}.tsv.gz")
                eval_rows += part
            assert len(eval_rows) == SST2_EVAL_SIZE, len(eval_rows)
            write_tsv(self.train_file, header, train)
            write_tsv(self.eval_file, eval_header, eval_rows)
            tok = bert_bpe_tokenizer([s for _, s in train], a.sst2_vocab, a.sst2_max_length)
            tok.save_pretrained(str(self.tokenizer_dir))
            (self.data / "done").write_text("")
        self.train_rows = read_tsv(self.train_file)[1]
        self.eval_rows = read_tsv(self.eval_file)[1]
        self.entry["data"] = {"train": len(self.train_rows), "eval": len(self.eval_rows),
                              "positive_train": sum(y for y, _ in self.train_rows) / len(self.train_rows),
                              "positive_eval": sum(y for y, _ in self.eval_rows) / len(self.eval_rows),
                              "tokenizer_md5": md5(self.tokenizer_dir / "tokenizer.json")}

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_rows) // self.args.sst2_batch

    def run_seed(self, seed: int) -> None:
        a, b = self.args, self.bench
        folder = self.work / f"seed{seed}"
        run = folder / "run"
        half_epoch = self.steps_per_epoch // 2
        steps = 2 * half_epoch * a.sst2_epochs
        head_end = half_epoch * a.sst2_epochs  # the step of the last checkpoint of the first half
        data = ["--data", str(self.train_file), "--eval-data", str(self.eval_file)]

        b.stage("sst2", seed, "train", lambda: self.train(run, seed, half_epoch, steps))
        b.stage("sst2", seed, "inspect", lambda: inspect_run(b, run, 2 * a.sst2_epochs, head_end))
        b.stage("sst2", seed, "swa", lambda: twa_swa(b, run, folder / "swa", ["--end-step", str(head_end + 1), *data]))
        b.stage("sst2", seed, "twa", lambda: twa_train(b, run, folder / "twa", [
            "--end-step", str(head_end + 1), *data, "--epochs", str(a.sst2_twa_epochs), "--batch-size",
            str(a.sst2_batch), "--lr", str(a.sst2_twa_lr), "--init", HEAD_TWA["init"], "--weight-decay",
            str(HEAD_TWA["weight_decay"]), "--seed", str(seed)]))
        models = {"final": run / f"checkpoint-{steps}", "half": run / f"checkpoint-{head_end}",
                  "swa": folder / "swa", "twa": folder / "twa"}
        b.stage("sst2", seed, "eval", lambda: twa_eval(b, models, data))
        b.stage("sst2", seed, "score", lambda: self.score_all(folder, models, b.results["sst2"]["seeds"][str(seed)]))

    def train(self, run: Path, seed: int, half_epoch: int, steps: int) -> dict[str, Any]:
        from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding, set_seed

        a = self.args
        if finished(run, steps):
            return {"steps": steps, "reused": True, "checkpoints": len(checkpoints(run))}
        tokenizer = load_tokenizer(self.tokenizer_dir)
        encoded = tokenizer([s for _, s in self.train_rows], truncation=True, max_length=a.sst2_max_length)
        train = [{**{k: v[i] for k, v in encoded.items()}, "labels": y} for i, (y, _) in enumerate(self.train_rows)]
        set_seed(seed)
        heads = max(2, a.sst2_hidden // 64)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=a.sst2_hidden, num_hidden_layers=a.sst2_layers,
                            num_attention_heads=heads, intermediate_size=2 * a.sst2_hidden,
                            max_position_embeddings=a.sst2_max_length, type_vocab_size=1, num_labels=2,
                            pad_token_id=tokenizer.pad_token_id)
        model = BertForSequenceClassification(config)
        out = train_with_trainer(model, tokenizer, run, seed, train, DataCollatorWithPadding(tokenizer),
                                 num_train_epochs=a.sst2_epochs, per_device_train_batch_size=a.sst2_batch,
                                 learning_rate=a.sst2_lr, lr_scheduler_type="linear", warmup_steps=half_epoch,
                                 save_steps=half_epoch, logging_steps=half_epoch)
        if out["steps"] != steps:
            raise RuntimeError(f"the Trainer ran {out['steps']} steps, not {steps}")
        out["parameters"] = sum(p.numel() for p in model.parameters())
        out["checkpoints"] = len(checkpoints(run))
        return out

    @torch.no_grad()
    def score(self, folder: Path) -> dict[str, torch.Tensor]:
        """Each dev+test sentence's correctness and loss, by the model in `folder` loaded with from_pretrained (with
        the tokenizer trained here, not the folder's copy: score_all only checks that the folder holds one)."""
        from transformers import AutoModelForSequenceClassification

        tokenizer = load_tokenizer(self.tokenizer_dir)
        model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
        correct, losses = [], []
        for i in range(0, len(self.eval_rows), 128):
            chunk = self.eval_rows[i : i + 128]
            enc = tokenizer([s for _, s in chunk], truncation=True, max_length=self.args.sst2_max_length,
                            padding=True, return_tensors="pt")
            labels = torch.tensor([y for y, _ in chunk])
            logits = model(**enc).logits
            correct.append(logits.argmax(-1) == labels)
            losses.append(F.cross_entropy(logits.double(), labels, reduction="none"))
        return {"correct": torch.cat(correct), "loss": torch.cat(losses)}

    def score_all(self, folder: Path, models: dict[str, Path], runs: dict[str, Any]) -> dict[str, Any]:
        masks = folder / "masks"
        masks.mkdir(parents=True, exist_ok=True)
        out: dict[str, Any] = {}
        mismatches = []
        for name, path in models.items():
            s = self.score(path)
            torch.save(s, masks / f"{name}.pt")
            acc, loss = 100.0 * float(s["correct"].double().mean()), float(s["loss"].mean())
            tool = runs["eval"][name]
            out[name] = {"accuracy": acc, "loss": loss, "tokenizer_files": tokenizer_files(path),
                         "twa_eval_accuracy": tool["accuracy"], "twa_eval_loss": tool["loss"]}
            if tool["count"] != len(s["correct"]) or abs(loss - tool["loss"]) > 1e-4 * max(1.0, abs(loss)) or \
                    round(acc * len(s["correct"]) / 100) != round(tool["accuracy"] * len(s["correct"]) / 100):
                mismatches.append(f"{name}: here accuracy {acc:.4f} loss {loss:.6f} over {len(s['correct'])}, twa "
                                  f"eval accuracy {tool['accuracy']:.4f} loss {tool['loss']:.6f} over {tool['count']}")
            if not out[name]["tokenizer_files"]:
                mismatches.append(f"{name}: {path} holds no tokenizer files")
        out["agrees_with_twa_eval"] = not mismatches
        if mismatches:
            out["mismatches"] = mismatches
        return out


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- the twa stages


def inspect_run(bench: Bench, run: Path, expected: int, head_end: int | None = None,
                tail_start: int | None = None) -> dict[str, Any]:
    """`twa inspect` sees every checkpoint the Trainer wrote, in step order, and selects the ones asked for."""
    sel = ["--end-step", str(head_end + 1)] if head_end is not None else ["--start-step", str(tail_start)]
    summary, command = run_twa(["inspect", str(run), *sel], bench.out, bench.args.threads)
    steps = [e["step"] for e in summary["entries"]]
    chosen = [e["step"] for e in summary["entries"] if e["selected"]]
    on_disk = [int(p.name.rsplit("-", 1)[1]) for p in checkpoints(run)]
    if steps != on_disk or len(steps) != expected or not summary["compatible"]:
        raise TwaFailed(f"{command}\nsaw steps {steps} (compatible: {summary['compatible']}, problem: "
                        f"{summary.get('problem')}); the Trainer wrote {on_disk}")
    return {"command": command, "checkpoints": len(steps), "selected_steps": chosen, "selected": len(chosen)}


def twa_swa(bench: Bench, run: Path, out: Path, options: list[str]) -> dict[str, Any]:
    summary, command = run_twa(["swa", str(run), "-o", str(out), "--force", "--device", "cpu", *options],
                               bench.out, bench.args.threads)
    return {"command": command, "checkpoints": summary["checkpoints"], "test": summary["test"]}


def twa_train(bench: Bench, run: Path, out: Path, options: list[str]) -> dict[str, Any]:
    # The fit's end, as these figures were first measured (docs/results.md); bench_fidelity.py measures the default.
    summary, command = run_twa(["train-subspace", str(run), "-o", str(out), "--force", "--device", "cpu",
                                "--select", "none", *options],
                               bench.out, bench.args.threads)
    keep = ("coefficients", "coefficient_sum", "dropped", "test", "lr_check", "checkpoint")
    return {"command": command, **{k: summary.get(k) for k in keep}}


def twa_eval(bench: Bench, models: dict[str, Path], data: list[str]) -> dict[str, Any]:
    summary, command = run_twa(["eval", *map(str, models.values()), *data, "--device", "cpu"], bench.out,
                               bench.args.threads)
    results = summary["results"]
    if [Path(r["path"]).resolve() for r in results] != [p.resolve() for p in models.values()]:
        raise TwaFailed(f"{command}\n--json gave results for {[r['path'] for r in results]}")
    return {"command": command, **{name: r["test"] for name, r in zip(models, results, strict=True)}}


# ---------------------------------------------------------------------------------------------- Tiny Shakespeare


def byte_bpe_tokenizer(text: str, vocab: int, block: int) -> Any:
    """GPT-2-style byte-level BPE (256 bytes, <|endoftext|>, merges) trained here with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eot = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text.splitlines(keepends=True), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[eot], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot,
                                   model_max_length=block)


def blocks_of(tokenizer: Any, text: str, block: int) -> torch.Tensor:
    """The whole text tokenized at once and cut into blocks (the tail that fills no block is dropped): what
    `twa --block-size` does with a plain text file."""
    ids = tokenizer(text, verbose=False)["input_ids"]
    count = len(ids) // block
    return torch.tensor(ids[: count * block], dtype=torch.long).view(count, block)


def lm_collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ids = torch.stack([e["input_ids"] for e in examples])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class Shakespeare:
    def __init__(self, bench: Bench):
        self.bench, self.args = bench, bench.args
        self.entry = bench.part("shakespeare")
        self.work = bench.out / f"shakespeare-{self.entry['tag']}"
        self.data = self.work / "data"
        self.train_file, self.eval_file = self.data / "train.txt", self.data / "heldout.txt"
        self.tokenizer_dir = self.data / "tokenizer"
        self.prepare()

    def prepare(self) -> None:
        a = self.args
        if not (self.data / "done").exists():
            with gzip.open(SHAKESPEARE_FILE, "rt", encoding="utf-8") as fh:
                text = fh.read()
            cut = int(0.9 * len(text))
            train, held = text[:cut], text[cut:]
            train, held = train[: a.lm_train_chars or len(train)], held[: a.lm_heldout_chars or len(held)]
            self.data.mkdir(parents=True, exist_ok=True)
            self.train_file.write_text(train, encoding="utf-8")
            self.eval_file.write_text(held, encoding="utf-8")
            byte_bpe_tokenizer(train, a.lm_vocab, a.lm_block).save_pretrained(str(self.tokenizer_dir))
            (self.data / "done").write_text("")
        tokenizer = load_tokenizer(self.tokenizer_dir)
        self.train_blocks = blocks_of(tokenizer, self.train_file.read_text(encoding="utf-8"), a.lm_block)
        self.eval_blocks = blocks_of(tokenizer, self.eval_file.read_text(encoding="utf-8"), a.lm_block)
        self.entry["data"] = {"train_chars": len(self.train_file.read_text(encoding="utf-8")),
                              "heldout_chars": len(self.eval_file.read_text(encoding="utf-8")),
                              "train_blocks": len(self.train_blocks), "heldout_blocks": len(self.eval_blocks),
                              "heldout_predicted_tokens": len(self.eval_blocks) * (self.args.lm_block - 1),
                              "tokenizer_md5": md5(self.tokenizer_dir / "tokenizer.json")}

    def run_seed(self, seed: int) -> None:
        a, b = self.args, self.bench
        folder = self.work / f"seed{seed}"
        run = folder / "run"
        per_epoch = len(self.train_blocks) // a.lm_batch
        every = per_epoch // a.lm_saves
        saves = a.lm_saves * a.lm_epochs
        steps = every * saves
        tail_start = every * a.lm_saves * (a.lm_epochs - a.lm_tail_epochs) + 1  # the checkpoints of the tail epochs
        data = ["--data", str(self.train_file), "--eval-data", str(self.eval_file), "--block-size", str(a.lm_block)]

        b.stage("shakespeare", seed, "train", lambda: self.train(run, seed, every, steps))
        b.stage("shakespeare", seed, "inspect", lambda: inspect_run(b, run, saves, tail_start=tail_start))
        b.stage("shakespeare", seed, "swa", lambda: twa_swa(b, run, folder / "swa",
                                                            ["--start-step", str(tail_start), *data]))
        b.stage("shakespeare", seed, "twa", lambda: twa_train(b, run, folder / "twa", [
            "--start-step", str(tail_start), *data, "--epochs", str(a.lm_twa_epochs), "--batch-size",
            str(a.lm_batch), "--lr", str(a.lm_twa_lr), "--init", TAIL_TWA["init"], "--weight-decay",
            str(TAIL_TWA["weight_decay"]), "--seed", str(seed)]))
        models = {"last": run / f"checkpoint-{steps}", "swa": folder / "swa", "twa": folder / "twa"}
        b.stage("shakespeare", seed, "eval", lambda: twa_eval(b, models, data))
        b.stage("shakespeare", seed, "score", lambda: self.score_all(
            folder, models, b.results["shakespeare"]["seeds"][str(seed)]))

    def train(self, run: Path, seed: int, every: int, steps: int) -> dict[str, Any]:
        from transformers import GPT2Config, GPT2LMHeadModel, set_seed

        a = self.args
        if finished(run, steps):
            return {"steps": steps, "reused": True, "checkpoints": len(checkpoints(run))}
        tokenizer = load_tokenizer(self.tokenizer_dir)
        set_seed(seed)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=a.lm_block, n_embd=a.lm_embd, n_layer=a.lm_layers,
                            n_head=a.lm_heads, tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, use_cache=False)
        model = GPT2LMHeadModel(config)
        train = [{"input_ids": b} for b in self.train_blocks]
        out = train_with_trainer(model, tokenizer, run, seed, train, lm_collate, num_train_epochs=a.lm_epochs,
                                 per_device_train_batch_size=a.lm_batch, learning_rate=a.lm_lr,
                                 lr_scheduler_type="constant_with_warmup", warmup_steps=every, save_steps=every,
                                 logging_steps=every)
        if out["steps"] != steps:
            raise RuntimeError(f"the Trainer ran {out['steps']} steps, not {steps}")
        out["parameters"] = sum(p.numel() for p in model.parameters())
        out["checkpoints"] = len(checkpoints(run))
        return out

    @torch.no_grad()
    def score(self, folder: Path) -> dict[str, torch.Tensor]:
        """Per held-out block: the summed loss of its predicted tokens, their count and how many are right, by the
        model in `folder` loaded with from_pretrained."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        loss, correct = [], []
        for i in range(0, len(self.eval_blocks), 64):
            x = self.eval_blocks[i : i + 64]
            logits = model(input_ids=x).logits[:, :-1].double()
            target = x[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
            loss.append(nll.view(target.shape).sum(1))
            correct.append((logits.argmax(-1) == target).sum(1))
        tokens = torch.full((len(self.eval_blocks),), self.args.lm_block - 1, dtype=torch.long)
        return {"loss": torch.cat(loss), "correct": torch.cat(correct), "tokens": tokens}

    def score_all(self, folder: Path, models: dict[str, Path], runs: dict[str, Any]) -> dict[str, Any]:
        masks = folder / "masks"
        masks.mkdir(parents=True, exist_ok=True)
        out: dict[str, Any] = {}
        mismatches = []
        for name, path in models.items():
            s = self.score(path)
            torch.save(s, masks / f"{name}.pt")
            tokens = float(s["tokens"].sum())
            loss = float(s["loss"].sum()) / tokens
            acc = 100.0 * float(s["correct"].sum()) / tokens
            tool = runs["eval"][name]
            out[name] = {"loss": loss, "perplexity": math.exp(loss), "token_accuracy": acc,
                         "tokenizer_files": tokenizer_files(path), "twa_eval_loss": tool["loss"],
                         "twa_eval_perplexity": tool["perplexity"], "twa_eval_token_accuracy": tool["token_accuracy"]}
            if tool["count"] != tokens or abs(loss - tool["loss"]) > 1e-4 or abs(acc - tool["token_accuracy"]) > 1e-3:
                mismatches.append(f"{name}: here loss {loss:.6f} token accuracy {acc:.4f} over {tokens:.0f} tokens, "
                                  f"twa eval loss {tool['loss']:.6f} token accuracy {tool['token_accuracy']:.4f} over "
                                  f"{tool['count']}")
            if not out[name]["tokenizer_files"]:
                mismatches.append(f"{name}: {path} holds no tokenizer files")
        out["agrees_with_twa_eval"] = not mismatches
        if mismatches:
            out["mismatches"] = mismatches
        return out


# ---------------------------------------------------------------------------------------------- report


def mean_sd(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    m = float(np.mean(values))
    return f"{m:.{digits}f}" if len(values) < 2 else f"{m:.{digits}f} ± {float(np.std(values, ddof=1)):.{digits}f}"


def complete_seeds(entry: dict[str, Any]) -> list[str]:
    return sorted((s for s, r in entry.get("seeds", {}).items() if "score" in r), key=int)


def pooled(work: Path, seeds: list[str], name: str, key: str) -> torch.Tensor:
    return torch.cat([torch.load(work / f"seed{s}" / "masks" / f"{name}.pt")[key] for s in seeds])


def commands_of(entry: dict[str, Any], seeds: list[str]) -> list[str]:
    """The twa commands of the first seed (the others differ only in the folder and --seed)."""
    r = entry["seeds"][seeds[0]]
    return [f"- {stage}: `{r[stage]['command']}`" for stage in ("inspect", "swa", "twa", "eval")]


def sst2_report(out: Path, entry: dict[str, Any]) -> list[str]:
    cfg, seeds = entry["config"], complete_seeds(entry)
    if not seeds:
        return ["(SST-2: no seed finished yet)"]
    work = out / f"sst2-{entry['tag']}"
    runs = [entry["seeds"][s] for s in seeds]
    e, half, twa_e = cfg["epochs"], cfg["epochs"] / 2, cfg["twa_epochs"]
    n_head = runs[0]["swa"]["checkpoints"]
    d = entry["data"]
    lines = [f"### SST-2: BERT classifier from scratch, TWA over the first half of the run "
             f"(seeds {', '.join(seeds)})", "",
             f"Data: {d['train']:,} SST-2 training sentences (a fixed random subset), scored on dev + test together "
             f"({d['eval']:,} sentences, {100 * d['positive_eval']:.1f}% positive). Tokenizer: BPE, {cfg['vocab']:,} "
             f"tokens, trained on those training sentences. Model: BertForSequenceClassification, {cfg['layers']} "
             f"layers, hidden {cfg['hidden']}, at most {cfg['max_length']} tokens, "
             f"{runs[0]['train'].get('parameters', 0):,} parameters. Regular run: `transformers.Trainer`, AdamW lr "
             f"{cfg['lr']:g}, linear decay, batch {cfg['batch']}, {e} epochs, a checkpoint every half epoch. SWA and "
             f"TWA use the {n_head} checkpoints of the first {half:g} epochs; TWA then trains {twa_e} epoch(s) in "
             f"their span (`train-subspace --lr {cfg['twa_lr']:g}`, from their center, lambda "
             f"{HEAD_TWA['weight_decay']:g}).", "",
             "| model | epochs of training | dev+test accuracy % | dev+test loss |", "|---|---|---|---|"]
    rows = [("final checkpoint of the run", "final", f"{e}"),
            (f"checkpoint at epoch {half:g} (the last one TWA sees)", "half", f"{half:g}"),
            (f"SWA over the {n_head} first-half checkpoints", "swa", f"{half:g}"),
            (f"TWA over the same checkpoints, +{twa_e} epoch(s) in their span", "twa", f"{half:g} + {twa_e}")]
    for label, name, epochs in rows:
        lines.append(f"| {label} | {epochs} | {mean_sd([r['score'][name]['accuracy'] for r in runs])} | "
                     f"{mean_sd([r['score'][name]['loss'] for r in runs], 3)} |")
    lines += ["", "Per seed (accuracy %): " + "; ".join(
        f"seed {s}: " + ", ".join(f"{n} {entry['seeds'][s]['score'][n]['accuracy']:.2f}" for _, n, _ in rows)
        for s in seeds), ""]
    lines += ["Paired differences (B - A, accuracy points ± paired standard error, McNemar exact p), pooled over the "
              "seeds' sentences:", "",
              "| A | B | B - A | sentences only B gets right / only A | sentences |", "|---|---|---|---|---|"]
    for a_name, b_name in (("final", "twa"), ("swa", "twa"), ("final", "swa"), ("half", "twa")):
        m = paired(pooled(work, seeds, a_name, "correct"), pooled(work, seeds, b_name, "correct"))
        lines.append(f"| {a_name} | {b_name} | {m['diff']:+.2f} ± {m['se']:.2f} ({p_text(m['p'])}) | "
                     f"{m['b_only']} / {m['a_only']} | {m['n']:,} |")
    lines += ["", *twa_details(work, entry, seeds)]
    lines += agreement(runs)
    lines += ["", "Commands (seed " + seeds[0] + "; `$OUT` = the --out folder):", "",
              *[f"- this benchmark, as run: `{c}`" for c in entry["commands"]], *commands_of(entry, seeds), ""]
    lines += timing(runs)
    return lines


def shakespeare_report(out: Path, entry: dict[str, Any]) -> list[str]:
    cfg, seeds = entry["config"], complete_seeds(entry)
    if not seeds:
        return ["(Tiny Shakespeare: no seed finished yet)"]
    work = out / f"shakespeare-{entry['tag']}"
    runs = [entry["seeds"][s] for s in seeds]
    d, e = entry["data"], cfg["epochs"]
    n_tail = runs[0]["swa"]["checkpoints"]
    lines = [f"### Tiny Shakespeare: GPT-2 from scratch, TWA over the tail of the run (seeds {', '.join(seeds)})", "",
             f"Data: the first 90% of Tiny Shakespeare ({d['train_chars']:,} characters, {d['train_blocks']:,} "
             f"blocks of {cfg['block']} tokens) for training, the last 10% ({d['heldout_chars']:,} characters, "
             f"{d['heldout_blocks']:,} blocks, {d['heldout_predicted_tokens']:,} predicted tokens) held out. "
             f"Tokenizer: byte-level BPE, {cfg['vocab']:,} tokens, trained on the training text. Model: "
             f"GPT2LMHeadModel, {cfg['layers']} layers, n_embd {cfg['embd']}, {cfg['heads']} heads, tied "
             f"embeddings, {runs[0]['train'].get('parameters', 0):,} parameters. Regular run: `transformers.Trainer`, "
             f"AdamW lr {cfg['lr']:g} constant after a warmup, batch {cfg['batch']}, {e} epochs, {cfg['saves']} "
             f"checkpoints per epoch. SWA and TWA use the {n_tail} checkpoints of the last {cfg['tail_epochs']} "
             f"epochs; TWA trains {cfg['twa_epochs']} epoch(s) in their span (`train-subspace --lr "
             f"{cfg['twa_lr']:g}`, from the last checkpoint, lambda {TAIL_TWA['weight_decay']:g}).", "",
             "| model | held-out loss per token (nats) | perplexity | token accuracy % |", "|---|---|---|---|"]
    rows = [(f"last checkpoint (epoch {e})", "last"), (f"SWA over the last {n_tail} checkpoints", "swa"),
            (f"TWA over the same checkpoints, +{cfg['twa_epochs']} epoch(s)", "twa")]
    for label, name in rows:
        lines.append(f"| {label} | {mean_sd([r['score'][name]['loss'] for r in runs], 4)} | "
                     f"{mean_sd([r['score'][name]['perplexity'] for r in runs], 3)} | "
                     f"{mean_sd([r['score'][name]['token_accuracy'] for r in runs])} |")
    lines += ["", "Per seed (loss): " + "; ".join(
        f"seed {s}: " + ", ".join(f"{n} {entry['seeds'][s]['score'][n]['loss']:.4f}" for _, n in rows)
        for s in seeds), ""]
    lines += ["Paired differences in held-out loss per token (B - A, nats ± standard error over blocks, normal p), "
              "pooled over the seeds' blocks:", "", "| A | B | B - A | blocks |", "|---|---|---|---|"]
    tokens = {s: torch.load(work / f"seed{s}" / "masks" / "last.pt")["tokens"] for s in seeds}
    all_tokens = torch.cat([tokens[s] for s in seeds])
    for a_name, b_name in (("last", "twa"), ("swa", "twa"), ("last", "swa")):
        m = paired_blocks(pooled(work, seeds, a_name, "loss"), pooled(work, seeds, b_name, "loss"), all_tokens)
        lines.append(f"| {a_name} | {b_name} | {m['diff']:+.4f} ± {m['se']:.4f} ({p_text(m['p'])}) | {m['n']:,} |")
    lines += ["", *twa_details(work, entry, seeds)]
    lines += agreement(runs)
    lines += ["", "Commands (seed " + seeds[0] + "; `$OUT` = the --out folder):", "",
              *[f"- this benchmark, as run: `{c}`" for c in entry["commands"]], *commands_of(entry, seeds), ""]
    lines += timing(runs)
    return lines


def p_text(p: float) -> str:
    return f"p={p:.2g}" if p >= 1e-300 else "p<1e-300"


def twa_details(work: Path, entry: dict[str, Any], seeds: list[str]) -> list[str]:
    """Per seed: the lr the sharpness check allowed, the lr and test figures of each subspace epoch (the folder's
    metrics.jsonl) and the learned coefficients."""
    lines = ["TWA's subspace phase, per seed (from each result folder's lr-check.json, metrics.jsonl and "
             "coefficients.json):", ""]
    for s in seeds:
        twa = entry["seeds"][s]["twa"]
        check = twa.get("lr_check") or {}
        metrics = work / f"seed{s}" / "twa" / "metrics.jsonl"
        epochs = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        per_epoch = ", ".join(
            f"epoch {e['epoch']} lr {e['lr']:.3g}" + "".join(f" test {k[5:]} {e[k]:.4g}" for k in e
                                                          if k in ("test_acc", "test_loss"))
            for e in epochs)
        coef = twa.get("coefficients") or []
        lines.append(f"- seed {s}: lr {check.get('requested', '?')} asked, {check.get('used', '?')} allowed by the "
                     f"sharpness check (sharpness {check.get('sharpness', float('nan')):.3g}); {per_epoch}; "
                     f"coefficients {', '.join(f'{c:.2f}' for c in coef)} (sum {sum(coef):.3f})")
    return [*lines, ""]


def agreement(runs: list[dict[str, Any]]) -> list[str]:
    bad = [m for r in runs for m in r["score"].get("mismatches", [])]
    if not bad:
        return ["Every figure above was computed here from the result folders loaded with transformers' "
                "`from_pretrained`, and agrees with `twa eval`'s."]
    return ["DISAGREEMENTS between the figures computed here and `twa eval`'s:", *[f"- {m}" for m in bad]]


def timing(runs: list[dict[str, Any]]) -> list[str]:
    names = [n for n in runs[0] if isinstance(runs[0][n], dict) and "seconds" in runs[0][n]]
    return ["Seconds per seed (mean): " + ", ".join(
        f"{n} {np.mean([r[n]['seconds'] for r in runs if n in r]):.0f}" for n in names), ""]


def report(bench: Bench) -> list[str]:
    lines: list[str] = []
    for name, fn in (("sst2", sst2_report), ("shakespeare", shakespeare_report)):
        if name in bench.results:
            lines += [*fn(bench.out, bench.results[name]), ""]
    if bench.results.get("invocations"):
        lines += ["Invocations of this benchmark on these results:", ""]
    for run in bench.results.get("invocations", []):
        lines.append(f"- `{run['command']}` ({run['started']}): {run['minutes']:.1f} minutes of wall time")
    return lines


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    if args.report:
        if not bench.results:
            print(f"no results in {bench.path}")
            return 1
        print("\n".join(report(bench)))
        return 0
    torch.set_num_threads(args.threads)
    quiet_transformers()
    print(f"working in {bench.out}", flush=True)
    started, clock = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M")
    import transformers

    bench.results["environment"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                                    "threads": args.threads, "commit": git_commit()}
    parts = {"sst2": SST2, "shakespeare": Shakespeare}
    for name in args.parts:
        part = parts[name](bench)
        bench.save()
        for seed in args.seeds:
            part.run_seed(seed)
    command = " ".join(["python scripts/bench_text.py", *sys.argv[1:]])
    minutes = (time.perf_counter() - started) / 60
    bench.results.setdefault("invocations", []).append({"command": command, "started": clock, "minutes": minutes})
    bench.save()
    print("\n".join(report(bench)))
    failed = [m for p in bench.results.values() if isinstance(p, dict) for r in p.get("seeds", {}).values()
              for m in r.get("score", {}).get("mismatches", [])]
    assert not failed, "the figures computed here disagree with twa eval's:\n" + "\n".join(failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
