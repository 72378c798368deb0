"""SubspaceSGD keeps its whole state where torch.optim keeps an optimizer's: `state_dict()` holds the
coordinates, the momentum, the step count and the off-span scale, and `load_state_dict` restores them bit for bit,
so a loop that checkpoints its optimizer the standard way (torch.save, a Trainer, Lightning) resumes the same run."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from twa_cli.engine.subspace import FlatParameters, SubspaceSGD
from twa_cli.tasks.models import build_model


def _setup(seed: int, offspan: bool = False):
    torch.manual_seed(seed)
    model = build_model({"name": "mlp", "kwargs": {"num_classes": 10, "in_channels": 1, "image_size": 8}})
    names = [n for n, _ in model.named_parameters()]
    flat = FlatParameters(model, names)
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(flat.params.numel(), 4, generator=g, dtype=torch.float64))
    basis = q.t().contiguous().float()
    r = torch.randn(flat.params.numel(), generator=g) * 1e-2 if offspan else None
    opt = SubspaceSGD(flat, basis, torch.randn(4, generator=g), lr=0.1, momentum=0.9, weight_decay=1e-3, offspan=r)
    return model, flat, opt


def _steps(model, opt, count: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("offspan", [False, True])
def test_state_dict_holds_the_iteration_and_a_fresh_optimizer_continues_bit_for_bit(offspan):
    model_a, flat_a, opt_a = _setup(0, offspan)
    _steps(model_a, opt_a, 3, seed=5)
    state = opt_a.state_dict()
    saved = state["state"][0]
    assert set(saved) == {"coords", "momentum", "step", "offspan"}
    assert int(saved["step"]) == 3 and float(saved["momentum"].abs().sum()) > 0
    buffer = io.BytesIO()
    torch.save(state, buffer)  # as a loop checkpoints its optimizer; read back as safely as the tool reads files
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    model_b, flat_b, opt_b = _setup(7, offspan)  # other weights, other coordinates: all replaced by the load
    assert not torch.equal(flat_b.params, flat_a.params)
    opt_b.load_state_dict(loaded)
    assert torch.equal(opt_b.coords, opt_a.coords) and torch.equal(opt_b.momentum, opt_a.momentum)
    assert torch.equal(flat_b.params, flat_a.params)  # the weights are rebuilt from the coordinates
    assert (opt_b.steps, opt_b.offspan_scale, opt_b.offspan_momentum) == (3, opt_a.offspan_scale,
                                                                        opt_a.offspan_momentum)
    _steps(model_a, opt_a, 4, seed=9)
    _steps(model_b, opt_b, 4, seed=9)
    assert torch.equal(flat_b.params, flat_a.params)
    assert torch.equal(opt_b.momentum, opt_a.momentum)
    if offspan:
        assert opt_b.offspan_scale == opt_a.offspan_scale != 1.0


def test_the_optimizer_state_is_the_tensors_it_steps():
    """`optimizer.state` shows the live coordinates and momentum, as torch.optim.SGD shows its momentum buffer."""
    model, flat, opt = _setup(0)
    _steps(model, opt, 2, seed=3)
    own = opt.state[flat.params]
    assert own["coords"] is opt.coords and own["momentum"] is opt.momentum


def test_a_state_of_another_basis_is_refused():
    _, _, opt = _setup(0)
    state = opt.state_dict()
    state["state"][0] = {**state["state"][0], "coords": torch.zeros(5), "momentum": torch.zeros(5)}
    with pytest.raises(ValueError, match="another basis"):
        opt.load_state_dict(state)
