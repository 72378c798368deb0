"""torchrun with 2 CPU processes on gloo over loopback, against the single-process commands."""

import json
import os
import shutil
import subprocess
import sys
from itertools import pairwise

import pytest
import torch
from helpers import flat_trainable, free_port, write_synthetic_folder

from twa_cli.commands.train_subspace import SubspaceConfig, train_subspace
from twa_cli.core.basis import orthogonalize, read_flat
from twa_cli.core.basis_files import load_basis, save_basis, shard_path
from twa_cli.core.batching import batches
from twa_cli.core.placement import ColumnShards
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import list_folder, load_tensors, make_metadata
from twa_cli.io.safetensors import save_tensors
from twa_cli.tasks.models import build_model
from twa_cli.tasks.resolve import TaskRequest, resolve_task

WORLD = 2



def torchrun(*args):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "twa_cli", *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise AssertionError(f"torchrun twa {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def _group(rank: int, world: int = WORLD) -> ColumnShards:
    return ColumnShards(rank=rank, world=world, backend="gloo", device="cpu")


def _basis(run, path=None):
    ckpts = list_folder(run)
    basis = orthogonalize(ckpts, names=ckpts[0].trainable, hashes=path is not None)
    return save_basis(basis, path) if path is not None else basis


# --------------------------------------------------------------------------------------- in one process


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_together_see_exactly_the_single_process_batches(world):
    task = resolve_task(TaskRequest(model="mlp", data="digits"))
    data = task.dataset("train", augment=True)
    groups = [_group(r, world) for r in range(world)]
    streams = [batches(task, data, 64, shuffle=True, seed=3, epoch=1, parts=g) for g in groups]
    count = 0
    for ((x, y), _), *parts in zip(batches(task, data, 64, shuffle=True, seed=3, epoch=1), *streams, strict=True):
        assert torch.equal(torch.cat([b[0] for b, _ in parts]), x)
        assert torch.equal(torch.cat([b[1] for b, _ in parts]), y)
        # a rank's mean loss counts by its share of the batch: weight = world * share, so they sum to world
        assert sum(w for _, w in parts) == pytest.approx(world)
        count += 1
    assert count == -(-len(data) // 64)


def test_a_last_batch_smaller_than_the_world_gives_the_empty_rank_a_sample_that_counts_for_nothing():
    task = resolve_task(TaskRequest(model="mlp", data="digits"))
    data = torch.utils.data.TensorDataset(torch.arange(5.0)[:, None], torch.arange(5))
    group = _group(2, world=3)
    # batches of 4 and 1: rank 2 has 1 of the first (weight 3 * 1/4) and none of the second
    assert [(len(b[1]), w) for b, w in batches(task, data, 4, parts=group)] == [(1, 0.75), (1, 0.0)]


def test_columns_split_the_parameter_vector_without_gaps():
    for dim in (10, 11, 26_122):
        spans = [_group(r, 3).columns(dim) for r in range(3)]
        assert spans[0][0] == 0 and spans[-1][1] == dim
        assert all(a[1] == b[0] for a, b in pairwise(spans))
        assert max(hi - lo for lo, hi in spans) == -(-dim // 3)


def test_reading_a_column_range_reads_the_same_numbers_as_the_whole_vector(mlp_run):
    ckpt = list_folder(mlp_run)[-1]
    basis = orthogonalize([ckpt], names=ckpt.trainable, hashes=False)
    whole = torch.empty(basis.dim)
    read_flat(ckpt, basis.layout, whole)
    for lo, hi in ((0, 7), (5, 70), (100, 8_300), (8_300, basis.dim)):  # cuts through the middle of rows
        part = torch.empty(hi - lo)
        read_flat(ckpt, basis.layout, part, (lo, hi))
        assert torch.equal(part, whole[lo:hi])


def test_columns_of_a_whole_basis_file_are_its_slice(tmp_path):
    w = torch.randn(4, 1_000, dtype=torch.float64)
    ckpts = list_folder(write_synthetic_folder(tmp_path / "c", w)[0].parent)
    basis = orthogonalize(ckpts, hashes=False)
    save_basis(basis, tmp_path / "b.safetensors")
    part = load_basis(tmp_path / "b.safetensors", (300, 650))
    assert torch.equal(part.vectors, basis.vectors[:, 300:650]) and torch.equal(part.coords, basis.coords)


def test_sync_batchnorm_on_gloo_is_refused_with_a_reason():
    model = build_model({"name": "small-cnn", "kwargs": {"num_classes": 10, "in_channels": 1}})
    with pytest.raises(TwaError, match="SyncBatchNorm runs on GPUs only"):
        _group(0).sync_batchnorm(model, True)
    assert _group(0).sync_batchnorm(model, None) is False  # the default on gloo: off, with a warning


# --------------------------------------------------------------------------------------- under torchrun


@pytest.fixture(scope="module")
def sharded_basis(mlp_run, tmp_path_factory):
    index = tmp_path_factory.mktemp("sharded") / "basis.safetensors"
    summary = json.loads(torchrun("orthogonalize", mlp_run, "-o", index, "--json").stdout)
    return index, summary


@pytest.mark.slow
def test_sharded_orthogonalize_spans_the_same_subspace_with_half_the_basis_per_rank(mlp_run, sharded_basis):
    index, summary = sharded_basis
    single = _basis(mlp_run)
    gathered = load_basis(index)  # a single process reads every shard back
    p1, p2 = single.vectors.double(), gathered.vectors.double()
    assert gathered.rank == single.rank == summary["rank"]
    # |P1^T P1 - P2^T P2|_F = sqrt(2) |P2 - (P2 P1^T) P1|_F for orthonormal rows, without a D x D matrix
    assert 2**0.5 * float((p2 - (p2 @ p1.t()) @ p1).norm()) < 1e-5
    assert torch.allclose(gathered.coords, single.coords, atol=1e-5)
    whole = single.rank * single.dim * 4
    assert [s["rank"] for s in summary["shards"]] == [0, 1]
    for s in summary["shards"]:
        assert abs(s["bytes"] - whole / WORLD) <= single.rank * 4  # half, up to one column of padding
        assert shard_path(index, s["rank"], WORLD).exists()


@pytest.mark.slow
def test_distributed_train_subspace_equals_single_process(mlp_run, sharded_basis, tmp_path):
    index, _ = sharded_basis
    # A start off the span: its off-span part is split over the ranks too, and shrinks by weight decay alone.
    last = list_folder(mlp_run)[-1].path
    start = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
             for k, v in load_tensors(last).items()}
    init = save_tensors(tmp_path / "start.safetensors", start, make_metadata("checkpoint"))
    # The fit's end on both sides (no held-out choice): the algorithm itself is compared.
    args = ["--epochs", "2", "--lr", "0.1", "--batch-size", "64", "--weight-decay", "1e-2", "--init", init,
            "--select", "none"]
    summary = json.loads(torchrun("train-subspace", index, "-o", tmp_path / "dist", *args, "--json").stdout)
    single_basis = _basis(mlp_run, tmp_path / "single-basis.safetensors")
    single = train_subspace(single_basis, tmp_path / "single", SubspaceConfig(
        epochs=2, lr=0.1, batch_size=64, weight_decay=1e-2, init=str(init), device="cpu", select="none"))
    scales = [json.loads((tmp_path / d / "coefficients.json").read_text())["offspan_scale"] for d in ("dist", "single")]
    assert scales[0] is not None and scales[0] == pytest.approx(scales[1], rel=1e-9) and scales[0] < 1.0

    w_dist, w_single = load_tensors(tmp_path / "dist" / "twa.safetensors"), load_tensors(single.result)
    assert w_dist.keys() == w_single.keys()
    assert max(float((w_dist[k] - w_single[k]).abs().max()) for k in w_single) < 1e-5
    alpha_dist, alpha_single = torch.tensor(summary["coefficients"]), torch.tensor(single.coefficients)
    # The coefficients of nearly collinear checkpoints are large and of both signs: compared relative to them.
    # Sharded projections sum in another order; two epochs near the lr limit grow that rounding to ~1e-4 (a
    # wrong reduction or lr shows at 1e-1).
    assert float((alpha_dist - alpha_single).abs().max()) < 1e-3 * max(1.0, float(alpha_single.abs().max()))
    assert summary["test"]["accuracy"] == pytest.approx(single.test.accuracy, abs=1e-9)
    names = [n for n, _ in load_basis(single_basis).layout]
    dim = flat_trainable(single.result, names).numel()
    # Each rank holds its columns of the basis and nothing more: no padded copy on the short last rank.
    widths = [hi - lo for lo, hi in (_group(r).columns(dim) for r in range(WORLD))]
    assert [s["bytes"] for s in summary["shards"]] == [len(single.coefficients) * w * 4 for w in widths]


@pytest.mark.slow
def test_small_cnn_distributed_accuracy_is_within_one_point_of_one_process(cnn_run, tmp_path):
    args = ["--epochs", "1", "--lr", "0.5", "--batch-size", "64", "--no-eval-every-epoch"]
    proc = torchrun("train-subspace", cnn_run, "-o", tmp_path / "dist", *args, "--json")
    assert "SyncBatchNorm" in proc.stderr  # said once, by rank 0
    assert proc.stderr.count("SyncBatchNorm") == 1
    dist = json.loads(proc.stdout)
    single = train_subspace(cnn_run, tmp_path / "single",
                            SubspaceConfig(epochs=1, lr=0.5, batch_size=64, eval_every_epoch=False, device="cpu"))
    assert abs(dist["test"]["accuracy"] - single.test.accuracy) <= 1.0, (dist["test"], dist.get("lr_check"),
                                                                        single.test, single.lr_check)
    assert load_basis(tmp_path / "dist" / "basis.safetensors").rank == len(single.coefficients)


@pytest.mark.slow
def test_default_flags_give_the_same_coefficients_in_one_process_and_under_torchrun(mlp_run, tmp_path):
    """With every default, the lr check included (it runs under torchrun too, through the same projection).

    On the checkpoints from the first epoch's end on: the whole run's span holds the initial weights and trains
    at the edge of stability (coefficients of +-20 that end at 58% accuracy), where any rounding grows; here
    the sharded sums' other order stays a rounding, as it should."""
    tail = tmp_path / "tail"
    tail.mkdir()
    for path in sorted(mlp_run.glob("ckpt-*.safetensors"))[2:]:
        shutil.copy(path, tail / path.name)
    index = tmp_path / "basis" / "basis.safetensors"
    torchrun("orthogonalize", tail, "-o", index, "--json")
    dist = json.loads(torchrun("train-subspace", index, "-o", tmp_path / "dist", "--epochs", "2", "--json").stdout)
    single = train_subspace(index, tmp_path / "single", SubspaceConfig(epochs=2, device="cpu"))
    checks = [json.loads((tmp_path / d / "lr-check.json").read_text()) for d in ("dist", "single")]
    assert checks[0]["used"] == pytest.approx(checks[1]["used"], rel=1e-5) and checks[1]["used"] < 2.0
    alpha_dist, alpha_single = torch.tensor(dist["coefficients"]), torch.tensor(single.coefficients)
    assert float((alpha_dist - alpha_single).abs().max()) < 1e-5
    assert dist["test"]["accuracy"] == pytest.approx(single.test.accuracy, abs=1e-9) and single.test.accuracy > 80


def test_the_last_rank_projects_with_its_own_short_columns_and_leaves_the_basis_as_it_was(monkeypatch):
    # D = 5 over 2 ranks: shards of 3 columns, the last rank holding 2 real ones and a column of padding.
    from twa_cli.core.basis import Basis
    from twa_cli.core.placement import ColumnShard

    monkeypatch.setattr("twa_cli.core.placement._all_gather", lambda whole, part: None)  # no peer here
    model = torch.nn.Linear(4, 1)
    names = ["weight", "bias"]
    group = _group(rank=1)
    vectors = torch.linalg.qr(torch.randn(5, 2))[0].t().contiguous()[:, 3:]  # rank 1's columns of a rank-2 basis
    basis = Basis(vectors, torch.zeros(2, 2, dtype=torch.float64), [("weight", (1, 4)), ("bias", (1,))])
    flat = group.flat_parameters(model, names)
    coords = torch.tensor([0.5, -2.0], dtype=torch.float64)
    optimizer = group.subspace_sgd(flat, basis, coords, dtype=torch.float32, offspan=None, lr=0.1)
    assert basis.vectors is vectors  # the caller's basis is not swapped for a padded copy
    projector = optimizer.projector
    assert isinstance(projector, ColumnShard) and projector.products.basis.data_ptr() == vectors.data_ptr()
    own = projector.own(flat.params)
    assert own.shape == (3,) and torch.allclose(own[:2], vectors.t() @ coords.float()) and float(own[2]) == 0.0
    grads = torch.zeros_like(flat.params)
    grads[3:5] = torch.tensor([1.0, 2.0])
    grads[5] = float("nan")  # the padding's gradient is never read
    out = torch.empty(2)
    projector.coords_of(projector.own(grads), out)
    assert torch.allclose(out, vectors @ torch.tensor([1.0, 2.0]))


def test_a_rank_past_the_last_weight_holds_no_columns_and_writes_zeros(monkeypatch):
    from twa_cli.core.basis import Basis

    monkeypatch.setattr("twa_cli.core.placement._all_gather", lambda whole, part: None)
    model = torch.nn.Linear(2, 1)  # D = 3 over 4 ranks: rank 3 owns [3, 3)
    group = _group(rank=3, world=4)
    assert group.columns(3) == (3, 3)
    basis = Basis(torch.empty(2, 0), torch.zeros(2, 2, dtype=torch.float64), [("weight", (1, 2)), ("bias", (1,))])
    flat = group.flat_parameters(model, ["weight", "bias"])
    optimizer = group.subspace_sgd(flat, basis, torch.ones(2, dtype=torch.float64), dtype=torch.float32,
                                   offspan=None, lr=0.1)
    assert torch.equal(optimizer.projector.own(flat.params), torch.zeros(1))
    out = torch.full((2,), 7.0)
    optimizer.projector.coords_of(optimizer.projector.own(flat.grads), out)
    assert torch.equal(out, torch.zeros(2))
