"""`twa swa` and `twa inspect` on folders other tools wrote, and the averaging arithmetic of timm and fairseq.

`timm_average` and `fairseq_average` transcribe the arithmetic of timm's `avg_checkpoints.py` and fairseq's
`scripts/average_checkpoints.py` (loading, key selection and summation as those scripts do them).
"""

import collections
import json
import os
import subprocess
import sys

import pytest
import torch
from layouts import (
    arithmetic_mean,
    fairseq_folder,
    hf_trainer_folder,
    lightning_folder,
    plain_folder,
    timm_folder,
)

from twa_cli.commands.swa import SwaRequest, swa
from twa_cli.io.checkpoints import list_folder, load_tensors, read_checkpoint


def timm_load_state_dict(path, use_ema=False):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    key = ""
    if isinstance(checkpoint, dict):
        if use_ema and checkpoint.get("state_dict_ema") is not None:
            key = "state_dict_ema"
        elif use_ema and checkpoint.get("model_ema") is not None:
            key = "model_ema"
        elif "state_dict" in checkpoint:
            key = "state_dict"
        elif "model" in checkpoint:
            key = "model"
    state = checkpoint[key] if key else checkpoint
    return {k.removeprefix("module."): v for k, v in state.items()}


def timm_average(paths, use_ema=False):
    avg_state_dict, avg_counts = {}, {}
    for c in paths:
        for k, v in timm_load_state_dict(c, use_ema).items():
            if k not in avg_state_dict:
                avg_state_dict[k] = v.clone().to(dtype=torch.float64)
                avg_counts[k] = 1
            else:
                avg_state_dict[k] += v.to(dtype=torch.float64)
                avg_counts[k] += 1
    for k, v in avg_state_dict.items():
        v.div_(avg_counts[k])
    float32_info = torch.finfo(torch.float32)
    final_state_dict = {}
    for k, v in avg_state_dict.items():
        v = v.clamp(float32_info.min, float32_info.max)
        final_state_dict[k] = v.to(dtype=torch.float32)
    return final_state_dict


def fairseq_average(inputs):
    params_dict = collections.OrderedDict()
    params_keys = None
    num_models = len(inputs)
    for fpath in inputs:
        state = torch.load(fpath, map_location="cpu", weights_only=True)
        model_params = state["model"]
        model_params_keys = list(model_params.keys())
        if params_keys is None:
            params_keys = model_params_keys
        elif params_keys != model_params_keys:
            raise KeyError(f"For checkpoint {fpath}, expected list of params: {params_keys}, "
                           f"but found: {model_params_keys}")
        for k in params_keys:
            p = model_params[k]
            if isinstance(p, torch.HalfTensor):
                p = p.float()
            if k not in params_dict:
                params_dict[k] = p.clone()
            else:
                params_dict[k] += p
    averaged_params = collections.OrderedDict()
    for k, v in params_dict.items():
        averaged_params[k] = v
        if averaged_params[k].is_floating_point():
            averaged_params[k].div_(num_models)
        else:
            averaged_params[k] //= num_models
    return averaged_params


def floating(state):
    return {k: v for k, v in state.items() if v.is_floating_point()}


def test_model_free_swa_equals_timm_avg_checkpoints_bit_for_bit(tmp_path):
    timm_folder(tmp_path / "timm")
    ckpts = list_folder(tmp_path / "timm")
    result = swa(tmp_path / "timm", tmp_path / "avg.safetensors")
    assert result.bn == "averaged"
    ours = load_tensors(result.path)
    theirs = timm_average([c.path for c in ckpts])
    for k, v in floating(ours).items():
        assert v.dtype == torch.float32 and torch.equal(v, theirs[k]), k
    # timm turns the integer batch counter into a float mean; a counter is kept from the last checkpoint here
    assert ours["1.num_batches_tracked"].dtype == torch.int64
    assert int(ours["1.num_batches_tracked"]) == 30


def test_model_free_swa_equals_fairseq_average_checkpoints(tmp_path):
    fairseq_folder(tmp_path / "fs", count=4)
    ckpts = list_folder(tmp_path / "fs")
    theirs = fairseq_average([c.path for c in ckpts])
    # fairseq sums in fp32: the same accumulation gives the same bits
    same = load_tensors(swa(tmp_path / "fs", tmp_path / "a32.safetensors", SwaRequest(compute_dtype="float32")).path)
    for k, v in floating(same).items():
        assert torch.equal(v, theirs[k]), k
    # the default fp64 sum differs from fairseq's only by fp32 rounding
    exact = load_tensors(swa(tmp_path / "fs", tmp_path / "a64.safetensors").path)
    for k, v in floating(exact).items():
        assert torch.allclose(v, theirs[k], rtol=4 * torch.finfo(torch.float32).eps, atol=1e-7), k
    # its --num-epoch-checkpoints passes the newest first: the sum in that order differs by fp32 rounding, at most
    # n units in the last place of the largest of the summed values (README)
    newest_first = fairseq_average([c.path for c in reversed(ckpts)])
    for k, v in floating(same).items():
        largest = torch.stack([load_tensors(c)[k].abs() for c in ckpts]).amax(0)
        bound = len(ckpts) * torch.finfo(torch.float32).eps * largest
        assert ((newest_first[k] - v).abs() <= bound).all(), k
    assert any(not torch.equal(newest_first[k], v) for k, v in floating(same).items())  # the order does show


def test_fp16_checkpoints_equal_fairseq_with_fp32_sums_and_output(tmp_path):
    """fairseq upcasts fp16 parameters and writes fp32: --compute-dtype float32 --dtype float32 is its arithmetic."""
    plain_folder(tmp_path / "half", count=5, dtype=torch.float16)
    ckpts = list_folder(tmp_path / "half")
    ours = load_tensors(swa(tmp_path / "half", tmp_path / "avg.safetensors",
                            SwaRequest(compute_dtype="float32", dtype="float32")).path)
    fairseq = fairseq_average_plain([c.path for c in ckpts])
    for k, v in floating(ours).items():
        assert v.dtype == torch.float32 and torch.equal(v, fairseq[k]), k


def test_fp16_checkpoints_are_averaged_in_higher_precision_and_written_in_fp16(tmp_path):
    states = plain_folder(tmp_path / "half", count=5, dtype=torch.float16)
    ckpts = list_folder(tmp_path / "half")
    ours = load_tensors(swa(tmp_path / "half", tmp_path / "avg.safetensors").path)
    expected = arithmetic_mean(states)
    for k, v in expected.items():
        assert ours[k].dtype == torch.float16 and torch.equal(ours[k], v.to(torch.float16)), k
    as32 = load_tensors(swa(tmp_path / "half", tmp_path / "avg32.safetensors", SwaRequest(dtype="float32")).path)
    fairseq = fairseq_average_plain([c.path for c in ckpts])
    for k, v in expected.items():
        assert as32[k].dtype == torch.float32 and torch.allclose(as32[k].double(), v, atol=1e-6), k
        assert torch.allclose(as32[k], fairseq[k], rtol=1e-6, atol=1e-6), k


def fairseq_average_plain(paths):
    """fairseq's arithmetic on plain state dicts (its script reads them under `model`)."""
    folder = paths[0].parent / "wrapped"
    folder.mkdir()
    wrapped = []
    for p in paths:
        torch.save({"model": torch.load(p, weights_only=True)}, folder / p.name)
        wrapped.append(folder / p.name)
    return fairseq_average(wrapped)


LAYOUTS = {
    "hf-trainer": lambda root: hf_trainer_folder(root),
    "hf-trainer-unsharded": lambda root: hf_trainer_folder(root, shards=0),
    "lightning": lambda root: lightning_folder(root),
    "timm": lambda root: timm_folder(root),
    "timm-ema-only": lambda root: timm_folder(root, ema_only=True),
    "plain-pt": lambda root: plain_folder(root),
    "fairseq": lambda root: fairseq_folder(root),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cli_averages_and_lists_each_layout_with_no_flags(tmp_path, layout, twa):
    states = LAYOUTS[layout](tmp_path / "run")
    listed = twa("inspect", tmp_path / "run", "--json")
    report = json.loads(listed.stdout)  # nothing but the JSON on stdout
    assert report["compatible"] and report["selected"] == len(states) == len(report["entries"])
    # 29 parameters and 7 buffer elements (BatchNorm statistics and its counter), 36 in all
    assert all(e["parameters"] + e["buffers"] == 36 and e["buffers"] == 7 for e in report["entries"])
    proc = twa("swa", tmp_path / "run", "-o", tmp_path / "avg.safetensors", "--json")
    summary = json.loads(proc.stdout)
    assert summary["batchnorm"] == "averaged" and summary["checkpoints"] == len(states)
    assert "BatchNorm statistics were averaged, not recomputed" in proc.stderr
    got = load_tensors(tmp_path / "avg.safetensors")
    for k, v in arithmetic_mean(states).items():
        assert torch.allclose(got[k].double(), v, rtol=1e-6, atol=1e-7), (layout, k)
    meta = read_checkpoint(tmp_path / "avg.safetensors")
    assert meta.meta["command"] == "swa" and meta.json_field("coefficients") == [1 / len(states)] * len(states)
    assert len(meta.json_field("sources")) == len(states)
    assert meta.json_field("invocation")["options"]["ckpts"] == str(tmp_path / "run")


def test_sharded_result_with_max_shard_size(tmp_path, twa):
    states = hf_trainer_folder(tmp_path / "run")
    out = json.loads(twa("swa", tmp_path / "run", "-o", tmp_path / "avg", "--max-shard-size", "100B",
                         "--json").stdout)["output"]
    # a folder output is reported as the folder (write_result returns the path to read it back from)
    assert out == str(tmp_path / "avg") and (tmp_path / "avg" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "avg").glob("model-*-of-*.safetensors"))) > 1
    got = load_tensors(tmp_path / "avg")
    for k, v in arithmetic_mean(states).items():
        assert torch.allclose(got[k].double(), v, atol=1e-6), k
    listed = json.loads(twa("inspect", tmp_path / "avg", "--json").stdout)
    assert listed["entries"][0]["format"] == "hf sharded"
    assert json.loads((tmp_path / "avg" / "config.json").read_text()) == {"model_type": "tiny"}
    assert not (tmp_path / "avg" / "trainer_state.json").exists()
    again = twa("swa", tmp_path / "run", "-o", tmp_path / "avg", "--max-shard-size", "100B", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    twa("swa", tmp_path / "run", "-o", tmp_path / "one.safetensors", "--max-shard-size", "100B")
    assert (tmp_path / "one.safetensors.index.json").exists() and not (tmp_path / "one.safetensors").exists()
    refused = twa("swa", tmp_path / "run", "-o", tmp_path / "one.safetensors", check=False)
    assert refused.returncode == 1 and "one.safetensors.index.json: already exists" in refused.stderr


def test_real_architecture_from_pt_files_recomputes_batchnorm(cnn_run, tmp_path, twa):
    folder = tmp_path / "pt"
    folder.mkdir()
    for i, ckpt in enumerate(list_folder(cnn_run)[-3:]):
        torch.save({"model": {f"module.{k}": v for k, v in load_tensors(ckpt.path).items()}, "epoch": i},
                   folder / f"epoch_{i}.pth")
    summary = json.loads(twa("swa", folder, "-o", tmp_path / "avg.safetensors", "--model", "small-cnn",
                             "--data", "digits", "--bn-batches", "2", "--json").stdout)
    assert summary["batchnorm"] == "recomputed" and summary["test"]["accuracy"] > 20


def test_top_n_by_metric_and_step_selection(tmp_path, twa):
    states = hf_trainer_folder(tmp_path / "run", steps=(100, 200, 300))
    best = json.loads(twa("inspect", tmp_path / "run", "--top", "2", "--by", "eval_accuracy", "--json").stdout)
    assert [e["selected"] for e in best["entries"]] == [False, True, True]
    assert [e["metric"] for e in best["entries"]] == [0.7, 0.9, 0.8]
    twa("swa", tmp_path / "run", "-o", tmp_path / "top.safetensors", "--top", "2", "--by", "eval_accuracy")
    got = load_tensors(tmp_path / "top.safetensors")
    assert torch.allclose(got["0.weight"].double(), arithmetic_mean(states[1:])["0.weight"], atol=1e-6)
    steps = json.loads(twa("inspect", tmp_path / "run", "--start-step", "150", "--end-step", "300", "--json").stdout)
    assert [e["selected"] for e in steps["entries"]] == [False, True, False]
    timm_folder(tmp_path / "timm")  # metrics 71.5, 74.0, 73.0 saved in the checkpoints
    picked = json.loads(twa("inspect", tmp_path / "timm", "--top", "1", "--by", "metric", "--json").stdout)
    assert [e["selected"] for e in picked["entries"]] == [False, True, False]
    lowest = json.loads(twa("inspect", tmp_path / "timm", "--top", "1", "--by", "min:metric", "--json").stdout)
    assert [e["selected"] for e in lowest["entries"]] == [True, False, False]
    missing = twa("inspect", tmp_path / "timm", "--top", "1", "--by", "val_loss", check=False)
    assert missing.returncode == 1 and "metrics found: epoch, metric" in missing.stderr


def test_top_by_the_sample_log(cnn_run, twa):
    report = json.loads(twa("inspect", cnn_run, "--top", "2", "--by", "test_acc", "--json").stdout)
    ranked = [e for e in report["entries"] if e["metric"] is not None]
    assert len(ranked) == 3  # one per epoch in metrics.jsonl; mid-epoch samples have no test accuracy
    best = sorted(ranked, key=lambda e: -e["metric"])[:2]
    assert {e["index"] for e in report["entries"] if e["selected"]} == {e["index"] for e in best}


def test_inspect_reports_incompatible_checkpoints_and_exits_1(tmp_path, twa):
    folder = tmp_path / "mixed"
    plain_folder(folder, count=2)
    torch.save({"0.weight": torch.zeros(5, 4)}, folder / "epoch3.pt")
    proc = twa("inspect", folder, check=False)
    assert proc.returncode == 1 and "NOT compatible" in proc.stderr and "epoch3.pt" in proc.stderr
    report = json.loads(twa("inspect", folder, "--json", check=False).stdout)
    assert report["compatible"] is False and "epoch3.pt" in report["problem"]
    assert twa("inspect", folder, "--end", "2").returncode == 0


def test_json_runs_print_only_json_on_stdout_and_logs_on_stderr(tmp_path):
    """In a real process: stdout parses as one JSON document even with warnings and progress on stderr."""

    def real_process(*args):  # the process boundary is the point here: what reaches the real stdout and stderr
        proc = subprocess.run([sys.executable, "-m", "twa_cli", *map(str, args)], capture_output=True, text=True,
                              check=False, env={**os.environ, "NO_COLOR": "1"})
        assert proc.returncode == 0, proc.stderr
        return proc

    timm_folder(tmp_path / "timm")
    proc = real_process("swa", tmp_path / "timm", "-o", tmp_path / "avg.safetensors", "--json")
    assert json.loads(proc.stdout)["checkpoints"] == 3
    assert "WARNING" in proc.stderr and "{" not in proc.stderr
    quiet = real_process("swa", tmp_path / "timm", "-o", tmp_path / "q.safetensors", "--quiet")
    assert quiet.stdout == "" and quiet.stderr == ""


def _overflowing_fp16_folder(folder, count=3):
    """Finite fp32 checkpoints whose average holds values beyond float16's range (65504)."""
    from twa_cli.io.checkpoints import make_metadata
    from twa_cli.io.safetensors import save_tensors

    folder.mkdir()
    for i in range(count):
        tensors = {"small": torch.full((4,), float(i)), "big": torch.tensor([1.0, 1e6 + i])}
        save_tensors(folder / f"c{i}.safetensors", tensors, make_metadata("checkpoint", step=str(i)))
    return folder


def test_an_average_beyond_the_output_dtype_is_refused_naming_the_tensor(tmp_path, twa):
    """Issue 21 F3: `--dtype float16` of an average that does not fit fp16 wrote Inf and exited 0."""
    folder = _overflowing_fp16_folder(tmp_path / "big")
    result = twa("swa", folder, "-o", tmp_path / "b16.safetensors", "--dtype", "float16", check=False)
    line = result.stderr.strip()
    assert result.returncode == 1 and len(line.splitlines()) == 1, result.stderr
    assert "'big'" in line and "float16" in line and "--dtype" in line, line
    assert not (tmp_path / "b16.safetensors").exists()
    # bfloat16 holds it: written, finite
    twa("swa", folder, "-o", tmp_path / "bf16.safetensors", "--dtype", "bfloat16")
    assert torch.isfinite(load_tensors(tmp_path / "bf16.safetensors")["big"]).all()
