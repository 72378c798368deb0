import torch
from helpers import flat_trainable, trajectory, write_synthetic_folder

from twa_cli.core.basis import orthogonalize, reconstruction_errors
from twa_cli.core.basis_files import load_basis, save_basis
from twa_cli.engine.orthogonalizer import orthogonality_error
from twa_cli.io.checkpoints import list_folder, read_checkpoint


def test_basis_of_real_checkpoints_is_orthonormal_and_spans_them(cnn_run):
    ckpts = list_folder(cnn_run)
    basis = orthogonalize(ckpts, names=ckpts[0].trainable)  # the trainable tensors the checkpoints record
    assert basis.rank == len(ckpts)
    gram = basis.vectors.double() @ basis.vectors.double().t()
    assert torch.allclose(gram, torch.eye(basis.rank, dtype=torch.float64), atol=1e-6)
    names = [n for n, _ in basis.layout]
    for i, ckpt in enumerate(ckpts):
        w = flat_trainable(ckpt.path, names)
        projected = basis.vectors.double().t() @ (basis.vectors.double() @ w)
        assert float((w - projected).norm() / w.norm()) < 1e-6
        assert float((basis.vectors.double().t() @ basis.coords[:, i] - w).norm() / w.norm()) < 1e-6


def test_nearly_collinear_trajectory_stays_orthonormal(tmp_path):
    # 100 checkpoints whose successive differences are 1e-3 of their norm: classical fp32 Gram-Schmidt fails here.
    w = trajectory(100, 20_000, step=1e-3 / 141)
    ckpts = list_folder(write_synthetic_folder(tmp_path / "walk", w)[0].parent)
    basis = orthogonalize(ckpts, hashes=False)
    assert basis.rank == 100
    assert orthogonality_error(basis.vectors) <= 1e-6
    assert max(reconstruction_errors(basis, ckpts)) <= 1e-6


def test_duplicates_are_dropped_and_coefficients_still_exact(tmp_path):
    w = trajectory(6, 5_000)
    w = torch.cat([w[:3], w[2:3], w[3:]])  # checkpoint 3 repeats checkpoint 2
    paths = write_synthetic_folder(tmp_path / "dup", w)
    assert len(list_folder(tmp_path / "dup")) == 6  # a folder listing counts the copy once ...
    ckpts = [read_checkpoint(p) for p in paths]  # ... the orthogonalizer, given both, drops it
    basis = orthogonalize(ckpts, hashes=False)
    assert basis.rank == 6
    assert [d["index"] for d in basis.dropped] == [3]
    alpha = torch.tensor([0.1, -0.2, 0.5, 0.0, 0.3, 0.3, -0.1], dtype=torch.float64)
    point = w.t() @ alpha
    coords = basis.vectors.double() @ point
    recovered = w.t() @ basis.coefficients(coords)
    assert float((recovered - point).norm() / point.norm()) < 1e-5
    # the duplicate pair shares its weight evenly (smallest-norm coefficients)
    got = basis.coefficients(coords)
    assert abs(float(got[2] - got[3])) < 1e-4


def test_rank_deficient_input_keeps_the_span(tmp_path):
    g = torch.Generator().manual_seed(1)
    generators = torch.randn(3, 2_000, generator=g, dtype=torch.float64)
    mix = torch.randn(8, 3, generator=g, dtype=torch.float64)
    w = mix @ generators  # 8 checkpoints in a 3-dimensional span
    ckpts = list_folder(write_synthetic_folder(tmp_path / "low", w)[0].parent)
    basis = orthogonalize(ckpts, hashes=False, tol=1e-5)
    assert basis.rank == 3
    assert len(basis.dropped) == 5
    assert max(reconstruction_errors(basis, ckpts)) <= 1e-5


def test_basis_file_round_trip(cnn_run, tmp_path):
    ckpts = list_folder(cnn_run)
    basis = orthogonalize(ckpts, names=ckpts[0].trainable)
    path = save_basis(basis, tmp_path / "basis.safetensors")
    loaded = load_basis(path)
    assert torch.equal(loaded.vectors, basis.vectors)
    assert torch.equal(loaded.coords, basis.coords)
    assert loaded.layout == basis.layout
    assert loaded.recorded == basis.recorded
    assert set(loaded.buffers) == set(basis.buffers)
    assert len(loaded.sources) == basis.coords.shape[1]
    assert all(len(s.sha256) == 64 for s in loaded.sources)


def test_vectors_read_into_the_free_rows_make_the_basis_a_copy_makes():
    """Blocks are read into the rows they become (no block of their own); rows dropped within a block (a
    duplicate, a zero) shift the later ones down over them, which must not corrupt the basis."""
    from twa_cli.engine.orthogonalizer import Orthogonalizer, orthogonality_error

    g = torch.Generator().manual_seed(3)
    w = torch.randn(9, 5000, generator=g)
    w[3] = w[2]  # dropped inside the second block
    w[4] = 0.0
    w[7] = 2 * w[6] - w[5]  # dropped: in the span
    copied, placed = Orthogonalizer(5000, capacity=9), Orthogonalizer(5000, capacity=9)
    for start in range(0, 9, 3):
        copied.add_block(w[start : start + 3].clone())
        rows = placed.free_rows(3)
        assert rows.data_ptr() == placed._q[placed.rank].data_ptr()  # the basis's own storage
        rows.copy_(w[start : start + 3])
        placed.add_block(rows)
    assert placed.rank == copied.rank == 6 and [d.index for d in placed.dropped] == [3, 4, 7]
    assert torch.equal(placed.vectors, copied.vectors) and torch.equal(placed.coords, copied.coords)
    assert orthogonality_error(placed.vectors) < 1e-6
