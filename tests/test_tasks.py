"""Any model through the Task interface: a user's task with dict batches and its own loss goes through every
command from the command line, and what a task records is run again only when the user names it."""

from __future__ import annotations

import json

import pytest
import torch

from twa_cli.commands.train_subspace import SubspaceConfig, train_subspace
from twa_cli.io.checkpoints import list_folder, load_tensors
from twa_cli.tasks.resolve import TaskRequest

HOOK = "custom_task:digits_as_dicts"


@pytest.fixture(scope="module")
def dict_run(tmp_path_factory, twa):
    out = tmp_path_factory.mktemp("dicts") / "run"
    twa("sample", out, "--task", HOOK, "--epochs", "3", "--per-epoch", "2", "--batch-size", "64", "--lr", "0.05",
        "--device", "cpu")
    return out


def test_a_task_hook_samples_averages_and_trains_in_the_subspace_from_the_command_line(dict_run, tmp_path, twa):
    ckpts = list_folder(dict_run)
    assert len(ckpts) == 7 and json.loads(ckpts[0].meta["task"]) == {"name": HOOK}
    swa = json.loads(twa("swa", dict_run, "-o", tmp_path / "swa.safetensors", "--task", HOOK, "--json").stdout)
    assert swa["batchnorm"] == "recomputed" and swa["test"]["accuracy"] > 50
    summary = json.loads(twa("train-subspace", dict_run, "-o", tmp_path / "twa", "--task", HOOK, "--epochs", "2",
                             "--json").stdout)
    assert len(summary["coefficients"]) == 7 and summary["lr_check"]["method"] == "double backward"
    scored = json.loads(twa("eval", tmp_path / "twa" / "twa.safetensors", "--task", HOOK, "--split", "both",
                            "--json").stdout)["results"][0]
    assert scored["test"]["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert scored["gap"] == pytest.approx(scored["train"]["accuracy"] - scored["test"]["accuracy"])


def test_the_task_s_own_loss_is_what_training_minimizes(dict_run, tmp_path):
    """The metrics of the last epoch are the task's label-smoothed loss, not plain cross-entropy."""
    result = train_subspace(dict_run, tmp_path / "twa", SubspaceConfig(epochs=1, device="cpu",
                                                                        task=TaskRequest(task=HOOK)))
    from custom_task import DigitsAsDicts

    task = DigitsAsDicts()
    net = task.build_model()
    net.load_state_dict(load_tensors(result.result))
    batch = {"pixels": torch.stack([task.splits["test"][i]["pixels"] for i in range(len(task.splits["test"]))]),
             "label": task.splits["test"].y}
    net.eval()
    with torch.no_grad():
        smoothed = float(task.loss(net, batch))
        plain = float(torch.nn.functional.cross_entropy(net(pixels=batch["pixels"])["scores"], batch["label"]))
    assert result.test.loss == pytest.approx(smoothed, rel=1e-5) and abs(smoothed - plain) > 1e-3


def test_a_recorded_task_runs_only_when_named_again(dict_run, tmp_path, twa):
    refused = twa("eval", list_folder(dict_run)[-1].path, check=False)
    assert refused.returncode == 1 and f"--task {HOOK}" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_a_task_hook_that_returns_something_else_is_one_line(tmp_path, twa):
    result = twa("sample", tmp_path / "x", "--task", "json:dumps", check=False)
    assert result.returncode == 1 and "--task json:dumps" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()
