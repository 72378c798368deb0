"""The sharpness check: the subspace curvature it measures, the lr it picks, and train-subspace using it."""

import json
import logging

import torch
import torch.nn.functional as F

from twa_cli.commands.train_subspace import SubspaceConfig, train_subspace
from twa_cli.core.batching import batches
from twa_cli.core.sharpness import DOUBLE_BACKWARD, MARGIN, check_lr, subspace_sharpness
from twa_cli.engine.subspace import FlatParameters, SubspaceSGD
from twa_cli.tasks.classification import ClassificationTask
from twa_cli.tasks.images import data_spec

MLP = {"name": "mlp", "kwargs": {"num_classes": 10, "in_channels": 1, "image_size": 8, "hidden": 16, "depth": 1}}


def test_sharpness_is_the_top_eigenvalue_of_the_projected_hessian():
    torch.manual_seed(0)
    task = ClassificationTask(MLP, data_spec("digits"))
    model = task.build_model()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    dim = sum(p.numel() for p in model.parameters())
    basis = torch.linalg.qr(torch.randn(dim, 6))[0].t().contiguous()
    # As training builds it: the weights as one flat buffer, the start as coordinates plus its off-span part.
    flat = FlatParameters(model, names)
    w0 = flat.params.detach().clone()
    coords = basis @ w0
    optimizer = SubspaceSGD(flat, basis, coords, lr=0.1, offspan=w0 - basis.t() @ coords)
    sample = [next(batches(task, task.dataset("train", augment=True), 64))]
    (x, y), _ = sample[0]

    def loss_of(flat_w: torch.Tensor) -> torch.Tensor:
        chunks, offset = [], 0
        for s in shapes:
            chunks.append(flat_w[offset : offset + s.numel()].view(s))
            offset += s.numel()
        w1, b1, w2, b2 = chunks
        return F.cross_entropy(F.linear(torch.relu(F.linear(x.flatten(1), w1, b1)), w2, b2), y)

    w = flat.params.detach().clone()  # the optimizer's point
    exact = torch.autograd.functional.hessian(lambda a: loss_of(w + basis.t() @ a), torch.zeros(6))
    top = float(torch.linalg.eigvalsh(exact).max())
    measured, method = subspace_sharpness(model, task, optimizer, sample, iters=60)
    assert method == DOUBLE_BACKWARD
    assert abs(measured - top) < 1e-3 * abs(top)


def test_lr_is_lowered_only_above_half_the_stability_limit():
    kept = check_lr(2.0, 0.9, sharpness=0.5)  # limit 7.6
    assert kept.used == 2.0 and abs(kept.limit - 7.6) < 1e-12
    lowered = check_lr(2.0, 0.9, sharpness=2.0)  # limit 1.9
    assert abs(lowered.used - MARGIN * 1.9) < 1e-12
    assert check_lr(2.0, 0.9, sharpness=0.0).used == 2.0  # flat span: nothing to limit


def test_train_subspace_trains_at_the_checked_lr_and_says_so(mlp_run, tmp_path, caplog):
    cfg = SubspaceConfig(epochs=1, lr=50.0, batch_size=64, eval_every_epoch=False)
    with caplog.at_level(logging.WARNING, logger="twa"):
        result = train_subspace(mlp_run, tmp_path / "twa", cfg)
    saved = json.loads((tmp_path / "twa" / "lr-check.json").read_text())
    assert result.lr_check is not None and saved == result.lr_check.to_dict()
    assert saved["requested"] == 50.0 and saved["used"] < 50.0
    assert result.history[0]["lr"] <= saved["used"]  # the loop ran at the lowered lr
    assert "too large for this span" in caplog.text


def test_a_run_that_leaves_the_basin_says_so(mlp_run, tmp_path, caplog):
    # This span is about twice as sharp at its trained checkpoints as at its center, where the check measures:
    # a whole epoch at the lr it allows ends far above the starting loss (near chance), and the user is told.
    with caplog.at_level(logging.WARNING, logger="twa"):
        left = train_subspace(mlp_run, tmp_path / "left", SubspaceConfig(epochs=1, batch_size=64,
                                                                          eval_every_epoch=False))
    assert left.lr_check is not None and left.lr_check.start_loss is not None
    saved = json.loads((tmp_path / "left" / "lr-check.json").read_text())
    assert saved["start_loss"] == left.lr_check.start_loss
    assert left.history[-1]["train_loss"] > 1.5 * saved["start_loss"]
    assert "left the span's basin" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="twa"):
        kept = train_subspace(mlp_run, tmp_path / "kept", SubspaceConfig(epochs=1, lr=0.05, batch_size=64,
                                                                          eval_every_epoch=False))
    assert kept.lr_check is not None and kept.lr_check.used == 0.05
    assert kept.history[-1]["train_loss"] <= 1.5 * kept.lr_check.start_loss
    assert "left the span's basin" not in caplog.text


class _OnceDifferentiableReLU(torch.autograd.Function):
    """A ReLU whose backward cannot itself be differentiated, as fused attention kernels' cannot: asked for a
    graph of its backward (a double backward), it raises as they do."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("derivative for fused_relu_backward is not implemented")
        (x,) = ctx.saved_tensors
        return grad * (x > 0)


class _FusedMLP(torch.nn.Module):
    def __init__(self, reference: torch.nn.Module):
        super().__init__()
        self.net = reference.net

    def forward(self, x):
        x = self.net[0](x)
        x = self.net[1](x)
        return self.net[3](_OnceDifferentiableReLU.apply(x))


def _check_setup(seed: int = 0):
    torch.manual_seed(seed)
    task = ClassificationTask(MLP, data_spec("digits"))
    model = task.build_model()
    names = [n for n, _ in model.named_parameters()]
    dim = sum(p.numel() for p in model.parameters())
    basis = torch.linalg.qr(torch.randn(dim, 5))[0].t().contiguous()
    flat = FlatParameters(model, names)
    w0 = flat.params.detach().clone()
    coords = basis @ w0
    optimizer = SubspaceSGD(flat, basis, coords, lr=0.1, offspan=w0 - basis.t() @ coords)
    sample = [next(batches(task, task.dataset("train", augment=True), 128))]
    return task, model, optimizer, sample


def test_without_a_second_derivative_the_check_uses_finite_differences_and_agrees():
    from twa_cli.core.sharpness import FINITE_DIFFERENCES

    task, model, optimizer, sample = _check_setup()
    exact, method = subspace_sharpness(model, task, optimizer, sample, iters=30)
    assert method == DOUBLE_BACKWARD
    fused = _FusedMLP(model)
    estimate, method = subspace_sharpness(fused, task, optimizer, sample, iters=30)
    assert method == FINITE_DIFFERENCES  # the double backward raised; the check fell back and says so
    assert abs(estimate - exact) < 1e-2 * abs(exact)
    before = [p.detach().clone() for p in model.parameters()]
    subspace_sharpness(fused, task, optimizer, sample, iters=2, method=FINITE_DIFFERENCES)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # weights restored


class _Quadratic(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.full((dim,), 0.1))


class _QuadraticTask:
    """A loss 0.5 theta^T A theta: its Hessian is A wherever the check measures it."""

    def __init__(self, eigenvalues: list[float]) -> None:
        self.hessian = torch.diag(torch.tensor(eigenvalues))

    def loss(self, model: torch.nn.Module, batch: object) -> torch.Tensor:
        return 0.5 * model.theta @ (self.hessian @ model.theta)


def test_sharpness_is_the_largest_positive_curvature_when_a_negative_one_is_larger():
    """Issue 19: power iteration found the eigenvalue largest in size, -5 here, and the check then allowed any
    lr ("limit": Infinity) though the span curves upward at 1.5 along another direction."""
    eigenvalues = [-5.0, 1.5, 0.5, 0.25, -0.1, 0.0]
    model, task = _Quadratic(len(eigenvalues)), _QuadraticTask(eigenvalues)
    flat = FlatParameters(model, ["theta"])
    basis = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))[0].t().contiguous()
    optimizer = SubspaceSGD(flat, basis, basis @ flat.params.detach(), lr=0.1)
    measured, _ = subspace_sharpness(model, task, optimizer, [(((torch.zeros(1), torch.zeros(1)), None), 1.0)])
    assert abs(measured - 1.5) < 1e-6, measured
    assert abs(check_lr(2.0, 0.9, measured).used - MARGIN * 2 * 1.9 / 1.5) < 1e-6
