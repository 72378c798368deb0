"""TWA.fit under torch.distributed, as the callbacks run it inside a DDP job: 2 CPU processes on gloo, each
with its half of every batch, against one process with the whole batches."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from torch import nn

from twa_cli.engine import TWA
from twa_cli.errors import TwaError

WORLD = 2



def _problem(batchnorm: bool):
    """A model, 3 weight vectors along a made-up run, and 4 batches of 8 examples."""
    torch.manual_seed(0)
    layers = [nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)] if batchnorm else \
        [nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)]
    model = nn.Sequential(*layers)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    snapshots = [{k: v + 0.1 * (i + 1) * torch.randn_like(v) if v.is_floating_point() else v
                  for k, v in start.items()} for i in range(3)]
    x = torch.randn(32, 3)
    y = x.sum(dim=1, keepdim=True).sin()
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    return model, snapshots, batches


def _loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _fit(model, snapshots, batches, **options):
    twa = TWA(model)
    for weights in snapshots:
        model.load_state_dict(weights)
        twa.add(model)
    result = twa.fit(model, batches, _loss, epochs=2, lr=0.1, **options)
    return {k: v.clone() for k, v in model.state_dict().items()}, result.coefficients


def _rank(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        out = {}
        for batchnorm in (False, True):
            model, snapshots, batches = _problem(batchnorm)
            mine = [tuple(t[rank * 4 : (rank + 1) * 4] for t in batch) for batch in batches]
            out[batchnorm] = _fit(model, snapshots, mine, parallel=True)
            if batchnorm:
                model, snapshots, _ = _problem(batchnorm)
                with warnings.catch_warnings(record=True) as said:
                    warnings.simplefilter("always")
                    out["alone"] = _fit(model, snapshots, mine)  # the default: alone, and said
                out["said"] = [str(w.message) for w in said]
                # A BatchNorm pass on fewer batches in one process counts for less in the average.
                model, snapshots, _ = _problem(batchnorm)
                out["short"] = _fit(model, snapshots, mine, parallel=True, bn_loader=mine[: 4 - 3 * rank])
        # Different numbers of batches: refused in every process before any step, not a hang.
        model, snapshots, _ = _problem(False)
        try:
            _fit(model, snapshots, mine[: 4 - rank], parallel=True)
        except TwaError as exc:
            out["unequal"] = str(exc)
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    mp.start_processes(_rank, args=(free_port(), str(folder)), nprocs=WORLD, start_method="spawn")
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_processes_that_each_see_half_of_every_batch_fit_what_one_process_fits_on_the_whole(ranks):
    state, coefficients = _fit(*_problem(batchnorm=False))
    for out in ranks:
        got, got_coefficients = out[False]
        assert got.keys() == state.keys()
        assert max(float((got[k] - state[k]).abs().max()) for k in state) < 1e-5
        assert torch.allclose(torch.tensor(got_coefficients), torch.tensor(coefficients), atol=1e-4)
    assert all(torch.equal(ranks[0][False][0][k], ranks[1][False][0][k]) for k in state)


def test_every_process_ends_with_the_same_model_batchnorm_statistics_included(ranks):
    together = [out[True][0] for out in ranks]
    assert all(torch.equal(together[0][k], together[1][k]) for k in together[0])
    # What the averaging does: fitting alone on its own halves, each process ends elsewhere.
    alone = [out["alone"][0] for out in ranks]
    assert not torch.equal(alone[0]["0.weight"], alone[1]["0.weight"])
    assert not torch.equal(alone[0]["1.running_mean"], alone[1]["1.running_mean"])
    assert all(any("parallel=True" in m for m in out["said"]) for out in ranks)


def test_batchnorm_statistics_are_weighted_by_the_batches_each_process_saw(ranks):
    short = [out["short"][0] for out in ranks]  # process 0 recomputed on 4 batches, process 1 on 1
    assert all(torch.equal(short[0][k], short[1][k]) for k in short[0])
    assert int(short[0]["1.num_batches_tracked"]) == 5
    # Process 1's 1 batch weighs 1/5: far nearer process 0's statistics than the plain mean of the two.
    alone_mean = [out["alone"][0]["1.running_mean"] for out in ranks]
    assert not torch.allclose(short[0]["1.running_mean"], (alone_mean[0] + alone_mean[1]) / 2)


def test_processes_with_different_numbers_of_batches_are_refused_in_one_line_not_left_waiting(ranks):
    assert [out["unequal"] for out in ranks] == [ranks[0]["unequal"]] * 2
    assert "from 3 to 4 batches an epoch" in ranks[0]["unequal"]


def test_asking_for_a_parallel_fit_outside_torch_distributed_is_one_line():
    model, snapshots, batches = _problem(batchnorm=False)
    with pytest.raises(TwaError, match="parallel=True"):
        _fit(model, snapshots, batches, parallel=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_is_refused_in_one_line(dtype):
    model, _, batches = _problem(batchnorm=False)
    twa = TWA(model.to(dtype))
    twa.add(model)
    with pytest.raises(TwaError, match=f"'0.weight' is {str(dtype)[6:]}"):
        twa.fit(model, batches, _loss)
