import json
import shutil

import pytest

from twa_cli.io.checkpoints import list_folder, read_checkpoint


@pytest.mark.slow
def test_pipeline_end_to_end_on_digits(tmp_path, twa):
    ckpts = tmp_path / "ckpts"
    twa("sample", ckpts, "--model", "small-cnn", "--data", "digits", "--epochs", "3", "--batch-size", "64",
        "--lr", "0.05")
    assert len(list_folder(ckpts)) == 4
    metrics = [json.loads(line) for line in (ckpts / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]

    swa = json.loads(twa("swa", ckpts, "-o", tmp_path / "swa.safetensors", "--start", "1", "--json").stdout)
    assert swa["checkpoints"] == 3 and swa["batchnorm"] == "recomputed"

    basis = json.loads(twa("orthogonalize", ckpts, "-o", tmp_path / "basis.safetensors", "--json").stdout)
    assert basis["rank"] == 4 and basis["errors"]["orthogonality"] < 1e-6

    summary = json.loads(twa("train-subspace", tmp_path / "basis.safetensors", "--epochs", "2", "--lr", "0.5",
                             "--json").stdout)
    out = tmp_path / "basis-twa"
    assert summary["output"] == str(out)
    assert len(summary["coefficients"]) == 4
    assert read_checkpoint(out / "twa.safetensors").kind == "twa"

    scored = json.loads(twa("eval", out / "twa.safetensors", "--split", "both", "--json").stdout)["results"][0]
    assert scored["test"]["accuracy"] == pytest.approx(summary["test"]["accuracy"], abs=1e-9)
    assert scored["gap"] == pytest.approx(scored["train"]["accuracy"] - scored["test"]["accuracy"])


def test_train_subspace_on_a_folder_writes_beside_it(cnn_run, tmp_path, twa):
    ckpts = tmp_path / "run"
    shutil.copytree(cnn_run, ckpts)
    proc = twa("train-subspace", ckpts, "--epochs", "1", "--lr", "0.5", "--batch-size", "64")
    out = tmp_path / "run-twa"
    assert str(out) in proc.stdout
    assert {p.name for p in out.iterdir()} >= {"twa.safetensors", "coefficients.json", "metrics.jsonl",
                                               "basis.safetensors"}
    assert not list(ckpts.glob("twa*"))
    # a second run refuses to overwrite the result
    again = twa("train-subspace", ckpts, "--epochs", "1", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_help_and_version(twa):
    assert "twa" in twa("--version").stdout
    for command in ("sample", "swa", "orthogonalize", "train-subspace", "eval", "plot", "inspect"):
        assert "Usage" in twa(command, "--help").stdout


def test_swa_says_in_words_what_became_of_the_batchnorm_statistics(mlp_run, cnn_run, tmp_path, twa):
    """Issue 21 F6: a model without BatchNorm read "BatchNorm statistics none"."""
    plain = twa("swa", mlp_run, "-o", tmp_path / "mlp.safetensors").stderr
    assert "no BatchNorm" in plain and "statistics none" not in plain, plain
    recomputed = twa("swa", cnn_run, "-o", tmp_path / "cnn.safetensors", "--bn-batches", "2").stderr
    assert "BatchNorm statistics recomputed" in recomputed, recomputed


def test_a_sharded_result_reads_back_by_the_name_it_was_written_to(mlp_run, tmp_path, twa):
    """Issue 21 F6: `-o sh.safetensors --max-shard-size` writes `sh.safetensors.index.json` and shards; every
    command takes `sh.safetensors`, the name the user gave, for it."""
    out = tmp_path / "sh.safetensors"
    twa("swa", mlp_run, "-o", out, "--max-shard-size", "10KB")
    assert not out.exists() and (tmp_path / "sh.safetensors.index.json").exists()
    assert "sh.safetensors" in twa("inspect", out).stdout
    assert json.loads(twa("eval", out, "--json").stdout)
    twa("swa", out, "-o", tmp_path / "again.safetensors")
    twa("sample", tmp_path / "tail", "--init", out, "--epochs", "1", "--model", "mlp", "--data", "digits",
        "--device", "cpu", "--no-eval-every-epoch")
    twa("train-subspace", mlp_run, "-o", tmp_path / "twa", "--init", out, "--epochs", "1", "--device", "cpu",
        "--no-eval-every-epoch", "--no-lr-check", "--lr", "0.1")


class _Left(Exception):
    def __init__(self, code):
        self.code = code


@pytest.mark.parametrize("args, expected", [(["inspect", "{run}"], 0), (["inspect", "{run}/missing"], 1)])
def test_a_torchrun_rank_leaves_without_the_interpreters_teardown_with_its_code(cnn_run, monkeypatch, capsys,
                                                                               args, expected):
    """A rank's process ends in os._exit with the command's exit code, after its output is flushed: gloo's threads
    can abort the interpreter's teardown and fail a job whose ranks all finished."""
    import os

    from twa_cli.cli import main

    def leave(code):
        raise _Left(code)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(os, "_exit", leave)
    with pytest.raises(_Left) as left:
        main([a.format(run=cnn_run) for a in args])
    assert left.value.code == expected
    out = capsys.readouterr()
    assert (out.out if expected == 0 else out.err).strip()  # what the command printed came out first
