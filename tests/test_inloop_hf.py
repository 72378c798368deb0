"""twa's TrainerCallback in a real `transformers.Trainer` run (a tiny GPT-2 with tied embeddings, a byte-level BPE
tokenizer trained here, CPU): the weights of the steps the Trainer saves join an in-memory basis, TWA trains in
their span at the end (or half-way, stopping the run), the result is in the Trainer's model and in the checkpoint
saved with it, and it equals `twa train-subspace --preset paper` on the run's checkpoint files."""

from __future__ import annotations

import json
import shutil

import pytest
import realtools
import torch
from helpers import ranks_of_script
from inloop_helpers import CommandBatches, relative_difference
from safetensors.torch import load_file

from twa_cli.commands.common import task_of
from twa_cli.integrations.hf import STATE_FILE, TWACallback
from twa_cli.io.checkpoints import read_checkpoint
from twa_cli.tasks.resolve import TaskRequest

pytestmark = pytest.mark.slow
LR, EPOCHS, BATCH = 0.5, 2, 8


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("inloop-hf")


@pytest.fixture(scope="module")
def plain(root) -> realtools.HFRun:
    """The run without the callback: its checkpoint files are what the command reads."""
    return realtools.build_hf_causal_lm_run(root / "plain")


@pytest.fixture(scope="module")
def task(plain):
    """The command's text task on the run's training file: the batches and loss `train-subspace` uses."""
    return task_of(TaskRequest(data=str(plain.train), block_size=32),
                   read_checkpoint(plain.checkpoints[0] / "model.safetensors"))


def _callback(task) -> TWACallback:
    """The callback handed the command's batches and loss, to be compared with it."""
    train = task.split("train", augment=True)
    return TWACallback(data=CommandBatches(task, train, BATCH), loss=task.loss,
                       fit_options={"epochs": EPOCHS, "lr": LR})


@pytest.fixture(scope="module")
def inloop(root, task):
    callback = _callback(task)
    return realtools.build_hf_causal_lm_run(root / "inloop", callbacks=(callback,)), callback


def test_the_callbacks_result_equals_train_subspace_on_the_runs_checkpoints(plain, inloop, root, twa):
    out = root / "cli"
    twa("train-subspace", plain.run, "-o", out, "--preset", "paper", "--data", plain.train, "--block-size", 32,
        "--epochs", EPOCHS, "--lr", LR, "--batch-size", BATCH, "--no-eval-every-epoch", "--device", "cpu")
    cli = load_file(out / "model.safetensors")
    cli_alpha = [row["alpha"] for row in json.loads((out / "coefficients.json").read_text())["coefficients"]]
    run, callback = inloop

    assert callback.twa.count == 4 and len(callback.result.coefficients) == 4  # steps 4, 8, 12, 16
    result = load_file(run.run / "model.safetensors")  # trainer.save_model() after train(): the Trainer's model
    assert sorted(result) == sorted(cli)
    assert relative_difference(result, cli, sorted(cli)) < 1e-5
    assert callback.result.coefficients == pytest.approx(cli_alpha, abs=1e-4)
    # The checkpoint saved at the fit holds the result and the basis; those before it the raw weights.
    last = run.run / "checkpoint-16"
    assert all(torch.equal(v, result[k]) for k, v in load_file(last / "model.safetensors").items())
    saved = torch.load(last / STATE_FILE, weights_only=True)
    assert saved["basis"]["count"] == 4 and torch.equal(saved["basis"]["vectors"], callback.twa.basis.vectors)
    for step in (4, 8, 12):
        raw, ours = (load_file(r / f"checkpoint-{step}" / "model.safetensors") for r in (plain.run, run.run))
        assert all(torch.equal(ours[k], v) for k, v in raw.items()), step


def test_a_run_resumed_from_a_checkpoint_goes_on_with_its_basis(inloop, task, root):
    """A run that died after its checkpoint of step 8, resumed from it by `trainer.train(resume_from_checkpoint=)`:
    the callback reads the two weights that folder's basis holds and adds steps 12 and 16; the Trainer replays the
    same steps, so the result is the uninterrupted run's."""
    run, callback = inloop
    assert torch.load(run.run / "checkpoint-8" / STATE_FILE, weights_only=True)["basis"]["count"] == 2
    died = root / "resumed" / "run"
    for step in (4, 8):
        shutil.copytree(run.run / f"checkpoint-{step}", died / f"checkpoint-{step}")
    again = _callback(task)
    resumed = realtools.build_hf_causal_lm_run(root / "resumed", callbacks=(again,), resume=died / "checkpoint-8")
    assert again.twa.count == 4
    assert torch.equal(again.twa.basis.vectors[:2], callback.twa.basis.vectors[:2])
    names = sorted(load_file(run.run / "model.safetensors"))
    assert relative_difference(load_file(resumed.run / "model.safetensors"),
                               load_file(run.run / "model.safetensors"), names) < 1e-6


def test_train_half_then_twa_stops_the_run_with_the_result_saved(plain, root):
    """fit_at=0.5, stop: at step 8 of 16 TWA trains in the span of steps 4 and 8 on the Trainer's own batches with
    the model's own loss, the run ends, and the checkpoint of step 8 holds the result."""
    callback = TWACallback(fit_at=0.5, stop=True, fit_options={"epochs": 1, "lr": LR})
    run = realtools.build_hf_causal_lm_run(root / "half", callbacks=(callback,))
    assert sorted(p.name for p in run.run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert json.loads((run.run / "checkpoint-8" / "trainer_state.json").read_text())["global_step"] == 8
    result = load_file(run.run / "model.safetensors")
    assert all(torch.equal(v, result[k]) for k, v in load_file(run.run / "checkpoint-8" / "model.safetensors").items())
    # In the span of the weights of steps 4 and 8 (the plain run's, the same up to there), with the coefficients
    # the callback reports; and not one of them, nor their uniform average: it trained.
    w4, w8 = (load_file(plain.run / f"checkpoint-{s}" / "model.safetensors") for s in (4, 8))
    a4, a8 = callback.result.coefficients
    combined = {k: a4 * w4[k].double() + a8 * w8[k].double() for k in w4}
    names = sorted(w4)
    assert relative_difference(result, combined, names) < 1e-5
    for other in (w8, {k: (w4[k].double() + w8[k].double()) / 2 for k in w4}):
        assert relative_difference(result, other, names) > 1e-4


def test_under_ddp_every_process_fits_together_and_ends_with_the_same_model(tmp_path):
    ranks = ranks_of_script("hf_ddp_run.py", tmp_path / "ddp", torchrun=True)
    assert [(r["world"], r["count"]) for r in ranks] == [(2, 4), (2, 4)]  # steps 2, 4, 6, 8 on every process
    assert ranks[0]["coefficients"] == ranks[1]["coefficients"]
    assert all(torch.equal(v, ranks[1]["state"][k]) for k, v in ranks[0]["state"].items())
    # Fitting each on its own part of the batches, the two processes would end with two different models.
    alone = ranks_of_script("hf_ddp_run.py", tmp_path / "alone", "alone", torchrun=True)
    assert alone[0]["coefficients"] != alone[1]["coefficients"]
