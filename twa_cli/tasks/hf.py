"""Hugging Face transformers models, built from the checkpoint's own `config.json`, offline.

The class is the one the config's `architectures` names (looked up in transformers' own namespace: a
registry, never `trust_remote_code`), or an `AutoModelFor...` the user names (`--model hf:AutoModelForCausalLM`),
built with `from_config`: no weights are downloaded, the checkpoints supply them. Tied weights (GPT-2's
`lm_head.weight`, which Hugging Face's files leave out) are one parameter, in the subspace once.

Two tasks come with it. A sequence classifier learns from text rows with labels: the model's own loss (the
batch carries `labels`), accuracy and loss per example. A causal language model learns from blocks of tokens:
the model's own loss for the gradient, and per-token figures, loss, perplexity and token accuracy, counted
over the tokens that have a next token. Other heads need `--task`.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from twa_cli.errors import TwaError
from twa_cli.io.runfiles import HF_RESULT_FILE
from twa_cli.tasks.base import Batch, Task, accuracy_figures, meta_model, perplexity
from twa_cli.tasks.text import Examples, carve, classification_examples, eval_rows, lm_blocks, read_rows
from twa_cli.units import first_line

CLASSIFICATION, CAUSAL_LM = "sequence-classification", "causal-lm"
CONFIG_FILE = "config.json"
# The files a tokenizer is saved as (also any SentencePiece `*.model`).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise TwaError("this checkpoint is a Hugging Face model: pip install 'twa-cli[hf]' (transformers)") from exc
    return transformers


def config_dir_of(path: Path) -> Path | None:
    """The folder holding the `config.json` of a checkpoint (a Hugging Face folder, or a file inside one)."""
    path = Path(path)
    for folder in (path, path.parent) if path.is_dir() else (path.parent,):
        if (folder / CONFIG_FILE).is_file():
            return folder
    return None


class UnsafeConfig(TwaError):
    """A config.json that asks for something twa never does (a download): refused, never passed over."""


def buildable(folder: Path, *, required: bool = False) -> bool:
    """Whether transformers is installed and knows the architecture this folder's config.json names. `required`:
    say why not, as an error. An unsafe config is an error either way."""
    try:
        config = load_config(folder)
        model_class(config, None, str(Path(folder) / CONFIG_FILE))
    except UnsafeConfig:
        raise
    except TwaError:
        if required:
            raise
        return False
    return True


# Config keys whose value transformers may resolve to code fetched from the Hub (attention kernels).
HUB_CODE_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal")


def _refuse_hub_code(config: Any, where: Path) -> None:
    """A config file never switches on a download: an attention implementation naming a Hub repository
    ("org/kernel") is refused, in the config and in any sub-config."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key in HUB_CODE_KEYS and isinstance(value, str) and ("/" in value or ":" in value):
                raise UnsafeConfig(f"{where}: its {key} {value!r} names code on the Hugging Face Hub; twa never "
                               "downloads (set it to 'eager' or 'sdpa')")
            _refuse_hub_code(value, where)
    elif isinstance(config, list):
        for value in config:
            _refuse_hub_code(value, where)


def load_config(folder: Path) -> Any:
    where = Path(folder) / CONFIG_FILE
    try:
        raw = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TwaError(f"{where}: not a configuration transformers can read ({first_line(exc)})") from exc
    _refuse_hub_code(raw, where)
    transformers = _transformers()
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises ValueError, OSError, KeyError ... for configs it cannot read
        where = folder / CONFIG_FILE
        raise TwaError(f"{where}: not a configuration transformers can read ({first_line(exc)})") from exc


def model_class(config: Any, auto_class: str | None, where: str) -> Any:
    """The class to build: an AutoModelFor... the user named, else the config's `architectures[0]`."""
    transformers = _transformers()
    if auto_class is not None:
        cls = getattr(transformers, auto_class, None) if auto_class.startswith("AutoModel") else None
        if cls is None:
            raise TwaError(f"--model hf:{auto_class}: not a transformers AutoModel class (e.g. "
                           "hf:AutoModelForSequenceClassification, hf:AutoModelForCausalLM)")
        return cls
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise TwaError(f"{where}: its config names no transformers architecture ({names or 'none'}); pass "
                       "--model hf:AutoModelFor... to choose one")
    return cls


def kind_of(cls: Any) -> str | None:
    """What a model class (or AutoModelFor... class) predicts, by its name."""
    name = cls.__name__
    if name.endswith("ForSequenceClassification"):
        return CLASSIFICATION
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return CAUSAL_LM
    return None


class HFTask(Task):
    """A transformers model from a config folder, on local text data (`twa_cli.tasks.text`); a subclass per
    head says what an example is and what is measured."""

    def __init__(self, model_dir: Path, auto_class: str | None, data: Mapping[str, Any] | None):
        self.model_dir = Path(model_dir)
        self.auto_class = auto_class
        self.data_spec = dict(data or {})
        self.config = load_config(self.model_dir)
        self.cls = model_class(self.config, auto_class, str(self.model_dir / CONFIG_FILE))

    @property
    def has_data(self) -> bool:
        return bool(self.data_spec)

    def outline_model(self) -> nn.Module:
        try:
            return meta_model(self.build_model)  # transformers builds the same structure there
        except TwaError:  # a model whose construction computes with its weights: no user code runs, so build it
            return self.build_model()

    def build_model(self) -> nn.Module:
        try:
            model = self.cls.from_config(self.config) if self.auto_class else self.cls(self.config)
        except Exception as exc:
            raise TwaError(f"{self.model_dir / CONFIG_FILE}: transformers cannot build {self.cls.__name__} from it "
                           f"({first_line(exc)})") from exc
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False  # no key/value cache: training and scoring take whole sequences
        if getattr(model, "loss_type", "") is None:
            # A class whose name maps to no loss type (GPT2LMHeadModel) falls back to the causal-LM loss, with a
            # notice at every forward pass that asks nothing of the user; naming that same loss silences it alone.
            model.loss_type = "ForCausalLM"
        return model

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hf": {"dir": str(self.model_dir.resolve()), "auto_class": self.auto_class}}
        if self.data_spec:
            out["data"] = self.data_spec
        return out

    result_name = HF_RESULT_FILE

    def export(self, state: Mapping[str, torch.Tensor], folder: Path) -> list[Path]:
        from twa_cli.io.writers import copy_model_files

        return copy_model_files(self.model_dir, Path(folder))

    @cached_property
    def tokenizer(self) -> Any:
        folder = Path(self.data_spec.get("tokenizer") or self.model_dir)
        if not any((folder / name).is_file() for name in TOKENIZER_FILES) and not any(folder.glob("*.model")):
            # transformers would build an empty tokenizer from config.json alone: every word unknown
            raise TwaError(f"{folder}: holds no tokenizer (no {', '.join(TOKENIZER_FILES[:3])}, ...); pass --tokenizer "
                           "DIR, a folder the run's tokenizer was saved in")
        try:
            return _transformers().AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                                 trust_remote_code=False)
        except Exception as exc:
            raise TwaError(f"{folder}: holds no tokenizer transformers can read ({first_line(exc)}); pass "
                           "--tokenizer DIR") from exc

    @cached_property
    def splits(self) -> dict[str, Examples]:
        if not self.data_spec:
            raise TwaError(f"{self.model_dir}: which text does it learn from? pass --data FILE (and --eval-data FILE)")
        spec = self.data_spec
        splits: dict[str, Examples] = {}
        if spec.get("train"):  # held-out text alone (--eval-data without --data) scores, and trains nothing
            splits["train"] = self._examples(read_rows(Path(spec["train"])), spec["train"])
            if spec.get("val_split"):
                splits["train"], splits["val"] = carve(splits["train"], float(spec["val_split"]))
        held = eval_rows(spec)
        if spec.get("val"):
            splits["val"] = self._examples(read_rows(Path(spec["val"])), spec["val"])
        if held is not None:
            splits["test"] = self._examples(held, spec.get("eval") or spec["train"])
        elif "val" in splits and not spec.get("val"):
            splits["test"] = splits["val"]
        return splits

    def dataset(self, split: str, *, augment: bool) -> Dataset | None:
        if split == "train" and "train" not in self.splits:
            raise TwaError(f"{self.model_dir}: which text does it learn from? --eval-data is only scored on; pass "
                           "--data FILE")
        return self.splits.get(split)

    @abstractmethod
    def _examples(self, rows: Any, where: str) -> Examples:
        """Tokenized examples of some rows (or text) of `where`."""

    def _max_length(self) -> int:
        """The most tokens the model takes (its positions, or the tokenizer's limit if smaller)."""
        limits = [getattr(self.config, k, None) for k in ("max_position_embeddings", "n_positions")]
        limits.append(getattr(self.tokenizer, "model_max_length", None))
        known = [v for v in limits if isinstance(v, int) and 0 < v < 10**9]  # tokenizers say 1e30 for "no limit"
        return min(known) if known else 512


class HFClassificationTask(HFTask):
    """Text rows with labels; `model(**batch)` returns its own loss and the logits."""

    tallies = ("loss", "examples", "correct")
    selection_metric = ("accuracy", True)

    def _examples(self, rows: Any, where: str) -> Examples:
        if isinstance(rows, str):
            raise TwaError(f"{where}: a classifier needs rows with a text and a label column (TSV, CSV, JSONL)")
        num = int(getattr(self.config, "num_labels", 2))
        label_ids = {str(k): int(v) for k, v in (getattr(self.config, "label2id", None) or {}).items()}
        label_ids.update({str(i): i for i in range(num)})
        return classification_examples(rows, self.tokenizer, self.data_spec, label_ids, self._max_length(), where)

    @cached_property
    def _collator(self) -> Any:
        return _transformers().DataCollatorWithPadding(self.tokenizer)

    def collate(self, examples: Any) -> Batch:
        return dict(self._collator(list(examples)))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(**batch).loss

    def measure(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(**batch)
        with torch.no_grad():
            labels = batch["labels"]
            n = torch.tensor(float(len(labels)), dtype=torch.float64, device=labels.device)
            correct = (out.logits.argmax(-1) == labels).sum().double()
            tallies = torch.stack([out.loss.detach().double() * n, n, correct])
        return out.loss, tallies

    def figures(self, totals: Mapping[str, float]) -> dict[str, float]:
        return accuracy_figures(totals)


class HFCausalLMTask(HFTask):
    """Blocks of tokens, each its own labels; figures per predicted token."""

    tallies = ("loss", "tokens", "correct")
    unit = "tokens"
    selection_metric = ("loss", False)

    def _examples(self, rows: Any, where: str) -> Examples:
        block = int(self.data_spec.get("block_size") or min(self._max_length(), 1024))
        if block > self._max_length():
            raise TwaError(f"--block-size {block}: longer than the model's {self._max_length()} positions")
        return lm_blocks(rows, self.tokenizer, self.data_spec, block, where)

    def collate(self, examples: Any) -> Batch:
        ids = torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(**batch).loss

    def measure(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(**batch)
        with torch.no_grad():
            logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
            mask = labels != -100
            tokens = mask.sum().double()
            summed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                     ignore_index=-100, reduction="sum").double()
            correct = ((logits.argmax(-1) == labels) & mask).sum().double()
            tallies = torch.stack([summed, tokens, correct])
        return out.loss, tallies

    def figures(self, totals: Mapping[str, float]) -> dict[str, float]:
        tokens = max(totals["tokens"], 1.0)
        loss = totals["loss"] / tokens
        return {"loss": loss, "perplexity": perplexity(loss), "token_accuracy": 100.0 * totals["correct"] / tokens}


def hf_task(model_dir: Path, auto_class: str | None, data: Mapping[str, Any] | None) -> HFTask:
    """The task of a Hugging Face model, by its head."""
    cls = model_class(load_config(model_dir), auto_class, str(Path(model_dir) / CONFIG_FILE))
    kinds = {CLASSIFICATION: HFClassificationTask, CAUSAL_LM: HFCausalLMTask}
    if kind_of(cls) not in kinds:
        raise TwaError(f"{Path(model_dir) / CONFIG_FILE}: {cls.__name__} is neither a sequence classifier nor a "
                       "causal language model; give its loss and data as a task of your own (--task)")
    return kinds[kind_of(cls)](model_dir, auto_class, data)
