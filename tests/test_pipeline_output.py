"""What pipelines rely on: config files, recorded options, dry runs, exit codes, plain output, completion."""

import json
import os
import subprocess
import sys

import pytest
import torch
from layouts import hf_trainer_folder, timm_folder

from twa_cli.cli.config import options_for
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import list_folder, load_tensors, read_checkpoint, sources_of


def test_yaml_config_with_a_command_section_and_flags_overriding(tmp_path, twa):
    timm_folder(tmp_path / "timm")
    (tmp_path / "run.yaml").write_text("end: 2\ncompute-dtype: float32\nsample:\n  epochs: 3\nswa:\n  start: 1\n")
    twa("swa", tmp_path / "timm", "-o", tmp_path / "a.safetensors", "--config", tmp_path / "run.yaml")
    options = read_checkpoint(tmp_path / "a.safetensors").json_field("invocation")["options"]
    assert options["start"] == 1 and options["end"] == 2 and options["compute_dtype"] == "float32"
    assert [s.path for s in sources_of(read_checkpoint(tmp_path / "a.safetensors"))] == [
        str(tmp_path / "timm" / "checkpoint-1.pth.tar")]
    twa("swa", tmp_path / "timm", "-o", tmp_path / "b.safetensors", "--config", tmp_path / "run.yaml", "--end", "3")
    assert len(read_checkpoint(tmp_path / "b.safetensors").json_field("sources")) == 2  # checkpoints 1 and 2


def test_toml_config_and_unknown_keys(tmp_path, twa):
    timm_folder(tmp_path / "timm")
    (tmp_path / "run.toml").write_text(f'ckpts = "{tmp_path / "timm"}"\noutput = "{tmp_path / "t.safetensors"}"\n'
                                       '[swa]\nevery = 2\n')
    twa("swa", "--config", tmp_path / "run.toml")  # even the positional argument comes from the file
    assert len(read_checkpoint(tmp_path / "t.safetensors").json_field("sources")) == 2
    (tmp_path / "bad.toml").write_text("[swa]\nlearning_rate = 0.1\n")
    bad = twa("swa", tmp_path / "timm", "-o", tmp_path / "x.safetensors", "--config", tmp_path / "bad.toml",
              check=False)
    assert bad.returncode == 1 and "'learning_rate' is not an option of `twa swa`" in bad.stderr
    (tmp_path / "broken.yaml").write_text("end: [1\n")
    broken = twa("swa", tmp_path / "timm", "-o", tmp_path / "x.safetensors", "--config", tmp_path / "broken.yaml",
                 check=False)
    assert broken.returncode == 1 and "cannot parse" in broken.stderr and "Traceback" not in broken.stderr


def test_options_for_spellings():
    names = {"batch_size": "batch_size", "json": "json_out", "json_out": "json_out"}
    loaded = {"batch-size": 64, "--json": True, "other": {"epochs": 2}}
    assert options_for("swa", loaded, names, ["swa", "other"], "f") == {"batch_size": 64, "json_out": True}
    with pytest.raises(TwaError, match="'epochs' is not an option"):
        options_for("other", loaded, names | {}, ["swa", "other"], "f")


def test_config_from_a_result_repeats_its_run(tmp_path, twa):
    states = hf_trainer_folder(tmp_path / "run", steps=(1, 2, 3, 4))
    twa("swa", tmp_path / "run", "-o", tmp_path / "first.safetensors", "--start", "1", "--every", "2")
    twa("swa", "--config-from", tmp_path / "first.safetensors", "-o", tmp_path / "again.safetensors")
    first, again = load_tensors(tmp_path / "first.safetensors"), load_tensors(tmp_path / "again.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
    expected = (states[1]["0.weight"].double() + states[3]["0.weight"].double()) / 2
    assert torch.allclose(again["0.weight"].double(), expected, atol=1e-6)
    untracked = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(untracked))
    proc = twa("swa", "--config-from", untracked, "-o", tmp_path / "x.safetensors", check=False)
    assert proc.returncode == 1 and "records no configuration" in proc.stderr


def test_dry_run_writes_nothing_and_its_disk_estimate_holds(tmp_path, twa):
    hf_trainer_folder(tmp_path / "run")
    plan = json.loads(twa("swa", tmp_path / "run", "-o", tmp_path / "avg.safetensors", "--dry-run", "--json").stdout)
    assert plan["dry_run"] and len(plan["reads"]) == 3 and not (tmp_path / "avg.safetensors").exists()
    assert plan["peak_ram_bytes"] >= 36 * 8  # at least the fp64 sums
    twa("swa", tmp_path / "run", "-o", tmp_path / "avg.safetensors")
    size = (tmp_path / "avg.safetensors").stat().st_size
    assert plan["disk_bytes"] <= size <= plan["disk_bytes"] + 8192  # the rest is the JSON header
    half = json.loads(twa("swa", tmp_path / "run", "-o", tmp_path / "h.safetensors", "--dtype", "float16",
                          "--dry-run", "--json").stdout)
    assert half["disk_bytes"] == (36 - 1) * 2 + 8  # 35 floats in fp16 and one int64 counter


def test_dry_run_of_orthogonalize_and_train_subspace(cnn_run, tmp_path, twa):
    plan = json.loads(twa("orthogonalize", cnn_run, "-o", tmp_path / "b.safetensors", "--dry-run", "--json").stdout)
    assert not (tmp_path / "b.safetensors").exists()
    twa("orthogonalize", cnn_run, "-o", tmp_path / "b.safetensors", "-q")
    size = (tmp_path / "b.safetensors").stat().st_size
    assert plan["disk_bytes"] <= size <= plan["disk_bytes"] + 32768
    layout = read_checkpoint(tmp_path / "b.safetensors").json_field("layout")
    assert plan["parameters"] == sum(torch.Size(shape).numel() for _, shape in layout)
    n, dim = len(list_folder(cnn_run)), plan["parameters"]
    assert plan["peak_ram_bytes"] >= n * dim * 4
    sub = json.loads(twa("train-subspace", tmp_path / "b.safetensors", "-o", tmp_path / "t", "--dry-run",
                         "--json").stdout)
    assert sub["parameters"] == dim and sub["peak_ram_bytes"] >= n * dim * 4 and not (tmp_path / "t").exists()
    human = twa("train-subspace", cnn_run, "-o", tmp_path / "t", "--dry-run", "--top", "2", "--by", "test_acc")
    assert "peak RAM" in human.stdout and human.stderr.count("would read") == 2


def test_exit_codes(tmp_path, twa):
    assert twa("inspect", tmp_path / "missing", check=False).returncode == 1  # a problem with the inputs
    for usage in (["swa"], ["inspect", tmp_path, "--every", "0"], ["nonsense"], ["swa", tmp_path, "-o", "x",
                                                                               "--dtype", "float8"]):
        assert twa(*usage, check=False).returncode == 2, usage


def test_version_and_plain_output_without_a_terminal(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "twa_cli", "--version"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("twa ")
    timm_folder(tmp_path / "timm")
    listed = subprocess.run([sys.executable, "-m", "twa_cli", "inspect", tmp_path / "timm"], capture_output=True,
                            text=True, check=False, env={k: v for k, v in os.environ.items() if k != "NO_COLOR"})
    assert listed.returncode == 0 and "\x1b[" not in listed.stdout + listed.stderr  # no colour codes in pipes
    assert "checkpoint-2.pth.tar" in listed.stdout


def test_shell_completion_of_commands_flags_and_model_names(twa, monkeypatch):
    def complete(words, cword):
        monkeypatch.setenv("_TWA_COMPLETE", "complete_bash")
        monkeypatch.setenv("COMP_WORDS", words)
        monkeypatch.setenv("COMP_CWORD", str(cword))
        return twa(check=False).stdout.split()

    assert complete("twa ins", 1) == ["inspect"]
    assert "--max-shard-size" in complete("twa swa --max", 2)
    assert complete("twa swa x --model resnet2", 4) == ["resnet20"]


def test_train_subspace_on_lightning_checkpoints_and_repeating_it_from_the_result(cnn_run, tmp_path, twa):
    folder = tmp_path / "lightning"
    folder.mkdir()
    for i, ckpt in enumerate(list_folder(cnn_run)[-4:]):
        state = {f"model.{k}": v for k, v in load_tensors(ckpt.path).items()}
        torch.save({"epoch": i, "global_step": 10 * i, "state_dict": state}, folder / f"epoch={i}-step={10 * i}.ckpt")
    first = json.loads(twa("train-subspace", folder, "-o", tmp_path / "a", "--model", "small-cnn", "--data", "digits",
                           "--epochs", "1", "--lr", "0.5", "--batch-size", "64", "--bn-batches", "2",
                           "--no-eval-every-epoch", "--dtype", "bfloat16", "--json").stdout)
    assert len(first["coefficients"]) == 4
    again = json.loads(twa("train-subspace", "--config-from", tmp_path / "a" / "twa.safetensors",
                           "-o", tmp_path / "b", "--json").stdout)
    assert again["coefficients"] == pytest.approx(first["coefficients"], abs=1e-6)
    options = read_checkpoint(tmp_path / "b" / "twa.safetensors").json_field("invocation")["options"]
    assert options["epochs"] == 1 and options["model"] == "small-cnn" and options["output"] == str(tmp_path / "b")
    assert options["dtype"] == "bfloat16"
    written = load_tensors(tmp_path / "b" / "twa.safetensors")
    assert {v.dtype for v in written.values() if v.is_floating_point()} == {torch.bfloat16}


def test_a_usage_error_is_one_line_that_names_the_flag(tmp_path, twa):
    for usage, named in ((["inspect", tmp_path, "--every", "0"], "--every"), (["inspect", tmp_path, "--bogus"],
                         "--bogus"), (["nonsense"], "nonsense"), (["swa"], "ckpts")):
        proc = twa(*usage, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert named in proc.stderr and "-h" in proc.stderr and "Traceback" not in proc.stderr
