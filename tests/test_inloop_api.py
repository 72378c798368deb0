"""The in-loop API (`twa_cli.TWA`, the tensor core): an orthonormal basis grown from tensors, the running mean,
and Algorithm 1 fitted on a user's DataLoader and loss, equal to `twa train-subspace --preset paper` on the same
checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import trajectory
from inloop_helpers import CommandOrder, relative_difference
from torch.utils.data import DataLoader

import twa_cli
from twa_cli.commands.common import task_of
from twa_cli.engine.orthogonalizer import Orthogonalizer, orthogonality_error
from twa_cli.io.checkpoints import list_folder, load_tensors
from twa_cli.tasks.resolve import TaskRequest


def test_the_orthogonalizer_grows_a_basis_one_vector_at_a_time_like_a_block():
    """Nearly collinear vectors (a run's trajectory), duplicates and a combination of earlier ones: added one at
    a time or as one block, the basis is orthonormal to 1e-6, rebuilds every vector, and drops what adds nothing."""
    points = trajectory(12, 5000, step=1e-3)
    extra = torch.stack([points[3], 0.25 * points[1] + 0.75 * points[5]])  # a duplicate, a combination
    vectors = torch.cat([points, extra]).float()
    one, block = Orthogonalizer(5000, capacity=2), Orthogonalizer(5000, capacity=14)
    added = [one.add(v) for v in vectors]
    block.add_block(vectors.clone())
    for grown in (one, block):
        assert grown.rank == 12 and grown.count == 14
        assert [d.index for d in grown.dropped] == [12, 13]
        assert orthogonality_error(grown.vectors) <= 1e-6
        rebuilt = grown.vectors.double().t() @ grown.coords
        assert float((rebuilt.t() - vectors.double()).norm() / vectors.double().norm()) < 1e-6
    assert added == [True] * 12 + [False, False]
    assert torch.allclose(one.coords, block.coords, rtol=0, atol=1e-9 * float(block.coords.abs().max()))


def test_the_orthogonalizer_state_round_trips():
    points = trajectory(5, 300).float()
    grown = Orthogonalizer(300)
    for p in points[:3]:
        grown.add(p)
    again = Orthogonalizer(300)
    again.load_state_dict(grown.state_dict())
    for p in points[3:]:
        grown.add(p)
        again.add(p)
    assert torch.equal(again.vectors, grown.vectors) and torch.equal(again.coords, grown.coords)


def test_running_mean_is_the_uniform_average():
    tensors = [{"w": torch.randn(4, 3), "n": torch.tensor(i)} for i in range(5)]
    mean = twa_cli.RunningMean()
    for t in tensors:
        mean.add(t)
    average = mean.average()
    assert torch.allclose(average["w"], torch.stack([t["w"].double() for t in tensors]).mean(0), atol=1e-15)
    assert int(average["n"]) == 4  # integers are not averaged: the last one added is kept


@pytest.mark.slow
def test_fit_equals_train_subspace_paper_on_the_same_checkpoints(cnn_run, tmp_path, twa):
    """A BatchNorm CNN's checkpoints added to `TWA` from a model, fitted on a DataLoader in the command's order
    with the task's loss: the weights (BatchNorm statistics included) and coefficients are the command's."""
    epochs, lr, batch = 2, 0.5, 64
    out = tmp_path / "cli"
    twa("train-subspace", cnn_run, "-o", out, "--preset", "paper", "--epochs", epochs, "--lr", lr,
        "--batch-size", batch, "--no-eval-every-epoch", "--device", "cpu")
    cli = load_tensors(out / "twa.safetensors")
    cli_alpha = [row["alpha"] for row in json.loads((out / "coefficients.json").read_text())["coefficients"]]

    ckpts = list_folder(cnn_run)
    task = task_of(TaskRequest(), ckpts[0])
    model = task.build_model()
    averager = twa_cli.TWA(model)
    for ckpt in ckpts:
        model.load_state_dict(load_tensors(ckpt.path))
        averager.add(model)
    assert averager.count == len(ckpts)
    train = task.split("train", augment=True)
    loader = DataLoader(train, batch_sampler=CommandOrder(len(train), batch))
    bn_loader = DataLoader(train, batch_size=128)  # the command recomputes BatchNorm in order, 128 at a time
    result = averager.fit(model, loader, task.loss, epochs=epochs, lr=lr, bn_loader=bn_loader)

    got = model.state_dict()
    floating = [k for k, v in cli.items() if v.is_floating_point()]
    assert any("running_mean" in k for k in floating)  # BatchNorm statistics are compared too
    assert relative_difference(got, cli, floating) < 1e-5
    assert result.coefficients == pytest.approx(cli_alpha, abs=1e-4)
    assert len(result.history) == epochs and result.history[-1]["step"] == epochs * len(loader)
    # Every parameter trains again as before, and holds no gradient of the fit.
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_fit_without_weights_added_says_so():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(twa_cli.TwaError, match="add"):
        twa_cli.TWA(model).fit(model, [], lambda m, b: m(b).sum())


def test_a_basis_in_a_mapped_file_fits_exactly_as_one_in_memory(cnn_run, tmp_path):
    """`allocate=MappedRows(folder)`: the basis lives in a file mapped into memory (grown past its capacity into
    new files, none left behind), and the fit is bit for bit the in-memory one."""
    ckpts = list_folder(cnn_run)
    task = task_of(TaskRequest(), ckpts[0])
    train = task.split("train", augment=False)
    results = {}
    for kind in ("memory", "mapped"):
        model = task.build_model()
        storage = twa_cli.MappedRows(tmp_path / "scratch") if kind == "mapped" else None
        averager = twa_cli.TWA(model, capacity=2, allocate=storage)  # 7 checkpoints: grown twice
        for ckpt in ckpts:
            model.load_state_dict(load_tensors(ckpt.path))
            averager.add(model)
        if storage is not None:
            dim = averager.basis.dim
            assert storage.mapped == [2 * dim * 4, 4 * dim * 4, 8 * dim * 4]  # grown twice, each time a new file
            mapped_file = averager.basis.vectors.untyped_storage().filename
            assert mapped_file is not None and mapped_file.startswith(str(tmp_path / "scratch"))
            assert not list((tmp_path / "scratch").iterdir())  # mapped, then unnamed: nothing is left behind
        result = averager.fit(model, DataLoader(train, batch_size=64), task.loss, epochs=1, lr=0.5)
        results[kind] = (model.state_dict(), result.coefficients)
    memory, mapped = results["memory"], results["mapped"]
    assert all(torch.equal(memory[0][k], mapped[0][k]) for k in memory[0])
    assert memory[1] == mapped[1]


def test_a_mapped_basis_that_does_not_fit_on_disk_is_one_error_at_once(tmp_path):
    """The file's space is reserved when it is made: a disk too small is a TwaError then, not a SIGBUS in the
    training process when a page of it is first written."""
    with pytest.raises(twa_cli.TwaError, match="cannot hold a basis"):
        twa_cli.MappedRows(tmp_path)(1 << 20, 1 << 30)  # 4 PiB
    assert not list(tmp_path.iterdir())
