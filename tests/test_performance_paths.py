"""Half-precision bases, memory-mapped basis files and the streaming orthogonalizer's memory-saving paths."""

import pytest
import torch
from helpers import flat_trainable, trajectory, write_synthetic_folder

from twa_cli.commands.train_subspace import SubspaceConfig, train_subspace
from twa_cli.core.basis import Basis, orthogonalize
from twa_cli.core.basis_files import load_basis, save_basis
from twa_cli.engine.orthogonalizer import orthogonality_error
from twa_cli.engine.subspace import Projection
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import Source, list_folder
from twa_cli.io.safetensors import map_tensor, save_tensors


def _orthonormal(k: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=torch.float64))[0].t().contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_projection_accumulates_in_fp32(dtype):
    stored = _orthonormal(7, 50_001).to(dtype)  # odd D: the last slab is partial
    exact = stored.double()
    projection = Projection(stored, torch.float32)
    assert projection.widen and projection.step < stored.shape[1]
    g = torch.Generator().manual_seed(1)
    grad, coords = torch.randn(50_001, generator=g), torch.randn(7, generator=g)
    c, w = torch.empty(7), torch.empty(50_001)
    scratch = projection.scratch.data_ptr()
    projection.coords_of(grad, c)
    projection.point_of(coords, w)
    assert projection.scratch.data_ptr() == scratch
    # fp32 accumulation: errors of fp32 rounding, far below the basis's own bf16/fp16 rounding (~1e-3)
    assert torch.allclose(c.double(), exact @ grad.double(), rtol=0, atol=1e-4)
    assert torch.allclose(w.double(), exact.t() @ coords.double(), rtol=0, atol=1e-5)


def test_half_precision_basis_is_the_rounded_fp32_basis(tmp_path):
    w = trajectory(12, 30_000)
    ckpts = list_folder(write_synthetic_folder(tmp_path / "walk", w)[0].parent)
    full = orthogonalize(ckpts, hashes=False)
    half = orthogonalize(ckpts, hashes=False, dtype="bfloat16")
    assert half.vectors.dtype == torch.bfloat16
    assert torch.equal(half.vectors, full.vectors.to(torch.bfloat16))
    assert half.errors["orthogonality"] <= 1e-6
    assert 1e-6 < half.errors["orthogonality_stored"] < 1e-2
    loaded = load_basis(save_basis(half, tmp_path / "half.safetensors"))
    assert loaded.vectors.dtype == torch.bfloat16 and torch.equal(loaded.vectors, half.vectors)


def test_correlated_trajectory_meets_the_bounds_and_records_them(tmp_path):
    # Each checkpoint a random step of 1e-3 of the offset's norm from the previous one, like a real run.
    w = trajectory(100, 20_000, seed=3, step=1e-3)
    ckpts = list_folder(write_synthetic_folder(tmp_path / "walk", w)[0].parent)
    basis = orthogonalize(ckpts, hashes=False, block=12)
    assert basis.rank == 100
    assert basis.errors["orthogonality"] <= 1e-6
    assert orthogonality_error(basis.vectors) == basis.errors["orthogonality"]
    assert float((basis.vectors.double().t() @ basis.coords - w.float().double().t()).norm(dim=0).max()
                 / w.norm(dim=1).min()) <= 1e-6


def _mapped_files() -> set[str]:
    with open("/proc/self/maps") as fh:
        return {line.split()[-1] for line in fh if len(line.split()) >= 6}


def test_basis_file_is_memory_mapped_not_read(tmp_path):
    vectors = _orthonormal(4, 10_000).float()
    path = save_basis(Basis(vectors=vectors, coords=torch.eye(4, dtype=torch.float64), layout=[("w", (10_000,))],
                            sources=[Source(f"c{i}.safetensors") for i in range(4)]),
                      tmp_path / "basis.safetensors")
    loaded = load_basis(path)
    assert str(path.resolve()) in _mapped_files()
    assert torch.equal(loaded.vectors, vectors)
    loaded.vectors.zero_()  # copy-on-write: the file keeps its contents
    assert torch.equal(map_tensor(path, "basis"), vectors)


def test_truncated_basis_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "b.safetensors"
    save_tensors(path, {"basis": torch.randn(3, 1000)}, {})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(TwaError, match="truncated"):
        map_tensor(path, "basis")


def test_train_subspace_with_a_bfloat16_basis(mlp_run, tmp_path):
    # lr 0.05, the run's own: this span's trained checkpoints are about twice as sharp as its center, where the lr
    # check measures, and a whole epoch at the lr it allows (0.38) ends at chance (the README says so).
    cfg = SubspaceConfig(epochs=1, lr=0.05, batch_size=64, basis_dtype="bfloat16", eval_every_epoch=False)
    result = train_subspace(mlp_run, tmp_path / "twa", cfg)
    basis = load_basis(tmp_path / "twa" / "basis.safetensors")
    assert basis.vectors.dtype == torch.bfloat16
    names = [n for n, _ in basis.layout]
    w = flat_trainable(result.result, names)
    p = basis.vectors.double()
    # in the span of the stored (rounded) basis, up to fp32 accumulation
    assert float((w - p.t() @ (p @ w)).norm() / w.norm()) < 1e-3
    assert result.test is not None and result.test.accuracy > 50
