"""`twa` on checkpoints written by the real training tools (tests/realtools.py builds each run with the tool
itself): Hugging Face's Trainer (BERT classifier, GPT-2 with tied embeddings), timm's CheckpointSaver with
ModelEmaV3, Lightning's ModelCheckpoint with and without its averaging callbacks, and torch's AveragedModel.

Every run is built once per module; everything `twa` does goes through its command line (the `twa` fixture).
What the tests compare against is computed here, independently, from what the tools wrote: the arithmetic
mean of the files (as the tools load them), a model loaded with `from_pretrained` / `load_from_checkpoint` /
`timm.create_model`, and evaluations written out by hand. Results in Hugging Face's layout are also loaded with
transformers 4.57 in a subprocess (TRANSFORMERS4).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import realtools
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

# transformers 4.57 installed apart (scripts/test.sh puts it in $TWA_TRANSFORMERS4, by default
# <repo>/.cache/transformers4); tests that need it FAIL when it is not there.
TRANSFORMERS4 = realtools.TRANSFORMERS4

SENTENCE = "the cat sees a tree, what a lovely movie"


# ------------------------------------------------------------------------------------------------ helpers


def summary(run: Any) -> dict[str, Any]:
    """The --json summary a command printed on stdout."""
    return json.loads(run.stdout)


def floating_mean(states: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The fp64 arithmetic mean of every floating tensor of some state dicts (in order)."""
    out = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            total = first.to(torch.float64).clone()
            for state in states[1:]:
                total += state[name].to(torch.float64)
            out[name] = total / len(states)
    return out


def assert_mean(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str) -> None:
    """Every floating tensor of `expected` (an fp64 mean) equals `actual`'s, stored as fp32, at fp32 tolerance."""
    assert expected, "nothing to compare"
    for name, value in expected.items():
        assert name in actual, f"{what}: no tensor '{name}' (has {sorted(actual)[:5]}...)"
        got = actual[name]
        assert got.dtype == torch.float32, f"{what}: '{name}' is {got.dtype}"
        torch.testing.assert_close(got.double(), value, rtol=1.3e-6, atol=1e-5,
                                   msg=lambda m, n=name: f"{what}: '{n}': {m}")


def assert_some_floating_differ(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    common = [k for k in a if k in b and a[k].is_floating_point()]
    assert common
    assert any(not torch.equal(a[k], b[k]) for k in common), "the two results are identical"


def plain_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata() or {})


def plain_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def one_line_error(run: Any) -> str:
    """The single `error: ...` line of a refused command (exit 1, no traceback)."""
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1, run.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "Traceback" not in run.stderr
    return lines[0]


def entry_names(report: Mapping[str, Any]) -> list[str]:
    return [Path(e["path"]).name for e in report["entries"]]


# A result in Hugging Face's layout, loaded with the transformers of the interpreter running this script: the
# loading info, the tokenizer's class and ids, whether lm_head is tied to wte, and the largest difference
# between the loaded weights and the folder's model.safetensors.
LOAD_SCRIPT = r"""
import json, sys
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

transformers.utils.logging.set_verbosity_error()
kind, sentence, folders = sys.argv[1], sys.argv[2], sys.argv[3:]
cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
out = {"version": transformers.__version__, "folders": {}}
for folder in folders:
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    state = model.state_dict()
    stored = load_file(folder + "/model.safetensors")
    diff = max(float((state[k].double() - v.double()).abs().max()) if k in state else float("inf")
               for k, v in stored.items())
    row = {k: sorted(map(str, v)) for k, v in info.items()}
    row.update(tokenizer=type(tokenizer).__name__, ids=tokenizer(sentence)["input_ids"], max_diff=diff)
    if kind == "causal":
        row["tied"] = model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    out["folders"][folder] = row
print(json.dumps(out))
"""


def load_in_transformers4(kind: str, *folders: Path) -> dict[str, Any]:
    """LOAD_SCRIPT run under transformers 4.57: the side environment TRANSFORMERS4 alone on the path."""
    if not (TRANSFORMERS4 / "transformers").is_dir():
        pytest.fail(f"transformers 4.57 is not installed in {TRANSFORMERS4} (scripts/test.sh installs it)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(TRANSFORMERS4)  # with -S: the side environment alone (it links torch from this one)
    proc = subprocess.run([sys.executable, "-S", "-c", LOAD_SCRIPT, kind, SENTENCE, *map(str, folders)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["version"].startswith("4.57"), result["version"]
    return result


def assert_loads_cleanly(info: Mapping[str, Any], where: str) -> None:
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not list(info.get(key) or []), f"{where}: {key} = {info[key]}"


# ------------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("realtools")


@pytest.fixture(scope="module")
def bert(root: Path) -> realtools.HFRun:
    return realtools.build_hf_classifier_run(root / "bert")


@pytest.fixture(scope="module")
def bert_swa(bert: realtools.HFRun, root: Path, twa) -> Path:
    out = root / "bert-swa"
    twa("swa", bert.run, "-o", out)
    return out


@pytest.fixture(scope="module")
def bert_twa(bert: realtools.HFRun, root: Path, twa) -> tuple[Path, dict[str, Any]]:
    out = root / "bert-twa"
    run = twa("train-subspace", bert.run, "-o", out, "--data", bert.train, "--eval-data", bert.test, "--epochs", 2,
              "--json")
    return out, summary(run)


@pytest.fixture(scope="module")
def gpt(root: Path) -> realtools.HFRun:
    return realtools.build_hf_causal_lm_run(root / "gpt")


@pytest.fixture(scope="module")
def gpt_swa(gpt: realtools.HFRun, root: Path, twa) -> Path:
    out = root / "gpt-swa"
    twa("swa", gpt.run, "-o", out)
    return out


@pytest.fixture(scope="module")
def gpt_twa(gpt: realtools.HFRun, root: Path, twa) -> tuple[Path, dict[str, Any]]:
    out = root / "gpt-twa"
    run = twa("train-subspace", gpt.run, "-o", out, "--data", gpt.train, "--eval-data", gpt.test, "--block-size", 32,
              "--epochs", 2, "--json")
    return out, summary(run)


@pytest.fixture(scope="module")
def timm_run(root: Path) -> Path:
    return realtools.build_timm_run(root / "timm")


@pytest.fixture(scope="module")
def timm_averages(timm_run: Path, root: Path, twa) -> dict[bool, Path]:
    """`twa swa` of the timm run without and with --ema (no model flags)."""
    raw, ema = root / "timm-avg.safetensors", root / "timm-avg-ema.safetensors"
    twa("swa", timm_run, "-o", raw)
    twa("swa", timm_run, "-o", ema, "--ema")
    return {False: raw, True: ema}


@pytest.fixture(scope="module")
def image_folder(root: Path) -> Path:
    """3 class folders of random 32x32 RGB PNGs: 8 each under train/, 4 each under val/."""
    from PIL import Image

    folder = root / "images"
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 8), ("val", 4)):
        for label in ("ants", "bees", "wasps"):
            target = folder / split / label
            target.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy(), mode="RGB").save(target / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def timm_twa(timm_run: Path, image_folder: Path, root: Path, twa) -> dict[str, tuple[Path, dict[str, Any]]]:
    """train-subspace of the timm run on the image folder: the model named by the checkpoints' `arch` ("arch"),
    and named by --model ("flag"; without the lr check, which the first run shows keeps the lr as given)."""
    common = ("--data", "imagefolder", "--data-dir", image_folder, "--epochs", 1, "--batch-size", 8, "--json")
    out = {}
    run = twa("train-subspace", timm_run, "-o", root / "timm-twa", *common)
    out["arch"] = (root / "timm-twa", summary(run))
    run = twa("train-subspace", timm_run, "-o", root / "timm-twa-flag", "--model", "timm:test_resnet", *common,
              "--no-lr-check")
    out["flag"] = (root / "timm-twa-flag", summary(run))
    return out


@pytest.fixture(scope="module")
def lightning(root: Path) -> Callable[[str], Path]:
    """build_lightning_run(callback=...), each callback's run built once."""
    built: dict[str, Path] = {}

    def get(callback: str) -> Path:
        if callback not in built:
            built[callback] = realtools.build_lightning_run(root / f"lightning-{callback}", callback=callback)
        return built[callback]

    return get


def epoch_files(ckpts: Path, epochs: range = range(4)) -> list[Path]:
    """Lightning's epoch=E-val_loss=X.ckpt files, by epoch."""
    files = [next(ckpts.glob(f"epoch={e}-*.ckpt")) for e in epochs]
    assert all(f.is_file() for f in files)
    return files


def without_prefix(state: Mapping[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    assert all(k.startswith(prefix) for k in state), sorted(state)
    return {k.removeprefix(prefix): v for k, v in state.items()}


@pytest.fixture(scope="module")
def averaged_model_run(root: Path) -> Path:
    return realtools.build_averaged_model_run(root / "averaged")


# ------------------------------------------------------------------------------------------------ 1. BERT


def test_hf_classifier_inspect_lists_the_checkpoint_folders_by_step(bert: realtools.HFRun, twa):
    assert (bert.run / "model.safetensors").is_file()  # the final model the Trainer saved beside them
    report = summary(twa("inspect", bert.run, "--json"))
    assert [Path(e["path"]).resolve() for e in report["entries"]] == [p.resolve() for p in bert.checkpoints]
    assert entry_names(report) == ["checkpoint-16", "checkpoint-32", "checkpoint-48", "checkpoint-64"]
    assert [e["step"] for e in report["entries"]] == [16, 32, 48, 64]
    assert report["selected"] == 4 and report["compatible"]
    assert report["architecture"] == "hf:BertForSequenceClassification"


def test_hf_classifier_swa_folder_loads_in_transformers5_as_the_mean(bert: realtools.HFRun, bert_swa: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    files = [load_file(p / "model.safetensors") for p in bert.checkpoints]
    written = load_file(bert_swa / "model.safetensors")
    assert sorted(written) == sorted(files[0])
    expected = floating_mean(files)
    assert len(expected) == len(files[0]) == 41
    assert_mean(written, expected, "BERT SWA file")
    model, info = AutoModelForSequenceClassification.from_pretrained(bert_swa, output_loading_info=True)
    assert_loads_cleanly(info, str(bert_swa))
    assert_mean(model.state_dict(), expected, "BERT SWA loaded by transformers 5")
    tokenizer = AutoTokenizer.from_pretrained(bert_swa)
    original = AutoTokenizer.from_pretrained(bert.checkpoints[-1])
    assert tokenizer(SENTENCE)["input_ids"] == original(SENTENCE)["input_ids"]


def test_hf_classifier_results_load_in_transformers4(bert: realtools.HFRun, bert_swa: Path,
                                                     bert_twa: tuple[Path, dict[str, Any]]):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(bert.checkpoints[-1])(SENTENCE)["input_ids"]
    result = load_in_transformers4("classifier", bert_swa, bert_twa[0])
    for folder, row in result["folders"].items():
        assert_loads_cleanly(row, f"{folder} in transformers 4.57")
        assert row["ids"] == ids, f"{folder}: the tokenizer tokenizes differently in transformers 4.57"
        assert row["max_diff"] == 0.0, f"{folder}: transformers 4.57 loaded other weights than the file holds"


def test_hf_classifier_train_subspace_writes_a_loadable_model(bert: realtools.HFRun,
                                                              bert_twa: tuple[Path, dict[str, Any]]):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, result = bert_twa
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "coefficients.json"):
        assert (out / name).is_file(), name
    assert Path(result["checkpoint"]).resolve() == (out / "model.safetensors").resolve()
    coefficients = json.loads((out / "coefficients.json").read_text())
    assert len(coefficients["coefficients"]) == 4
    assert [c["alpha"] for c in coefficients["coefficients"]] == pytest.approx(result["coefficients"])
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert_loads_cleanly(info, str(out))
    stored = load_file(out / "model.safetensors")
    state = model.state_dict()
    assert sorted(stored) == sorted(load_file(bert.checkpoints[0] / "model.safetensors"))
    assert all(torch.equal(state[k], v) for k, v in stored.items())
    assert AutoTokenizer.from_pretrained(out)(SENTENCE)["input_ids"] == \
        AutoTokenizer.from_pretrained(bert.checkpoints[-1])(SENTENCE)["input_ids"]


def test_hf_classifier_eval_matches_an_independent_evaluation(bert: realtools.HFRun,
                                                              bert_twa: tuple[Path, dict[str, Any]], twa):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, trained = bert_twa
    reported = summary(twa("eval", out, "--json"))["results"][0]["test"]
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    rows = realtools.read_tsv(bert.test)
    losses, correct = [], 0
    with torch.no_grad():
        for sentence, label in rows:
            logits = model(**tokenizer(sentence, return_tensors="pt")).logits.double()
            losses.append(float(F.cross_entropy(logits, torch.tensor([label]))))
            correct += int(int(logits.argmax(-1)) == label)
    assert reported["count"] == len(rows) == 32
    assert reported["accuracy"] == pytest.approx(100.0 * correct / len(rows), abs=1e-6)
    assert reported["loss"] == pytest.approx(sum(losses) / len(rows), abs=1e-6)
    assert trained["test"]["loss"] == pytest.approx(reported["loss"], abs=1e-6)  # the figure train-subspace printed


def test_hf_eval_scores_every_file_on_the_data_one_of_them_records(bert: realtools.HFRun,
                                                                     bert_twa: tuple[Path, dict[str, Any]], twa):
    # As the README shows: the TWA result records its data; the Trainer's checkpoint beside it records none.
    out, _ = bert_twa
    together = summary(twa("eval", out, bert.checkpoints[-1], "--json"))["results"]
    alone = summary(twa("eval", bert.checkpoints[-1], "--data", bert.train, "--eval-data", bert.test,
                        "--json"))["results"][0]
    assert together[1]["test"] == alone["test"] and together[1]["test"]["count"] == 32


@pytest.mark.parametrize("broken", ["short tsv row", "json row without text", "null label"])
def test_hf_classifier_data_row_without_a_value_is_named(bert: realtools.HFRun, bert_twa: tuple[Path, dict[str, Any]],
                                                         tmp_path: Path, broken: str, twa):
    rows = realtools.read_tsv(bert.test)
    if broken == "short tsv row":
        path = tmp_path / "test.tsv"
        path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows[:3]) + "no label here\n")
        column = "label"
    else:
        path = tmp_path / "test.jsonl"
        lines = [json.dumps({"sentence": s, "label": y}) for s, y in rows[:3]]
        lines.append(json.dumps({"label": 1}) if broken == "json row without text" else
                     json.dumps({"sentence": "fine", "label": None}))
        path.write_text("\n".join(lines) + "\n")
        column = "sentence" if broken == "json row without text" else "label"
    line = one_line_error(twa("eval", bert_twa[0], "--data", bert.train, "--eval-data", path, check=False))
    number = 5 if broken == "short tsv row" else 4  # the line of the file (the TSV's first is its header)
    assert str(path) in line and f"line {number}" in line and f"'{column}'" in line, line


@pytest.mark.parametrize("with_training_text", [False, True])
def test_greedy_soup_selects_on_the_given_validation_file(bert: realtools.HFRun, tmp_path: Path,
                                                          with_training_text: bool, twa):
    """`swa --greedy --val-data FILE` was refused for --val-split: a Hugging Face model has no BatchNorm, so the
    validation file (and the checkpoints' tokenizer) is all the soup needs; it scores on that file."""
    out = tmp_path / "soup"
    data = ["--data", bert.train] if with_training_text else []
    soup = summary(twa("swa", bert.run, "-o", out, "--greedy", "--val-data", bert.test, *data, "--json"))
    assert soup["chosen"] and len(soup["individual_val"]) == soup["checkpoints"]
    scored = summary(twa("eval", out, "--eval-data", bert.test, "--json"))["results"][0]["test"]
    assert soup["val"] == pytest.approx(scored["accuracy"], abs=1e-9)
    alone = summary(twa("eval", *(c / "model.safetensors" for c in bert.checkpoints), "--eval-data", bert.test,
                        "--json"))["results"]
    assert sorted(soup["individual_val"]) == pytest.approx(sorted(r["test"]["accuracy"] for r in alone), abs=1e-9)


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl"])
def test_a_text_column_the_file_lacks_is_named_not_replaced(bert: realtools.HFRun, tmp_path: Path, suffix: str, twa):
    """`--text-column review` on a file with `sentence` and `label` columns used `sentence` in its place: a
    column the user names must be there (guessing the one other column is only for the default name)."""
    rows = realtools.read_tsv(bert.test)[:4]
    path = tmp_path / f"test{suffix}"
    if suffix == ".tsv":
        path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    else:
        path.write_text("".join(json.dumps({"sentence": s, "label": y}) + "\n" for s, y in rows))
    line = one_line_error(twa("eval", bert.checkpoints[-1], "--data", path, "--eval-data", path,
                              "--text-column", "review", check=False))
    assert str(path) in line and "'review'" in line and "--text-column" in line, line
    # Unnamed, the one column beside the label is still the text (SST-2 calls it `sentence`).
    twa("eval", bert.checkpoints[-1], "--data", path, "--eval-data", path)


@pytest.mark.parametrize("flags", [["--text-column", "label"], ["--label-column", "sentence", "--text-column",
                                                                  "sentence"]], ids=["text-is-label", "label-is-text"])
def test_one_column_as_both_text_and_label_is_refused(bert: realtools.HFRun, flags: list[str], twa):
    """`--text-column label` read the labels as the text and scored them (50%), silently."""
    line = one_line_error(twa("eval", bert.checkpoints[-1], "--eval-data", bert.test, *flags, check=False))
    assert "--text-column" in line and "--label-column" in line and "both" in line, line


@pytest.mark.parametrize("row, column, blank", [
    ({"sentence": ["the", "cat"], "label": 1}, "sentence", False),
    ({"sentence": 42, "label": 1}, "sentence", True),
    ({"sentence": {"text": "a"}, "label": 1}, "sentence", False),
    ({"sentence": "the cat sees a tree", "label": True}, "label", True),
    ({"sentence": "the cat sees a tree", "label": [1]}, "label", False),
    ({"sentence": "the cat sees a tree", "label": 1.0}, "label", False),
], ids=["text-list", "text-number", "text-object", "label-true", "label-list", "label-float"])
def test_a_jsonl_value_of_the_wrong_type_is_named_by_file_and_line(bert: realtools.HFRun, tmp_path: Path,
                                                                    row: dict[str, Any], column: str, blank: bool,
                                                                    twa):
    """A list or number where the text goes was read as its Python spelling ("['the', 'cat']"), and `true` as
    label 1: JSON values other than a string (a label: a string or a whole number) are refused, naming the line
    (blank lines counted, as an editor counts them)."""
    good = [json.dumps({"sentence": s, "label": y}) for s, y in realtools.read_tsv(bert.test)[:3]]
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(good + ([""] if blank else []) + [json.dumps(row)]) + "\n")
    line = one_line_error(twa("eval", bert.checkpoints[-1], "--data", bert.train, "--eval-data", path, check=False))
    number = 5 if blank else 4
    assert str(path) in line and f"line {number}" in line and f"'{column}'" in line, line


@pytest.mark.parametrize("name, text, number", [
    ("broken.jsonl", '{"sentence": "a fine song", "label": 1}\n\n{"sentence": "a dull song", "label": 0}\n'
                     '{"sentence": "oops"\n', 4),
    ("extra.tsv", "sentence\tlabel\na fine song\t1\na dull song\t0\tmore\n", 3),
    ("extra.csv", "sentence,label\na fine song,1\na dull song,0,more\n", 3),
], ids=["jsonl-not-json", "tsv-extra-field", "csv-extra-field"])
def test_a_malformed_line_of_text_data_is_named(bert: realtools.HFRun, tmp_path: Path, name: str, text: str,
                                                number: int, twa):
    """A JSON error was reported at the line of its own text ('line 2 column 1' for the file's line 4); a row
    with more fields than the header was read with a column named None, and the error spoke of columns."""
    path = tmp_path / name
    path.write_text(text)
    line = one_line_error(twa("eval", bert.checkpoints[-1], "--eval-data", path, check=False))
    assert f"{path}: line {number}" in line and "None" not in line, line


@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_a_run_saved_without_its_tokenizer_asks_for_one(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
                                                        twa):
    # transformers 5 builds an empty tokenizer from config.json alone: every word [UNK], scored without a word.
    run: realtools.HFRun = request.getfixturevalue(kind)
    copy = tmp_path / "run"
    shutil.copytree(run.run, copy)
    for path in copy.glob("checkpoint-*/*"):
        if path.name not in ("config.json", "model.safetensors", "trainer_state.json", "training_args.bin"):
            path.unlink()
    last = sorted(copy.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    extra = ["--block-size", "32"] if kind == "gpt" else []
    line = one_line_error(twa("eval", last, "--data", run.train, "--eval-data", run.test, *extra, check=False))
    assert str(last) in line and "no tokenizer" in line and "--tokenizer" in line, line
    scored = summary(twa("eval", last, "--data", run.train, "--eval-data", run.test, *extra, "--tokenizer",
                         run.checkpoints[-1], "--json"))["results"][0]["test"]
    original = summary(twa("eval", run.checkpoints[-1], "--data", run.train, "--eval-data", run.test, *extra,
                           "--json"))["results"][0]["test"]
    assert scored == original


# ------------------------------------------------------------------------------------------------ 2. GPT-2


def _run_with_config(run: Path, dest: Path, **changes: Any) -> Path:
    """A copy of a Trainer run whose checkpoints' config.json has `changes`."""
    shutil.copytree(run, dest)
    for config in dest.glob("checkpoint-*/config.json"):
        config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
    return dest


@pytest.mark.parametrize("key", ["attn_implementation", "_attn_implementation"])
def test_a_config_naming_hub_code_is_refused_whatever_the_command(gpt: realtools.HFRun, tmp_path: Path, key: str,
                                                                   twa):
    run = _run_with_config(gpt.run, tmp_path / "run", **{key: "kernels-community/flash-attn"})
    for args in (("swa", run, "-o", tmp_path / "avg"), ("train-subspace", run, "-o", tmp_path / "twa", "--data",
                                                         gpt.train, "--block-size", 32)):
        line = one_line_error(twa(*args, check=False))
        assert "config.json" in line and "kernels-community/flash-attn" in line and "Hub" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_swa_with_text_data_on_a_model_transformers_cannot_build_says_so(gpt: realtools.HFRun, tmp_path: Path, twa):
    run = _run_with_config(gpt.run, tmp_path / "run", architectures=["NoSuchLMHeadModel"])
    line = one_line_error(twa("swa", run, "-o", tmp_path / "avg", "--data", gpt.train, "--block-size", 32,
                              check=False))
    assert "config.json" in line and "NoSuchLMHeadModel" in line, line
    assert not (tmp_path / "avg").exists()
    twa("swa", run, "-o", tmp_path / "avg")  # without data: a model-free average, as before
    assert (tmp_path / "avg" / "model.safetensors").exists()


def test_hf_causal_lm_inspect_lists_the_checkpoint_folders_by_step(gpt: realtools.HFRun, twa):
    assert (gpt.run / "model.safetensors").is_file()
    report = summary(twa("inspect", gpt.run, "--json"))
    assert [Path(e["path"]).resolve() for e in report["entries"]] == [p.resolve() for p in gpt.checkpoints]
    assert [e["step"] for e in report["entries"]] == [4, 8, 12, 16]
    assert report["selected"] == 4 and report["compatible"]
    assert report["architecture"] == "hf:GPT2LMHeadModel"


def test_hf_causal_lm_swa_folder_loads_tied_in_transformers5_as_the_mean(gpt: realtools.HFRun, gpt_swa: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = [load_file(p / "model.safetensors") for p in gpt.checkpoints]
    assert "lm_head.weight" not in files[0]
    written = load_file(gpt_swa / "model.safetensors")
    assert sorted(written) == sorted(files[0])  # no lm_head.weight added: it is tied to wte
    expected = floating_mean(files)
    assert_mean(written, expected, "GPT-2 SWA file")
    model, info = AutoModelForCausalLM.from_pretrained(gpt_swa, output_loading_info=True)
    assert_loads_cleanly(info, str(gpt_swa))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert_mean(model.state_dict(), expected, "GPT-2 SWA loaded by transformers 5")
    assert AutoTokenizer.from_pretrained(gpt_swa)(SENTENCE)["input_ids"] == \
        AutoTokenizer.from_pretrained(gpt.checkpoints[-1])(SENTENCE)["input_ids"]


def test_hf_causal_lm_results_load_tied_in_transformers4(gpt: realtools.HFRun, gpt_swa: Path,
                                                         gpt_twa: tuple[Path, dict[str, Any]]):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(gpt.checkpoints[-1])(SENTENCE)["input_ids"]
    result = load_in_transformers4("causal", gpt_swa, gpt_twa[0])
    for folder, row in result["folders"].items():
        assert_loads_cleanly(row, f"{folder} in transformers 4.57")
        assert row["tied"], f"{folder}: lm_head is not tied to wte in transformers 4.57"
        assert row["ids"] == ids, f"{folder}: the tokenizer tokenizes differently in transformers 4.57"
        assert row["max_diff"] == 0.0, f"{folder}: transformers 4.57 loaded other weights than the file holds"


def test_hf_causal_lm_train_subspace_writes_a_loadable_tied_model(gpt: realtools.HFRun,
                                                                  gpt_twa: tuple[Path, dict[str, Any]]):
    from transformers import AutoModelForCausalLM

    out, result = gpt_twa
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "coefficients.json"):
        assert (out / name).is_file(), name
    assert len(json.loads((out / "coefficients.json").read_text())["coefficients"]) == 4
    stored = load_file(out / "model.safetensors")
    assert sorted(stored) == sorted(load_file(gpt.checkpoints[0] / "model.safetensors"))
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert_loads_cleanly(info, str(out))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in stored.items())
    assert result["test"]["unit"] == "tokens"


def test_hf_causal_lm_eval_matches_an_independent_per_token_evaluation(gpt: realtools.HFRun,
                                                                       gpt_twa: tuple[Path, dict[str, Any]], twa):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, trained = gpt_twa
    reported = summary(twa("eval", out, "--json"))["results"][0]["test"]
    assert {"loss", "perplexity", "token_accuracy"} <= set(reported)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(gpt.test.read_text(encoding="utf-8"), verbose=False)["input_ids"]
    count = len(ids) // 32
    assert count > 0
    blocks = torch.tensor(ids[: count * 32]).view(count, 32)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits.double()
    predicted, targets = logits[:, :-1], blocks[:, 1:]
    total = F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), reduction="sum")
    tokens = count * 31
    loss = float(total) / tokens
    assert reported["count"] == tokens and reported["unit"] == "tokens"
    assert reported["loss"] == pytest.approx(loss, abs=1e-6)
    assert reported["perplexity"] == pytest.approx(math.exp(reported["loss"]), rel=1e-9)
    assert reported["token_accuracy"] == pytest.approx(
        100.0 * float((predicted.argmax(-1) == targets).double().mean()), abs=1e-6)
    assert trained["test"]["loss"] == pytest.approx(reported["loss"], abs=1e-6)


def test_a_language_model_command_prints_no_loss_type_notice(gpt: realtools.HFRun, twa):
    """Issue 21 F6: transformers' "`loss_type=None` ... unrecognized" notice was printed by every command on
    GPT-2 (whose class name maps to no loss type); twa names the loss transformers falls back to, and other
    warnings still show. Run as its own process: transformers prints the notice once per process."""
    checkpoint = sorted(gpt.run.glob("checkpoint-*"))[-1]
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-m", "twa_cli", "eval", checkpoint, "--data", gpt.train, "--eval-data",
                           gpt.test, "--block-size", "32"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "loss_type" not in proc.stderr, proc.stderr


def test_eval_needs_only_the_eval_file_and_the_models_tokenizer(gpt: realtools.HFRun, bert: realtools.HFRun,
                                                                 gpt_twa: tuple[Path, dict[str, Any]], tmp_path: Path,
                                                                 twa):
    """New-user item 2: `twa eval CKPT --eval-data test.tsv` without --data failed; scoring reads no training
    text. The figures are those of the same eval given --data too."""
    for run, extra in ((gpt, ["--block-size", "32"]), (bert, [])):
        checkpoint = sorted(run.run.glob("checkpoint-*"))[-1]
        alone = summary(twa("eval", checkpoint, "--eval-data", run.test, *extra, "--json"))["results"][0]["test"]
        given = summary(twa("eval", checkpoint, "--data", run.train, "--eval-data", run.test, *extra,
                            "--json"))["results"][0]["test"]
        assert alone == given
    # On a result that records its data, --eval-data (and the other text flags) take the place of what it records.
    out, _ = gpt_twa
    other = tmp_path / "other.txt"
    other.write_text(gpt.test.read_text(encoding="utf-8")[: len(gpt.test.read_text(encoding="utf-8")) // 2])
    recorded = summary(twa("eval", out, "--json"))["results"][0]["test"]
    flagged = summary(twa("eval", out, "--eval-data", other, "--json"))["results"][0]["test"]
    assert 0 < flagged["count"] < recorded["count"]
    # Training still needs the training text, and says so.
    result = twa("train-subspace", gpt.run, "-o", tmp_path / "t", "--eval-data", gpt.test, check=False)
    assert result.returncode == 1 and "--data" in result.stderr.strip().splitlines()[-1], result.stderr


# ------------------------------------------------------------------------------------------------ 3. timm


def test_timm_inspect_folds_the_saver_aliases(timm_run: Path, twa):
    files = sorted(p.name for p in timm_run.glob("*.pth.tar"))
    assert files == ["checkpoint-0.pth.tar", "checkpoint-1.pth.tar", "checkpoint-2.pth.tar", "checkpoint-3.pth.tar",
                     "last.pth.tar", "model_best.pth.tar"]
    assert os.path.samefile(timm_run / "last.pth.tar", timm_run / "checkpoint-3.pth.tar")
    best = timm_run / f"checkpoint-{realtools.TIMM_BEST_EPOCH}.pth.tar"
    assert os.path.samefile(timm_run / "model_best.pth.tar", best)
    report = summary(twa("inspect", timm_run, "--json"))
    assert entry_names(report) == files[:4]
    assert report["selected"] == 4 and report["compatible"]
    assert [e["epoch"] for e in report["entries"]] == [0, 1, 2, 3]
    assert report["architecture"] == "timm:test_resnet"
    folded = {note.split(":")[0]: note for note in report["notes"] if "counted once" in note}
    assert set(folded) == {"last.pth.tar", "model_best.pth.tar"}, report["notes"]
    assert "checkpoint-3.pth.tar" in folded["last.pth.tar"]
    assert "checkpoint-1.pth.tar" in folded["model_best.pth.tar"]


def timm_average(paths: list[Path], use_ema: bool) -> dict[str, torch.Tensor]:
    """timm's own averaging (avg_checkpoints.py): load_state_dict, fp64 sums, /n, clamp to fp32, cast."""
    from timm.models import load_state_dict

    sums: dict[str, torch.Tensor] = {}
    for path in paths:
        for name, value in load_state_dict(str(path), use_ema=use_ema).items():
            if name in sums:
                sums[name] += value.to(torch.float64)
            else:
                sums[name] = value.clone().to(torch.float64)
    info = torch.finfo(torch.float32)
    return {k: (v / len(paths)).clamp(info.min, info.max).to(torch.float32) for k, v in sums.items()}


@pytest.mark.parametrize("ema", [False, True], ids=["raw", "ema"])
def test_timm_swa_is_timms_own_average_bit_for_bit(timm_run: Path, timm_averages: dict[bool, Path], ema: bool):
    expected = timm_average([timm_run / f"checkpoint-{e}.pth.tar" for e in range(4)], use_ema=ema)
    written = load_file(timm_averages[ema])
    assert sorted(written) == sorted(expected) and len(expected) == 92
    floating = [k for k, v in written.items() if v.is_floating_point()]
    assert all(k.endswith("num_batches_tracked") for k in written if k not in floating)
    assert len(floating) >= 70
    for name in floating:
        assert written[name].dtype == torch.float32, name
        assert torch.equal(written[name], expected[name]), f"'{name}' differs from timm's average"


def test_timm_swa_without_ema_differs_from_the_ema_average(timm_averages: dict[bool, Path]):
    assert_some_floating_differ(load_file(timm_averages[False]), load_file(timm_averages[True]))


@pytest.mark.parametrize("how", ["arch", "flag"])
def test_timm_train_subspace_result_loads_into_timm(timm_twa: dict[str, tuple[Path, dict[str, Any]]], how: str):
    import timm

    out, result = timm_twa[how]
    weights = out / "twa.safetensors"
    assert Path(result["checkpoint"]).resolve() == weights.resolve()
    assert len(result["coefficients"]) == 4
    assert result["test"]["count"] == 12 and result["test"]["accuracy"] is not None
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    model.load_state_dict(load_file(weights), strict=True)


def test_timm_model_named_by_the_flag_is_the_one_the_checkpoints_name(timm_twa: dict[str, tuple[Path, dict]]):
    by_arch, by_flag = timm_twa["arch"][1], timm_twa["flag"][1]
    assert by_arch["lr_check"]["used"] == by_arch["lr_check"]["requested"]  # so both trained at the same lr
    assert by_flag["coefficients"] == pytest.approx(by_arch["coefficients"], rel=1e-6, abs=1e-9)


def test_timm_run_on_an_image_folder_is_recalibrated_on_the_view_it_names(timm_run: Path, image_folder: Path,
                                                                          root: Path, twa):
    """New-user item 1: a timm run records no data, so swa recomputes BatchNorm on the plain images (not CIFAR's
    crop and flip, which lowered its accuracy), says the normalization it assumes, and records both; --augment
    and --normalize state them."""
    from twa_cli.io.checkpoints import read_checkpoint

    flags = ["--data", "imagefolder", "--data-dir", image_folder]
    plain, augmented = root / "timm-plain.safetensors", root / "timm-crop-flip.safetensors"
    said = twa("swa", timm_run, "-o", plain, *flags).stderr
    assert "--normalize" in said, said
    twa("swa", timm_run, "-o", augmented, *flags, "--augment", "crop-flip", "--normalize", "imagenet")
    assert read_checkpoint(plain).data["augment"] == "none" and "normalize" not in read_checkpoint(plain).data
    assert read_checkpoint(augmented).data == {**read_checkpoint(plain).data, "augment": "crop-flip",
                                               "normalize": "imagenet"}
    a, b = load_file(plain), load_file(augmented)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("running_var"))


# ------------------------------------------------------------------------------------------------ 4. Lightning


def test_lightning_last_ckpt_is_folded(lightning: Callable[[str], Path], twa):
    ckpts = lightning("none")
    files = epoch_files(ckpts)
    last, final = plain_load(ckpts / "last.ckpt"), plain_load(files[-1])
    assert last["epoch"] == final["epoch"] == 3
    assert all(torch.equal(last["state_dict"][k], v) for k, v in final["state_dict"].items())
    report = summary(twa("inspect", ckpts, "--json"))
    assert entry_names(report) == [f.name for f in files]
    assert [e["step"] for e in report["entries"]] == [4, 8, 12, 16]
    notes = [n for n in report["notes"] if n.startswith("last.ckpt")]
    assert len(notes) == 1 and files[-1].name in notes[0] and "counted once" in notes[0], report["notes"]


def test_lightning_swa_is_the_mean_of_the_epoch_files(lightning: Callable[[str], Path], root: Path, twa):
    ckpts = lightning("none")
    out = root / "lightning-none-avg.safetensors"
    result = summary(twa("swa", ckpts, "-o", out, "--json"))
    assert [Path(p).name for p in result["sources"]] == [f.name for f in epoch_files(ckpts)]
    expected = floating_mean([without_prefix(plain_load(f)["state_dict"]) for f in epoch_files(ckpts)])
    written = load_file(out)
    assert sorted(written) == sorted(without_prefix(plain_load(ckpts / "last.ckpt")["state_dict"]))
    assert_mean(written, expected, "Lightning SWA")


def test_a_model_free_lightning_average_evaluates_with_the_module(lightning: Callable[[str], Path], root: Path,
                                                                   tmp_path: Path, twa):
    # Averaged without --model, the names lose Lightning's `model.` prefix; the module given to eval has it.
    ckpts = lightning("none")
    bare, named = tmp_path / "bare.safetensors", tmp_path / "named.safetensors"
    twa("swa", ckpts, "-o", bare)
    module = ("--model", "realtools:TinyClassifier", "--data", "realtools:lightning_data")
    twa("swa", ckpts, "-o", named, *module, "--no-bn-update")
    scores = [summary(twa("eval", path, *module, "--json"))["results"][0]["test"] for path in (bare, named)]
    assert scores[0] == scores[1] and scores[0]["count"] > 0


def test_lightning_train_subspace_uses_the_modules_training_step(lightning: Callable[[str], Path], root: Path, twa):
    ckpts = lightning("none")
    out = root / "lightning-twa"
    result = summary(twa("train-subspace", ckpts, "-o", out, "--model", "realtools:TinyClassifier", "--data",
                         "realtools:lightning_data", "--epochs", 1, "--json"))
    assert (out / "twa.safetensors").is_file() and (out / "twa.ckpt").is_file()
    alpha = result["coefficients"]
    assert len(alpha) == 4
    assert max(abs(a - 0.25) for a in alpha) > 1e-4, f"the coefficients did not move from the center: {alpha}"
    module = realtools.TinyClassifier.load_from_checkpoint(out / "twa.ckpt", map_location="cpu")
    assert dict(module.hparams) == {"n_in": 8, "hidden": 16, "n_classes": 3, "lr": 0.1}
    state, stored = module.state_dict(), load_file(out / "twa.safetensors")
    assert sorted(state) == sorted(stored) == sorted(plain_load(ckpts / "last.ckpt")["state_dict"])
    assert all(torch.equal(state[k], v) for k, v in stored.items())


# ------------------------------------------------------------------------------------------------ 5. Lightning SWA


def test_lightning_swa_callback_files_are_left_out_with_a_warning(lightning: Callable[[str], Path], root: Path, twa):
    ckpts = lightning("swa")
    extra = next(ckpts.glob("epoch=4-*.ckpt"))
    assert plain_load(extra)["epoch"] == 4 and plain_load(ckpts / "last.ckpt")["epoch"] == 4
    out = root / "lightning-swa-avg.safetensors"
    run = twa("swa", ckpts, "-o", out, "--json")
    warnings = [line for line in run.stderr.splitlines() if line.startswith("WARNING") and "left out" in line]
    assert any(extra.name in line for line in warnings), run.stderr
    assert any("last.ckpt" in line for line in warnings), run.stderr
    files = epoch_files(ckpts)
    assert [Path(p).name for p in summary(run)["sources"]] == [f.name for f in files]
    expected = floating_mean([without_prefix(plain_load(f)["state_dict"]) for f in files])
    assert_mean(load_file(out), expected, "mean of the SWA run's epoch files")


# ------------------------------------------------------------------------------------------------ 6. WeightAveraging


@pytest.mark.parametrize("callback", ["weight_averaging", "ema"])
def test_lightning_weight_averaging_reads_raw_weights_unless_ema(lightning: Callable[[str], Path], root: Path,
                                                                  callback: str, twa):
    ckpts = lightning(callback)
    files = epoch_files(ckpts)
    loaded = [plain_load(f) for f in files]
    assert all("current_model_state" in c for c in loaded)
    raw_out, ema_out = root / f"lightning-{callback}-raw.safetensors", root / f"lightning-{callback}-ema.safetensors"
    run = twa("swa", ckpts, "-o", raw_out)
    assert "reading the raw weights" in run.stderr and "current_model_state" in run.stderr, run.stderr
    twa("swa", ckpts, "-o", ema_out, "--ema")
    raw, ema = load_file(raw_out), load_file(ema_out)
    assert_mean(raw, floating_mean([without_prefix(c["current_model_state"]) for c in loaded]), "raw weights")
    assert_mean(ema, floating_mean([without_prefix(c["state_dict"]) for c in loaded]), "stored averages")
    assert_some_floating_differ(raw, ema)


# ------------------------------------------------------------------------------------------------ 7. AveragedModel


def test_averaged_model_checkpoints_average_and_swa_folder_is_refused(averaged_model_run: Path, root: Path, twa):
    ckpts = averaged_model_run
    out = root / "averaged-avg.safetensors"
    twa("swa", ckpts, "-o", out)
    files = [ckpts / f"epoch{i}.pt" for i in range(realtools.AVERAGED_EPOCHS)]
    assert_mean(load_file(out), floating_mean([plain_load(f) for f in files]), "mean of epochN.pt")

    swa_dir = ckpts.parent / "swa"
    refused_out = root / "averaged-swa.safetensors"
    line = one_line_error(twa("swa", swa_dir, "-o", refused_out, check=False))
    assert "holds only averages" in line and "swa.pt" in line, line
    assert not refused_out.exists()

    report = summary(twa("inspect", swa_dir / "swa.pt", "--json"))
    assert entry_names(report) == ["swa.pt"] and report["selected"] == 1 and report["compatible"]


# ------------------------------------------------------------------------------------------------ 8. pickles


def test_timm_run_without_data_asks_for_it_and_its_average_records_no_empty_data(
        timm_run: Path, timm_averages: dict[bool, Path], image_folder: Path, tmp_path: Path, twa):
    line = one_line_error(twa("train-subspace", timm_run, "-o", tmp_path / "twa", "--quiet", check=False))
    assert "--data" in line and "{}" not in line, line
    assert not (tmp_path / "twa").exists()
    line = one_line_error(twa("eval", sorted(timm_run.glob("checkpoint-*.pth.tar"))[-1], check=False))
    assert "--data" in line and "{}" not in line, line
    assert "data" not in plain_metadata(timm_averages[False])  # nothing recorded, so nothing malformed to read
    line = one_line_error(twa("eval", timm_averages[False], check=False))
    assert "--data" in line and "not a description" not in line, line
    scored = summary(twa("eval", timm_averages[False], "--data", "imagefolder", "--data-dir", image_folder,
                         "--json"))["results"][0]
    assert scored["test"]["count"] == 12


def test_timm_checkpoint_with_namespace_args_is_read(timm_run: Path, twa):
    path = timm_run / "checkpoint-2.pth.tar"
    with pytest.raises(pickle.UnpicklingError):
        plain_load(path)  # argparse.Namespace: refused by a bare weights_only load
    report = summary(twa("inspect", path, "--json"))
    assert entry_names(report) == [path.name] and report["entries"][0]["epoch"] == 2
    assert report["architecture"] == "timm:test_resnet"


def test_pickle_holding_another_python_object_is_refused_naming_the_file(root: Path, twa):
    folder = root / "foreign-pickle"
    folder.mkdir()
    bad = folder / "run.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "args": argparse.Namespace(lr=0.1),
                "output_dir": PurePosixPath("/data/run")}, bad)
    for args in (("inspect", bad), ("swa", folder, "-o", root / "foreign-avg.safetensors")):
        line = one_line_error(twa(*args, check=False))
        assert str(bad) in line and "PurePosixPath" in line, line
    assert not (root / "foreign-avg.safetensors").exists()
