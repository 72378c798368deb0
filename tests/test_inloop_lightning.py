"""twa's Lightning Callback in a real `lightning.Trainer` run (TinyClassifier with BatchNorm, CPU): each epoch's
weights join an in-memory basis, TWA trains in their span at the end of the last epoch (or half-way, stopping the
run) before ModelCheckpoint saves it, the basis travels in the checkpoint as the callback's state, and the result
equals `twa train-subspace --preset paper` on the epoch files of the same run."""

from __future__ import annotations

import json

import pytest
import realtools
import torch
from helpers import ranks_of_script
from inloop_helpers import CommandBatches, in_order, relative_difference
from test_realtools import epoch_files, plain_load

from twa_cli.integrations.lightning import TWACallback
from twa_cli.io.checkpoints import load_tensors
from twa_cli.tasks.resolve import Recorded, TaskRequest, resolve_task

pytestmark = pytest.mark.slow
LR, EPOCHS, BATCH = 0.5, 2, 16
MODEL, DATA = "realtools:TinyClassifier", "realtools:lightning_data"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("inloop-lightning")


@pytest.fixture(scope="module")
def plain(root):
    """The run without the callback: its epoch files are what the command reads."""
    return realtools.build_lightning_run(root / "plain")


def _task():
    """The command's task for these runs: the module's training_step on the data hook's training split."""
    hparams = {"n_in": 8, "hidden": 16, "n_classes": 3, "lr": 0.1}
    return resolve_task(TaskRequest(model=MODEL, data=DATA), Recorded.of("run", {"hparams": hparams}))


def test_the_callbacks_result_equals_train_subspace_on_the_epoch_files(plain, root, twa):
    out = root / "cli"
    twa("train-subspace", plain, "-o", out, "--model", MODEL, "--data", DATA, "--preset", "paper", "--epochs", EPOCHS,
        "--lr", LR, "--batch-size", BATCH, "--no-eval-every-epoch", "--device", "cpu")
    cli = load_tensors(out / "twa.safetensors")
    cli_alpha = [row["alpha"] for row in json.loads((out / "coefficients.json").read_text())["coefficients"]]

    task = _task()
    train = task.split("train", augment=True)
    callback = TWACallback(data=CommandBatches(task, train, BATCH), fit_options={
        "epochs": EPOCHS, "lr": LR, "bn_loader": in_order(task, train)})  # the module's training_step as loss
    ckpts = realtools.build_lightning_run(root / "inloop", extra=(callback,))

    assert callback.twa.count == 4 and len(callback.result.coefficients) == 4  # epochs 0..3
    last = plain_load(ckpts / "last.ckpt")
    result = last["state_dict"]  # the module's own names: model.0.weight, ...
    floating = [k for k, v in cli.items() if v.is_floating_point()]
    assert "model.1.running_mean" in floating  # BatchNorm statistics recomputed as the command does
    assert relative_difference(result, cli, floating) < 1e-5
    assert callback.result.coefficients == pytest.approx(cli_alpha, abs=1e-4)
    # The last epoch's file holds the result (saved after the fit) and the basis; the earlier ones the raw weights.
    assert all(torch.equal(v, result[k]) for k, v in plain_load(epoch_files(ckpts)[3])["state_dict"].items())
    state = next(v for k, v in last["callbacks"].items() if k.startswith("TWACallback"))
    assert state["fitted"] and state["basis"]["basis"]["count"] == 4
    for raw, ours in zip(epoch_files(plain, range(3)), epoch_files(ckpts, range(3)), strict=True):
        a, b = plain_load(raw)["state_dict"], plain_load(ours)["state_dict"]
        assert all(torch.equal(b[k], v) for k, v in a.items()), raw.name


def test_train_half_then_twa_stops_and_a_resumed_run_keeps_the_basis(plain, root):
    """fit_at=0.5, stop: after epoch 2 of 4 TWA trains in the span of epochs 0 and 1 on the Trainer's own loader with
    training_step, and the run ends with that epoch's checkpoint holding the result. The basis comes back from the
    checkpoint of epoch 0 as the callback's state when the real Trainer resumes from it."""
    callback = TWACallback(fit_at=0.5, stop=True, fit_options={"epochs": 1, "lr": LR})
    ckpts = realtools.build_lightning_run(root / "half", extra=(callback,))
    assert sorted(p.name.split("-")[0] for p in ckpts.glob("epoch=*.ckpt")) == ["epoch=0", "epoch=1"]
    result = plain_load(ckpts / "last.ckpt")["state_dict"]
    w0, w1 = (plain_load(f)["state_dict"] for f in epoch_files(plain, range(2)))
    a0, a1 = callback.result.coefficients
    params = [k for k in w0 if "running" not in k and "num_batches" not in k]
    assert relative_difference(result, {k: a0 * w0[k].double() + a1 * w1[k].double() for k in params}, params) < 1e-5
    assert relative_difference(result, w1, params) > 1e-4

    # Resumed from the checkpoint of epoch 0 by the real Trainer: the callback takes its basis back from it and
    # goes on adding (epochs 1..3), then fits at the end.
    again = TWACallback(fit_options={"epochs": 1, "lr": LR})
    realtools.build_lightning_run(root / "resumed", extra=(again,), ckpt_path=epoch_files(ckpts, range(1))[0])
    assert again.twa.count == 4 and len(again.result.coefficients) == 4
    assert torch.equal(again.twa.basis.vectors[0], callback.twa.basis.vectors[0])


def test_under_ddp_every_process_fits_together_and_ends_with_the_same_model(tmp_path):
    ranks = ranks_of_script("lightning_ddp_run.py", tmp_path / "ddp", "2")
    assert [r["count"] for r in ranks] == [3, 3]  # each epoch's weights, on every process
    assert ranks[0]["coefficients"] == ranks[1]["coefficients"]
    assert all(torch.equal(v, ranks[1]["state"][k]) for k, v in ranks[0]["state"].items())
    # Fitting each on its own half of the batches, the two processes would end with two different models.
    alone = ranks_of_script("lightning_ddp_run.py", tmp_path / "alone", "2", "alone")
    assert not torch.equal(alone[0]["state"]["model.0.weight"], alone[1]["state"]["model.0.weight"])
