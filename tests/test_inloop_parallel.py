"""TWA.fit under torch.distributed, as the callbacks run it inside a DDP job: 2 CPU processes on gloo, each
with its half of every batch, against one process with the whole batches."""

from __future__ import annotations

import os

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
            out[batchnorm] = _fit(model, snapshots, mine)
            if batchnorm:
                model, snapshots, _ = _problem(batchnorm)
                out["alone"] = _fit(model, snapshots, mine, parallel=False)
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


def test_asking_for_a_parallel_fit_outside_torch_distributed_is_one_line():
    model, snapshots, batches = _problem(batchnorm=False)
    with pytest.raises(TwaError, match="parallel=True"):
        _fit(model, snapshots, batches, parallel=True)
