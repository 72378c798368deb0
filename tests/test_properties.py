"""Property tests: the orthogonalizer on random low-rank and rank-deficient inputs, and the readers on
randomly truncated and corrupted checkpoint files."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import write_synthetic_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twa_cli.core.averaging import mean_of
from twa_cli.core.basis import orthogonalize, reconstruction_errors
from twa_cli.core.basis_files import load_basis, save_basis
from twa_cli.core.training import load_train_state
from twa_cli.engine.orthogonalizer import orthogonality_error
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import check_compatible, list_folder, load_tensors, read_checkpoint

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TOL = 1e-3


@FAST
@given(
    n=st.integers(1, 12),
    rank=st.integers(1, 12),
    dim=st.integers(16, 400),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-4, 1.0, 1e4]),
    duplicate=st.booleans(),
    block=st.integers(1, 5),
)
def test_orthogonalizer_output_is_orthonormal_and_keeps_the_span(n, rank, dim, seed, scale, duplicate, block):
    rank = min(rank, n)
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, rank, generator=g, dtype=torch.float64)
    w = mix @ torch.randn(rank, dim, generator=g, dtype=torch.float64) * scale
    if duplicate:
        w = torch.cat([w, w[:1]])  # an exact repeat adds no direction
    with tempfile.TemporaryDirectory() as folder:
        ckpts = list_folder(write_synthetic_folder(Path(folder), w)[0].parent)
        basis = orthogonalize(ckpts, tol=TOL, block=block, hashes=False)
        errors = reconstruction_errors(basis, ckpts)
    stored = w.float().double()  # what the files hold
    assert 1 <= basis.rank <= rank  # never a direction the checkpoints do not have
    assert orthogonality_error(basis.vectors) <= 1e-5
    assert max(errors) <= 2 * TOL  # every checkpoint is in the span (a dropped one within the tolerance)
    projected = stored @ basis.vectors.double().t() @ basis.vectors.double()
    assert float((stored - projected).norm() / stored.norm()) <= 2 * TOL
    if basis.rank == rank:  # then the span is the checkpoints' span: the two projectors agree
        _, _, vh = torch.linalg.svd(w, full_matrices=False)
        exact = vh[:rank].t() @ vh[:rank]
        ours = basis.vectors.double().t() @ basis.vectors.double()
        assert float((exact - ours).abs().max()) <= 1e-2


def _damage(data: bytes, draw) -> bytes:
    if draw(st.booleans()):
        return data[: draw(st.integers(0, len(data) - 1))]
    damaged = bytearray(data)
    header_end = 8 + int.from_bytes(data[:8], "little")
    for _ in range(draw(st.integers(1, 6))):
        # Mostly the header (lengths, JSON, metadata), where damage changes meaning rather than values.
        where = draw(st.integers(0, header_end - 1) | st.integers(0, len(data) - 1))
        damaged[where] = draw(st.sampled_from(b'0123456789-.eE:,{}[]" x') | st.integers(0, 255))
    return bytes(damaged)


@FAST
@given(data=st.data())
def test_damaged_checkpoints_never_cause_a_traceback(data, mlp_run: Path, twa):
    good = sorted(mlp_run.glob("ckpt-*.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        folder.mkdir()
        shutil.copy(good[0], folder / "a.safetensors")
        victim = folder / "b.safetensors"
        victim.write_bytes(_damage(good[1].read_bytes(), data.draw))
        # The library's readers: a damaged file is a TwaError, never anything else.
        try:
            ckpt = read_checkpoint(victim)
            _ = (ckpt.step, ckpt.epoch, ckpt.arch, ckpt.data, ckpt.trainable, ckpt.kind)
            load_tensors(victim)
            ckpts = list_folder(folder)
            check_compatible(ckpts)
            mean_of(ckpts)
        except TwaError as exc:  # one line, naming a file of the folder
            assert "\n" not in str(exc) and str(folder) in str(exc), str(exc)
        # And the commands: exit 0 (damage that leaves a valid file) or 1 with one line.
        for argv in (["eval", victim, "--device", "cpu"],
                     ["orthogonalize", folder, "-o", Path(tmp) / "basis.safetensors", "--force"]):
            proc = twa(*argv, check=False)
            code, err = proc.returncode, proc.stderr
            assert code in (0, 1), err
            assert "Traceback" not in err
            if code == 1:
                assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


@pytest.fixture(scope="module")
def written_files(mlp_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A basis file and a training state, as the tool writes them."""
    folder = tmp_path_factory.mktemp("written")
    ckpts = list_folder(mlp_run)
    return {
        "basis": save_basis(orthogonalize(ckpts, names=ckpts[0].trainable, hashes=False),
                            folder / "basis.safetensors"),
        "state": mlp_run / "train-state.safetensors",
    }


@FAST
@given(data=st.data(), kind=st.sampled_from(["basis", "state"]))
def test_damaged_basis_and_state_files_are_refused_in_one_line(data, kind, written_files):
    source = written_files[kind]
    config = read_checkpoint(written_files["state"]).json_field("state")["config"]
    # The tensors a resumed run loads the state into: those of the undamaged state itself.
    expected = {k: v for k, v in load_tensors(written_files["state"]).items() if k != "rng.torch"}
    with tempfile.TemporaryDirectory() as tmp:
        victim = Path(tmp) / source.name
        victim.write_bytes(_damage(source.read_bytes(), data.draw))
        try:
            if kind == "basis":
                load_basis(victim)
            else:
                load_train_state(victim, config, command="sample", expected=expected)
        except TwaError as exc:  # refused: in one line, naming the file (or the flag a damaged record changed)
            message = str(exc)
            assert "\n" not in message and (str(victim) in message or message.startswith("--resume")), message
