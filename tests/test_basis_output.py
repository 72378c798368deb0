"""A large basis is computed inside its output file (`core.basis_files.BasisOutput`, `io.safetensors.PlacedRows`):
the file must be the one the usual writer makes, valid for the safetensors library, aligned, and appear whole
or not at all."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from twa_cli.core import basis_files
from twa_cli.core.basis import orthogonalize
from twa_cli.core.basis_files import BasisOutput, load_basis, save_basis
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import list_folder
from twa_cli.io.safetensors import PlacedRows

WIDTHS = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return length, json.loads(fh.read(length))


def _same_file_content(a: Path, b: Path) -> None:
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        for key in fa.keys():
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key
        assert fa.metadata() == fb.metadata()


def _in_place(ckpts, path: Path, **kwargs) -> tuple[BasisOutput, object]:
    with BasisOutput(path, exclusive=True, in_place_from=0, **kwargs) as out:
        basis = orthogonalize(ckpts, names=ckpts[0].trainable, storage=out)
        assert out.in_file and not path.exists()  # computed in the file, which appears only at the end
        out.save(basis, invocation={"argv": ["orthogonalize"]})
    return out, basis


def test_a_basis_computed_in_its_file_is_the_file_the_writer_makes(cnn_run, tmp_path):
    ckpts = list_folder(cnn_run)
    usual = save_basis(orthogonalize(ckpts, names=ckpts[0].trainable), tmp_path / "usual.safetensors",
                       invocation={"argv": ["orthogonalize"]})
    placed = tmp_path / "placed.safetensors"
    _, basis = _in_place(ckpts, placed)
    _same_file_content(usual, placed)  # the safetensors library reads it: offsets cover the data exactly
    loaded = load_basis(placed)
    assert torch.equal(loaded.vectors, basis.vectors) and loaded.layout == basis.layout
    length, header = _header(placed)
    start = 8 + length
    assert (start + header["basis"]["data_offsets"][0]) % 4096 == 0  # the rows begin on a page
    for key, entry in header.items():
        if key != "__metadata__":
            assert (start + entry["data_offsets"][0]) % WIDTHS[entry["dtype"]] == 0, key  # aligned for mapping
    end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    assert placed.stat().st_size == start + end  # no room left over at the end of the file


def test_a_header_that_outgrows_its_room_is_written_the_usual_way(cnn_run, tmp_path):
    ckpts = list_folder(cnn_run)
    path = tmp_path / "long.safetensors"
    long = {"argv": ["x" * 20_000]}  # a header of more than the 4 KiB of room
    with BasisOutput(path, exclusive=True, in_place_from=0, room=4096) as out:
        basis = orthogonalize(ckpts, names=ckpts[0].trainable, storage=out)
        assert out.in_file
        out.save(basis, invocation=long)
    assert not out.in_file  # the rows moved to memory and the file was written from the start
    usual = save_basis(orthogonalize(ckpts, names=ckpts[0].trainable), tmp_path / "usual.safetensors",
                       invocation=long)
    _same_file_content(usual, path)
    assert torch.equal(load_basis(path).vectors, basis.vectors)


def test_nothing_appears_when_the_computation_fails_or_saves_nothing(cnn_run, tmp_path):
    ckpts = list_folder(cnn_run)
    folder = tmp_path / "out"
    folder.mkdir()
    path = folder / "basis.safetensors"
    with pytest.raises(TwaError, match="boom"):
        with BasisOutput(path, exclusive=True, in_place_from=0) as out:
            orthogonalize(ckpts, names=ckpts[0].trainable, storage=out)
            raise TwaError("boom")
    with pytest.raises(RuntimeError, match="without saving"):
        with BasisOutput(path, exclusive=True, in_place_from=0) as out:
            orthogonalize(ckpts, names=ckpts[0].trainable, storage=out)
    assert list(folder.iterdir()) == []


def test_a_file_written_meanwhile_is_not_replaced(cnn_run, tmp_path):
    ckpts = list_folder(cnn_run)
    path = tmp_path / "basis.safetensors"
    with pytest.raises(TwaError, match="already exists"):
        with BasisOutput(path, exclusive=True, in_place_from=0) as out:
            basis = orthogonalize(ckpts, names=ckpts[0].trainable, storage=out)
            path.write_bytes(b"another writer")
            out.save(basis)
    assert path.read_bytes() == b"another writer"


def test_the_command_computes_a_large_basis_in_its_file(cnn_run, tmp_path, twa, monkeypatch):
    twa("orthogonalize", cnn_run, "-o", tmp_path / "memory.safetensors")
    finished = []
    original = PlacedRows.finish
    monkeypatch.setattr(PlacedRows, "finish", lambda self, *a: finished.append(1) or original(self, *a))
    monkeypatch.setattr(basis_files, "IN_PLACE_FROM", 0)  # every basis counts as large
    twa("orthogonalize", cnn_run, "-o", tmp_path / "file.safetensors")
    assert finished == [1]
    a, b = load_basis(tmp_path / "memory.safetensors"), load_basis(tmp_path / "file.safetensors")
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.coords, b.coords)
    assert a.sources == b.sources and a.layout == b.layout
    # a half-precision basis is narrowed in memory, never in the file
    finished.clear()
    twa("orthogonalize", cnn_run, "-o", tmp_path / "half.safetensors", "--dtype", "bfloat16")
    assert finished == [] and load_basis(tmp_path / "half.safetensors").vectors.dtype == torch.bfloat16


@pytest.mark.parametrize("refusal", ["reserve", "map"])
def test_a_file_system_that_cannot_map_the_file_gets_the_basis_written_from_memory(cnn_run, tmp_path, monkeypatch,
                                                                                  refusal):
    import errno
    import mmap

    from twa_cli.io import safetensors

    def refuse(*args, **kwargs):
        raise OSError(errno.EOPNOTSUPP if refusal == "reserve" else errno.ENODEV, "not supported here")

    if refusal == "reserve":
        monkeypatch.setattr(safetensors.os, "posix_fallocate", refuse)
    else:
        monkeypatch.setattr(safetensors, "mmap", type("NoMap", (), {"PAGESIZE": mmap.PAGESIZE, "mmap": refuse}))
    ckpts = list_folder(cnn_run)
    path = tmp_path / "basis.safetensors"
    with BasisOutput(path, exclusive=True, in_place_from=0) as out:
        basis = orthogonalize(ckpts, names=ckpts[0].trainable, storage=out)
        assert not out.in_file
        out.save(basis)
    usual = save_basis(orthogonalize(ckpts, names=ckpts[0].trainable), tmp_path / "usual.safetensors")
    _same_file_content(usual, path)


def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(cnn_run, tmp_path, twa, monkeypatch):
    import errno

    from twa_cli.io import safetensors

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.os, "posix_fallocate", full)
    monkeypatch.setattr(basis_files, "IN_PLACE_FROM", 0)
    out = tmp_path / "out"
    out.mkdir()
    run = twa("orthogonalize", cnn_run, "-o", out / "basis.safetensors", check=False)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "basis.safetensors" in lines[0], run.stderr
    assert list(out.iterdir()) == []


def test_the_plan_counts_the_room_of_a_basis_computed_in_its_file(cnn_run, tmp_path, twa, monkeypatch):
    import json as json_

    monkeypatch.setattr(basis_files, "IN_PLACE_FROM", 0)
    plan = json_.loads(twa("orthogonalize", cnn_run, "-o", tmp_path / "b.safetensors", "--dry-run", "--json").stdout)
    twa("orthogonalize", cnn_run, "-o", tmp_path / "b.safetensors", "-q")
    size = (tmp_path / "b.safetensors").stat().st_size
    assert size >= 1 << 16  # the room is in the file ...
    assert abs(size - plan["disk_bytes"]) <= 32768  # ... and in the plan (its buffers are estimated)


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
