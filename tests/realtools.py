"""Tiny training runs written by the real tools (not imitations of their layouts).

Each builder trains a very small model for a few steps on CPU with the tool itself and returns the folder the
tool wrote, so tests can check that `twa` reads and averages what those tools really leave on disk. Every
builder is deterministic given its seed and takes a few seconds; the heavy libraries are imported inside the
builders, so importing this module is cheap.

    build_hf_classifier_run(root, seed)  -> HFRun   transformers.Trainer, BERT sequence classifier
    build_hf_causal_lm_run(root, seed)   -> HFRun   transformers.Trainer, GPT-2 with tied embeddings
    build_timm_run(root, seed)           -> Path    timm CheckpointSaver + ModelEmaV3, as timm's train.py
    build_lightning_run(root, seed, callback="none"|"swa"|"weight_averaging"|"ema") -> Path
    build_averaged_model_run(root, seed) -> Path    plain loop with torch.optim.swa_utils.AveragedModel
    lightning_data(seed)                 -> (train_set, test_set) of build_lightning_run, the `--data` hook of
                                            TinyClassifier (`--model realtools:TinyClassifier`)

`python tests/realtools.py` builds every run into a temporary folder and prints the trees and the timings.
`python tests/realtools.py BUILDER ROOT [SEED [KEY=VALUE...]]` builds one run; `build_in_subprocess` uses it,
e.g. to write a run with transformers 4.57: `build_in_subprocess("build_hf_causal_lm_run", root,
pythonpath=TRANSFORMERS4)`.

Needs, beyond the project's own dependencies: transformers, tokenizers, accelerate (the Trainer refuses to
start without it), timm, lightning.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

# transformers 4.57 installed apart, with its own dependencies (scripts/test.sh installs
# requirements/transformers4.lock there), for `build_in_subprocess` and the tests that load results in 4.x.
TRANSFORMERS4 = Path(os.environ.get("TWA_TRANSFORMERS4") or Path(__file__).resolve().parents[1] / ".cache" /
                     "transformers4").resolve()

# The fake validation metric (higher is better) that build_timm_run hands to CheckpointSaver for epochs 0..3:
# the best epoch is 1, so model_best.pth.tar is a copy of checkpoint-1.pth.tar, not of the last one.
TIMM_METRICS = (50.0, 80.0, 60.0, 70.0)
TIMM_BEST_EPOCH = 1

# build_averaged_model_run: epochs trained, and the first epoch whose weights go into the AveragedModel.
AVERAGED_EPOCHS = 4
AVERAGED_SWA_START = 1


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_DISABLED", "true")
    os.environ.setdefault("WANDB_MODE", "disabled")


def _skip_broken_datasets() -> None:
    """transformers 4.x's Trainer imports `datasets` whenever it is installed; when the installed `datasets`
    cannot be imported beside that transformers' huggingface_hub (e.g. PYTHONPATH=/tmp/tf4 with datasets 5),
    tell transformers it is absent (these builders do not use it)."""
    import transformers.utils.import_utils as iu

    if getattr(iu, "_datasets_available", False):
        try:
            import datasets  # noqa: F401
        except ImportError:
            iu._datasets_available = False


@contextlib.contextmanager
def _one_thread():
    """Train on one CPU thread (tiny models gain nothing from more, and tests may run side by side); the
    caller's torch thread count and global random states (python, numpy, torch; the builders seed them)
    are restored afterwards."""
    import numpy as np
    import torch

    before = torch.get_num_threads()
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    pl_seed = os.environ.get("PL_GLOBAL_SEED")
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if pl_seed is None:
            os.environ.pop("PL_GLOBAL_SEED", None)


def _isolated(builder):
    """Run a builder under _one_thread(): one thread, and the caller's global random states kept."""
    @functools.wraps(builder)
    def run(*args, **kwargs):
        with _one_thread():
            return builder(*args, **kwargs)
    return run


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars, info logs or warnings from transformers while a builder runs (restored after)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _train(trainer, save_final: bool, resume: Path | None = None) -> None:
    """trainer.train() (resuming from `resume`, a checkpoint folder) and trainer.save_model(), on one thread,
    without the Trainer's prints."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    with _quiet_transformers():
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
        if save_final:
            trainer.save_model()


def _accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


@dataclass(frozen=True)
class HFRun:
    """A transformers.Trainer run: `run` is the Trainer's output_dir, `train`/`test` its data files."""

    run: Path
    train: Path
    test: Path

    @property
    def checkpoints(self) -> list[Path]:
        """checkpoint-N/ folders in step order."""
        return sorted(self.run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


# ----------------------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------------------

_POSITIVE = ["good", "great", "nice", "fine", "happy", "lovely", "superb", "fun"]
_NEGATIVE = ["bad", "awful", "poor", "sad", "ugly", "boring", "terrible", "dull"]
_NOUNS = ["movie", "film", "show", "book", "meal", "song", "game", "trip"]
_TEMPLATES = ["the {n} was {a}", "a {a} {n}", "what a {a} {n} it was", "i found the {n} {a}",
              "this {n} is really {a}", "such a {a} {n} today"]


def sentiment_sentences(n: int, seed: int) -> list[tuple[str, int]]:
    """`n` short sentences, label 1 when the adjective is a positive word (balanced labels)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        adj = rng.choice(_POSITIVE if label else _NEGATIVE)
        rows.append((rng.choice(_TEMPLATES).format(n=rng.choice(_NOUNS), a=adj), label))
    rng.shuffle(rows)
    return rows


def _write_tsv(path: Path, rows: list[tuple[str, int]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows), encoding="utf-8")
    return path


def read_tsv(path: Path) -> list[tuple[str, int]]:
    """The rows of a `sentence<TAB>label` file written by build_hf_classifier_run."""
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [(s, int(y)) for s, y in (line.split("\t") for line in lines if line)]


def _wordpiece_tokenizer(texts: list[str]):
    """A BERT-style WordPiece tokenizer made here with `tokenizers`, as a PreTrainedTokenizerFast.

    Its vocabulary is every word and character of `texts` (after BERT normalization and pre-tokenization),
    in sorted order after the special tokens: tokenizers' WordPieceTrainer is not deterministic (the ids
    and even the token set vary between runs), and the weights of the embedding rows depend on the ids.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = {w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))}
    chars = {c for w in words for c in w}
    tokens = specials + sorted(chars) + sorted("##" + c for c in chars) + sorted(words - chars)
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)


def _trainer_args(output_dir: Path, seed: int, **overrides):
    from transformers import TrainingArguments

    every = overrides.pop("every", 4)
    kw = {"output_dir": str(output_dir), "max_steps": 4 * every, "per_device_train_batch_size": 8,
          "per_device_eval_batch_size": 16, "learning_rate": 1e-3, "eval_strategy": "steps", "eval_steps": every,
          "save_strategy": "steps", "save_steps": every, "logging_strategy": "steps", "logging_steps": every,
          "use_cpu": True, "seed": seed, "data_seed": seed, "report_to": "none", "disable_tqdm": True,
          "dataloader_num_workers": 0, "save_total_limit": None}
    kw.update(overrides)
    return TrainingArguments(**kw)


@_isolated
def build_hf_classifier_run(root: Path, seed: int = 0, save_final: bool = True) -> HFRun:
    """A tiny BERT sequence classifier trained from scratch with the real `transformers.Trainer`.

    Data: root/data/train.tsv (64 rows) and root/data/test.tsv (32 rows), header `sentence<TAB>label`,
    label 1 when the sentence's adjective is a positive word. Tokenizer: WordPiece made here from the
    training sentences' words and characters ([PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4), wrapped as
    PreTrainedTokenizerFast.
    Model: BertForSequenceClassification(BertConfig(2 layers, hidden 32, 2 heads, intermediate 64,
    num_labels=2, dropout 0)), fp32. Trainer: AdamW lr 3e-3 (linear decay), 64 steps of batch 8
    (8 epochs), eval/logging/checkpoint every 16 steps, processing_class=the tokenizer,
    DataCollatorWithPadding, compute_metrics=accuracy. It learns: eval_loss ~0.69 -> ~0.44,
    eval_accuracy 0.5 -> ~0.84 (seed 0).

    Left in root/run (the Trainer's output_dir, returned as HFRun.run):
      checkpoint-16/ checkpoint-32/ checkpoint-48/ checkpoint-64/, each holding
        model.safetensors          the weights (unsharded, fp32, metadata {"format": "pt"}), names
                                   `bert.embeddings...`, `bert.encoder.layer.N...`, `bert.pooler.dense.*`,
                                   `classifier.weight/bias` (41 tensors); no `position_ids` buffer
        config.json                (architectures ["BertForSequenceClassification"], model_type "bert")
        tokenizer.json, tokenizer_config.json (from processing_class; with transformers 5 the config
                                   says "tokenizer_class": "TokenizersBackend"; no vocab.txt)
        trainer_state.json         global_step, epoch, log_history: at each of steps 16, 32, 48, 64 one
                                   {"loss", "grad_norm", "learning_rate", "epoch", "step"} entry and one
                                   {"eval_loss", "eval_accuracy", "eval_runtime", ..., "epoch", "step"} entry
        optimizer.pt, scheduler.pt, rng_state.pth, training_args.bin (not weights)
      with save_final (default, as the example scripts' `trainer.save_model()`): model.safetensors,
      config.json, tokenizer files and training_args.bin directly in root/run too (the step-64 weights).
    With transformers 4.57.6 (build_in_subprocess) each folder also has special_tokens_map.json and the
    tokenizer_config.json lists added_tokens_decoder; the weights are bit-identical to the 5.24 run.
    """
    _offline()
    _skip_broken_datasets()
    from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding, Trainer, set_seed

    data = root / "data"
    train_rows, test_rows = sentiment_sentences(64, seed), sentiment_sentences(32, seed + 1000)
    train_tsv, test_tsv = _write_tsv(data / "train.tsv", train_rows), _write_tsv(data / "test.tsv", test_rows)
    tokenizer = _wordpiece_tokenizer([s for s, _ in read_tsv(train_tsv)])

    def encode(rows):
        return [dict(tokenizer(s, truncation=True), labels=y) for s, y in rows]

    set_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id)
    with _quiet_transformers():
        model = BertForSequenceClassification(config)
    run = root / "run"
    trainer = Trainer(model=model, args=_trainer_args(run, seed, every=16, learning_rate=3e-3),
                      train_dataset=encode(read_tsv(train_tsv)), eval_dataset=encode(read_tsv(test_tsv)),
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                      compute_metrics=_accuracy)
    _train(trainer, save_final)
    return HFRun(run=run, train=train_tsv, test=test_tsv)


_SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the teacher", "a child", "the farmer", "our team"]
_VERBS = ["sees", "likes", "finds", "helps", "follows", "paints", "calls", "visits"]
_OBJECTS = ["the house", "a tree", "the river", "a small boat", "the old car", "the garden", "a red ball", "the hill"]
_ENDINGS = ["today", "again", "at night", "in the morning", "every day", "with joy", "slowly", "once more"]


def simple_text(n_sentences: int, seed: int) -> str:
    """Repetitive simple English sentences, one per line."""
    rng = random.Random(seed)
    return "".join(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}.\n"
                   for _ in range(n_sentences))


def _byte_bpe_tokenizer(texts: list[str]):
    """A GPT-2-style byte-level BPE (256 bytes + <|endoftext|> + merges = 300 tokens) trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    eot = "<|endoftext|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot,
                                   model_max_length=64)
    fast.model_input_names = ["input_ids", "attention_mask"]
    return fast


@_isolated
def build_hf_causal_lm_run(root: Path, seed: int = 0, save_final: bool = True, callbacks: tuple = (),
                           resume: Path | None = None) -> HFRun:
    """A tiny GPT-2 language model trained from scratch with the real `transformers.Trainer`.

    Data: root/data/train.txt (~160 lines, ~6 KB) and root/data/test.txt (~40 lines) of simple sentences.
    Tokenizer: byte-level BPE trained here (vocab 300, `<|endoftext|>` = id 0 is bos/eos/unk/pad).
    Model: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64,
    tie_word_embeddings=True)). The token stream is cut into blocks of 32 tokens;
    DataCollatorForLanguageModeling(mlm=False). AdamW lr 3e-3, 16 steps of batch 8 (~3 epochs),
    eval/logging/save every 4 steps.

    Left in root/run: checkpoint-4/ -8/ -12/ -16/ each with model.safetensors, config.json,
    generation_config.json, tokenizer.json, tokenizer_config.json, trainer_state.json (eval_loss at
    steps 4, 8, 12, 16), optimizer.pt, scheduler.pt, rng_state.pth, training_args.bin; with save_final the
    final model, config and tokenizer directly in root/run too.

    `callbacks`: TrainerCallbacks added to the Trainer (the in-loop tests attach twa's); `resume`: a checkpoint
    folder of this run that `trainer.train(resume_from_checkpoint=...)` goes on from.

    Tied weights: model.safetensors holds `transformer.wte.weight` but NOT `lm_head.weight` (28 tensors;
    checked with transformers 5.24 and 4.57.6); the head is rebuilt from `wte` on loading.
    Run with transformers 4.57.6 (build_in_subprocess(..., pythonpath=TRANSFORMERS4)) the folders also
    hold special_tokens_map.json, and the weights are bit-identical to the 5.24 ones. Weight names are
    `transformer.wte.weight`, `transformer.wpe.weight`, `transformer.h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,
    mlp.c_fc,mlp.c_proj}.{weight,bias}`, `transformer.ln_f.{weight,bias}` (no `attn.bias`/`masked_bias`
    buffers).
    """
    _offline()
    _skip_broken_datasets()
    from transformers import DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel, Trainer, set_seed

    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    train_txt, test_txt = data / "train.txt", data / "test.txt"
    train_txt.write_text(simple_text(160, seed), encoding="utf-8")
    test_txt.write_text(simple_text(40, seed + 1000), encoding="utf-8")
    tokenizer = _byte_bpe_tokenizer(train_txt.read_text(encoding="utf-8").splitlines())

    def blocks(path: Path, size: int = 32):
        ids: list[int] = []
        for line in path.read_text(encoding="utf-8").splitlines():
            ids += tokenizer(line + "\n")["input_ids"] + [tokenizer.eos_token_id]
        return [{"input_ids": ids[i:i + size]} for i in range(0, len(ids) - size + 1, size)]

    set_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with _quiet_transformers():
        model = GPT2LMHeadModel(config)
    run = root / "run"
    trainer = Trainer(model=model, args=_trainer_args(run, seed, learning_rate=3e-3),
                      train_dataset=blocks(train_txt), eval_dataset=blocks(test_txt),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
                      callbacks=list(callbacks))
    _train(trainer, save_final, resume)
    return HFRun(run=run, train=train_txt, test=test_txt)


# ----------------------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------------------

@_isolated
def build_timm_run(root: Path, seed: int = 0) -> Path:
    """timm's `test_resnet` (num_classes=3) trained as timm's train.py does, checkpoints by its CheckpointSaver.

    4 epochs of 3 SGD steps on random 3x32x32 images; ModelEmaV3(decay=0.9) updated after every step;
    `CheckpointSaver(model, optimizer, args=Namespace(...), model_ema=..., checkpoint_dir=run,
    recovery_dir=run, decreasing=False, max_history=10)` and `saver.save_checkpoint(epoch, metric=m)` each
    epoch with the fake metrics TIMM_METRICS = (50, 80, 60, 70) (best: epoch 1). Like train.py, the folder
    also gets args.yaml and summary.csv (timm.utils.update_summary).

    Left in root/run (returned):
      checkpoint-0.pth.tar ... checkpoint-3.pth.tar   one per epoch (~4.5 MB each)
      last.pth.tar        ALIAS of the last epoch: the saver torch.saves tmp.pth.tar, renames it to
                          last.pth.tar, then hard-links checkpoint-N.pth.tar to it; after the run
                          last.pth.tar and checkpoint-3.pth.tar are the same inode (st_nlink 2)
      model_best.pth.tar  ALIAS of the best metric's epoch (1): hard link of checkpoint-1.pth.tar
      args.yaml, summary.csv (epoch,train_loss,eval_loss,eval_top1,lr)
    So a scan of *.pth.tar sees 6 files holding 4 distinct checkpoints. (Where hard links fail the saver
    falls back to shutil.copy2: same bytes, different inodes.)
    Each .pth.tar is a dict with keys, in order: epoch (int), arch ("test_resnet", from args.model),
    optimizer (optimizer.state_dict()), version (2), args (argparse.Namespace), state_dict,
    state_dict_ema, metric (float, TIMM_METRICS[epoch]), saver ({checkpoint_files: [(name, metric)...],
    best_epoch, best_metric, pending: (epoch, metric)}). state_dict: the raw model's 92 tensors (375,074
    values), parameters and BatchNorm buffers, names as the bare model (`conv1.0.weight`,
    `conv1.1.running_mean`, `conv1.1.num_batches_tracked`, ..., `fc.weight`, `fc.bias`; no `module.`);
    state_dict_ema: the ModelEmaV3 copy with the same 92 names (unwrapped, no `module.` prefix).
    `torch.load(weights_only=True)` refuses these files (argparse.Namespace) unless under
    `torch.serialization.safe_globals([argparse.Namespace])`, which is what timm's own loader does.
    """
    import argparse

    import timm
    import timm.optim
    import torch
    import yaml
    from timm.utils import CheckpointSaver, ModelEmaV3

    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(model="test_resnet", pretrained=False, num_classes=3, img_size=32, batch_size=8,
                              epochs=4, opt="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, sched="none",
                              model_ema=True, model_ema_decay=0.9, model_ema_force_cpu=False, model_ema_warmup=False,
                              checkpoint_hist=10, eval_metric="top1", seed=seed, output=str(root), experiment="run")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    optimizer = timm.optim.create_optimizer_v2(model, opt=args.opt, lr=args.lr, momentum=args.momentum,
                                               weight_decay=args.weight_decay)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
    (run / "args.yaml").write_text(yaml.safe_dump(args.__dict__, default_flow_style=False))
    saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=model_ema, amp_scaler=None,
                            checkpoint_dir=str(run), recovery_dir=str(run), decreasing=False,
                            max_history=args.checkpoint_hist)
    x_val = torch.randn(8, 3, 32, 32, generator=g)
    y_val = torch.randint(0, 3, (8,), generator=g)
    _timm_epochs(args, model, optimizer, model_ema, saver, g, x_val, y_val, run)
    return run


def _timm_epochs(args, model, optimizer, model_ema, saver, g, x_val, y_val, run: Path) -> None:
    import torch
    import torch.nn.functional as F
    from timm.utils import update_summary

    num_updates = 0
    best_metric = None
    for epoch in range(args.epochs):
        model.train()
        losses = []
        for _ in range(3):
            x = torch.randn(args.batch_size, 3, 32, 32, generator=g)
            y = torch.randint(0, 3, (args.batch_size,), generator=g)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            num_updates += 1
            model_ema.update(model, step=num_updates)
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            eval_loss = F.cross_entropy(model(x_val), y_val).item()
        metric = TIMM_METRICS[epoch]
        update_summary(epoch, {"loss": sum(losses) / len(losses)}, {"loss": eval_loss, "top1": metric},
                       filename=str(run / "summary.csv"), lr=args.lr, write_header=best_metric is None)
        best_metric, _ = saver.save_checkpoint(epoch, metric=metric)


# ----------------------------------------------------------------------------------------------------------
# Lightning
# ----------------------------------------------------------------------------------------------------------

_TINY_CLASSIFIER = None


def _tiny_classifier_class():
    """TinyClassifier, made on first use so that importing this module does not import Lightning."""
    global _TINY_CLASSIFIER
    if _TINY_CLASSIFIER is None:
        import lightning.pytorch as pl
        import torch
        import torch.nn.functional as F
        from torch import nn

        class TinyClassifier(pl.LightningModule):
            """Linear(8,16) - BatchNorm1d(16) - ReLU - Linear(16,3) under `self.model`; SGD."""

            def __init__(self, n_in: int = 8, hidden: int = 16, n_classes: int = 3, lr: float = 0.1):
                super().__init__()
                self.save_hyperparameters()
                self.model = nn.Sequential(nn.Linear(n_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                           nn.Linear(hidden, n_classes))

            def forward(self, x):
                return self.model(x)

            def training_step(self, batch, batch_idx):
                x, y = batch
                loss = F.cross_entropy(self(x), y)
                self.log("train_loss", loss)
                return loss

            def validation_step(self, batch, batch_idx):
                x, y = batch
                self.log("val_loss", F.cross_entropy(self(x), y), prog_bar=False)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

        TinyClassifier.__module__ = __name__
        TinyClassifier.__qualname__ = "TinyClassifier"
        _TINY_CLASSIFIER = TinyClassifier
    return _TINY_CLASSIFIER


def __getattr__(name: str):  # PEP 562: `realtools.TinyClassifier` without importing Lightning up front
    if name == "TinyClassifier":
        return _tiny_classifier_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


LIGHTNING_CALLBACKS = ("none", "swa", "weight_averaging", "ema")


def lightning_data(seed: int = 0):
    """(train_set, test_set): the data build_lightning_run(seed=seed) trains and validates on, as TensorDatasets of
    (x: float32[8], y: int64 in 0..2), 64 and 32 examples; the labels are the argmax of a fixed random linear map
    of x. Also the `--data realtools:lightning_data` hook of TinyClassifier (called with no argument)."""
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(int(seed))
    w = torch.randn(8, 3, generator=g)

    def data(n: int) -> TensorDataset:
        x = torch.randn(n, 8, generator=g)
        return TensorDataset(x, (x @ w).argmax(dim=1))

    train = data(64)
    return train, data(32)


@_isolated
def build_lightning_run(root: Path, seed: int = 0, callback: str = "none", extra: tuple = (),
                        ckpt_path: Path | None = None) -> Path:
    """TinyClassifier trained with the real `lightning.Trainer` and ModelCheckpoint; returns root/"ckpts".

    Trainer(max_epochs=4, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False),
    64 random training examples in batches of 16 (4 optimizer steps an epoch), 32 validation examples;
    ModelCheckpoint(dirpath=root/"ckpts", filename="{epoch}-{val_loss:.4f}", save_top_k=-1, save_last=True,
    every_n_epochs=1). Nothing else is written (no lightning_logs: logger=False). `callback`:
      "none"              no averaging callback
      "swa"               StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)
      "weight_averaging"  WeightAveraging() (AveragedModel, use_buffers=True, equal-weight average of the
                          weights after every optimizer step, from step 1 on)
      "ema"               EMAWeightAveraging(decay=0.9) (same mechanism, EMA avg_fn)

    `extra`: more Callback objects for the Trainer (the in-loop tests attach twa's); `ckpt_path`: a checkpoint
    the fit resumes from (`trainer.fit(..., ckpt_path=...)`).

    Files: epoch=0-val_loss=<value>.ckpt ... epoch=3-val_loss=<value>.ckpt and last.ckpt ("swa": also
    epoch=4-...ckpt, below). Every .ckpt is a torch.save'd dict (torch.load(weights_only=True) reads it)
    with keys epoch, global_step, pytorch-lightning_version, state_dict, loops, callbacks, optimizer_states,
    lr_schedulers, hparams_name ("kwargs"), hyper_parameters ({n_in, hidden, n_classes, lr}).
    state_dict names: model.0.weight, model.0.bias, model.1.weight, model.1.bias, model.1.running_mean,
    model.1.running_var, model.1.num_batches_tracked, model.3.weight, model.3.bias. Epoch E's file has
    epoch=E, global_step=4(E+1). `callbacks` holds the ModelCheckpoint state under the key
    "ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1,
    'train_time_interval': None}" (plus each averaging callback's own entry).

    last.ckpt: a separate regular file (not a link; save_last=True), written right after the final
    epoch's file from the same trainer state: same epoch and global_step and identical state_dict tensors
    (and the same ModelCheckpoint state). So the final epoch appears twice in the folder.

    "none": state_dict holds the raw weights.

    "swa": SWA updates its average at the START of epochs 1, 2, 3 (swa_epoch_start=2 is 1-based), i.e.
      with the weights at the END of epochs 0, 1, 2; from epoch 1 on the SWALR schedule drives the lr.
      Because the model has BatchNorm, the callback adds ONE EXTRA EPOCH (max_epochs 4 -> 5): at its start
      the averaged weights are copied into the model and the BN statistics are recomputed over one pass
      of the training data (no optimizer steps). ModelCheckpoint saves that epoch too: the extra file is
      epoch=4-val_loss=<value>.ckpt with epoch=4, global_step=17 (not 20), whose state_dict holds the SWA
      average (parameters = mean of the epoch=0,1,2 files' parameters to ~1e-7; running stats recomputed,
      num_batches_tracked=4), and last.ckpt duplicates THAT file (epoch 4, step 17). Epoch files 0..3
      hold the raw weights. Every file's callbacks["StochasticWeightAveraging"] = {n_averaged (int:
      0,1,2,3,3), latest_update_epoch, scheduler_state, average_model_state (the AveragedModel's
      module state dict, names `model.0.weight`... like state_dict, no `module.` prefix, no
      n_averaged)}; lr_schedulers holds the SWALR state from epoch 1 on.

    "weight_averaging" / "ema": state_dict holds the AVERAGED weights (WeightAveraging.on_save_checkpoint
      swaps them in) and two extra top-level keys: current_model_state (the raw weights, same
      `model.` names) and averaging_state ({"n_averaged": int64 tensor = global_step, i.e. 4, 8, 12,
      16}). callbacks["WeightAveraging"] (or ["EMAWeightAveraging"]) = {"latest_update_step": N}. The
      averaged integer buffer model.1.num_batches_tracked is meaningless (1 for "weight_averaging": the
      first copy is never updated; a truncated EMA for "ema"). val_loss in the filenames is the averaged
      model's (the callback swaps the average in for validation). last.ckpt again duplicates epoch 3.
    """
    if callback not in LIGHTNING_CALLBACKS:
        raise ValueError(f"callback must be one of {LIGHTNING_CALLBACKS}, not {callback!r}")
    import logging

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import (
        EMAWeightAveraging,
        ModelCheckpoint,
        StochasticWeightAveraging,
        WeightAveraging,
    )
    from torch.utils.data import DataLoader

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    pl.seed_everything(seed, verbose=False)
    train_set, val_set = lightning_data(seed)
    train = DataLoader(train_set, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))
    val = DataLoader(val_set, batch_size=16)
    ckpts = root / "ckpts"
    callbacks = [ModelCheckpoint(dirpath=ckpts, filename="{epoch}-{val_loss:.4f}", save_top_k=-1, save_last=True,
                                 every_n_epochs=1)]
    if callback == "swa":
        callbacks.append(StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2))
    elif callback == "weight_averaging":
        callbacks.append(WeightAveraging())
    elif callback == "ema":
        callbacks.append(EMAWeightAveraging(decay=0.9))
    callbacks.extend(extra)
    model = _tiny_classifier_class()()
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root), callbacks=callbacks,
                         log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train, val, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return ckpts


# ----------------------------------------------------------------------------------------------------------
# torch.optim.swa_utils.AveragedModel in a plain loop
# ----------------------------------------------------------------------------------------------------------

@_isolated
def build_averaged_model_run(root: Path, seed: int = 0) -> Path:
    """A plain PyTorch loop with `torch.optim.swa_utils.AveragedModel`, the SWA recipe of the PyTorch docs.

    Model: nn.Sequential(Linear(8,16), BatchNorm1d(16), ReLU(), Linear(16,3)), SGD, 4 epochs of 4 steps.
    After each epoch i (0-based): `torch.save(model.state_dict(), root/"ckpts"/f"epoch{i}.pt")`; from epoch
    AVERAGED_SWA_START (1) on, `swa_model.update_parameters(model)` after that epoch. At the end
    `torch.optim.swa_utils.update_bn(train_loader, swa_model)` and
    `torch.save(swa_model.state_dict(), root/"swa"/"swa.pt")`.

    root/ckpts/epoch0.pt ... epoch3.pt (returned folder): plain state dicts, keys `0.weight`, `0.bias`,
      `1.weight`, `1.bias`, `1.running_mean`, `1.running_var`, `1.num_batches_tracked`, `3.weight`, `3.bias`.
    root/swa/swa.pt: AveragedModel.state_dict(): the same names prefixed `module.` plus `n_averaged`
      (int64 scalar tensor, = 3: epochs 1, 2, 3), `n_averaged` first. Its parameters are the mean of
      epoch1..3.pt's parameters (to ~1e-7); its BatchNorm running stats come from update_bn (a cumulative
      average over one pass of the training data, NOT an average of the checkpoints'), and its
      `module.1.num_batches_tracked` is 4 (update_bn's batches), not a mean of 8, 12, 16.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.optim.swa_utils import AveragedModel, update_bn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(dim=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    swa_model = AveragedModel(model)
    ckpts, swa_dir = root / "ckpts", root / "swa"
    ckpts.mkdir(parents=True, exist_ok=True)
    swa_dir.mkdir(parents=True, exist_ok=True)
    for epoch in range(AVERAGED_EPOCHS):
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        torch.save(model.state_dict(), ckpts / f"epoch{epoch}.pt")
        if epoch >= AVERAGED_SWA_START:
            swa_model.update_parameters(model)
    update_bn(loader, swa_model)
    torch.save(swa_model.state_dict(), swa_dir / "swa.pt")
    return ckpts


# ----------------------------------------------------------------------------------------------------------

BUILDERS = {
    "build_hf_classifier_run": build_hf_classifier_run,
    "build_hf_causal_lm_run": build_hf_causal_lm_run,
    "build_timm_run": build_timm_run,
    "build_lightning_run": build_lightning_run,
    "build_averaged_model_run": build_averaged_model_run,
}


def build_in_subprocess(builder: str, root: Path, seed: int = 0, pythonpath: Path | None = None,
                        timeout: float = 300, **kwargs: str) -> Path:
    """Run one builder in a fresh interpreter (e.g. with `pythonpath=TRANSFORMERS4` to write the run with
    transformers 4.57.6; its Trainer needs `accelerate`, which it finds in the main site-packages); returns
    the path the builder returned (HFRun.run for the HF builders). `kwargs`: string keyword arguments of the
    builder, e.g. callback="swa"."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, str(Path(__file__).resolve()), builder, str(root), str(seed)]
    cmd += [f"{k}={v}" for k, v in kwargs.items()]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{builder} failed in a subprocess:\n{out.stderr[-4000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def _tree(folder: Path) -> str:
    lines = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_dir():
            lines.append(f"  {rel}/")
        else:
            lines.append(f"  {rel}  ({p.stat().st_size} B)")
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    import tempfile
    import time

    if len(argv) >= 2:  # python realtools.py BUILDER ROOT [SEED [KEY=VALUE...]]
        name, root = argv[0], Path(argv[1])
        kwargs = dict(a.split("=", 1) for a in argv[3:])
        result = BUILDERS[name](root, int(argv[2]) if len(argv) > 2 else 0, **kwargs)
        print(result.run if isinstance(result, HFRun) else result)
        return 0
    jobs = [("build_hf_classifier_run", build_hf_classifier_run, {}),
            ("build_hf_causal_lm_run", build_hf_causal_lm_run, {}),
            ("build_timm_run", build_timm_run, {}),
            *[(f"build_lightning_run[{c}]", build_lightning_run, {"callback": c}) for c in LIGHTNING_CALLBACKS],
            ("build_averaged_model_run", build_averaged_model_run, {})]
    timings = []
    t0 = time.perf_counter()
    import lightning.pytorch  # noqa: F401  (imports apart, so that the builders' times below are their own)
    import timm  # noqa: F401
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401
    timings.append(("import torch, transformers, timm, lightning", time.perf_counter() - t0))
    with tempfile.TemporaryDirectory(prefix="realtools-") as tmp:
        for i, (label, fn, kw) in enumerate(jobs):
            root = Path(tmp) / f"{i}-{fn.__name__}"
            t0 = time.perf_counter()
            fn(root, **kw)
            dt = time.perf_counter() - t0
            timings.append((label, dt))
            print(f"== {label}: {dt:.1f} s  ({root})\n{_tree(root)}", flush=True)
    print("\ntimings:")
    for label, dt in timings:
        print(f"  {dt:6.1f} s  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
