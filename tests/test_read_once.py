"""Each command reads each checkpoint once: the listing opens its header, one pass reads its tensors, and the
hash a basis records comes from that same pass (`twa_cli.io.through`)."""

from __future__ import annotations

import collections
import hashlib
from pathlib import Path

import pytest
import torch

from twa_cli.core.basis import orthogonalize
from twa_cli.errors import TwaError
from twa_cli.io import checkpoints, readers, through
from twa_cli.io.checkpoints import list_folder, load_tensors, sha256_file
from twa_cli.io.readers import ReadOptions
from twa_cli.io.safetensors import save_tensors
from twa_cli.io.through import read_through
from twa_cli.io.writers import write_weights


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "half.weight": torch.randn(5, 7, generator=g).to(torch.bfloat16),  # odd byte count before the next one
        "fc.weight": torch.randn(4, 8, generator=g),
        "fc.bias": torch.randn(4, generator=g),
        "bn.running_mean": torch.randn(8, generator=g),
        "bn.num_batches_tracked": torch.tensor(seed),
        "scale": torch.tensor(1.5 + seed),  # 0-dim
        "empty": torch.zeros(0, 3),
        "mask": torch.rand(6, generator=g) > 0.5,
    }


def _files(root: Path) -> dict[str, Path]:
    """The same state dict as safetensors, a DataParallel pickle, and a sharded safetensors set."""
    root.mkdir()
    state = _state(0)
    st = save_tensors(root / "one.safetensors", state, {"format": "pt"})
    pt = root / "one.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, pt)
    (root / "sharded").mkdir()
    index = write_weights(root / "sharded", "model", state, {"format": "pt"}, max_shard_size=600, exclusive=True)
    assert index.name.endswith(".index.json") and len(readers.shard_files(index)) > 1
    return {"safetensors": st, "pickle": pt, "sharded": index}


@pytest.mark.parametrize("kind", ["safetensors", "pickle", "sharded"])
def test_read_through_gives_every_tensor_and_the_file_hash(tmp_path, kind):
    path = _files(tmp_path / "f")[kind]
    digest = hashlib.sha256()
    got = dict(read_through(path, ReadOptions(), digest))
    expected = load_tensors(path)
    assert got.keys() == expected.keys() == _state(0).keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert digest.hexdigest() == sha256_file(path)


@pytest.mark.parametrize("kind", ["safetensors", "sharded"])
def test_skipped_tensors_are_left_out_and_still_hashed(tmp_path, kind):
    path = _files(tmp_path / "f")[kind]
    skip = {"fc.weight", "conv.weight"}
    digest = hashlib.sha256()
    assert set(dict(read_through(path, ReadOptions(), digest, skip=skip))) == set(_state(0)) - skip
    assert digest.hexdigest() == sha256_file(path)
    assert set(dict(read_through(path, ReadOptions(), skip=skip))) == set(_state(0)) - skip


def test_a_truncated_file_is_one_line_naming_it(tmp_path):
    path = _files(tmp_path / "f")["safetensors"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(TwaError, match=r"one\.safetensors: cannot read tensor .*truncated"):
        list(read_through(path))
    path.write_bytes(data[:20])
    with pytest.raises(TwaError, match=r"one\.safetensors: ends early"):
        list(read_through(path))


def _count_reads(monkeypatch) -> collections.Counter:
    """Every opening of a checkpoint file, by file name: safetensors headers and maps, pickle loads, and plain
    opens for a read-through; `sha256_file` is not to be called at all."""
    opened: collections.Counter = collections.Counter()

    def counting(fn, key=lambda a: a[0]):
        def wrapper(*args, **kwargs):
            opened[Path(str(key(args))).name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(readers, "safe_open", counting(readers.safe_open))
    monkeypatch.setattr(readers, "torch_load", counting(readers.torch_load))
    monkeypatch.setattr(through, "open", counting(open), raising=False)

    def no_second_hash_pass(path, *args, **kwargs):
        raise AssertionError(f"{path} was hashed in a pass of its own")

    monkeypatch.setattr(checkpoints, "sha256_file", no_second_hash_pass)
    return opened


def _run(folder: Path, suffix: str) -> list[Path]:
    folder.mkdir()
    paths = []
    for i in range(5):
        state = {k: v for k, v in _state(i).items() if k not in ("empty", "mask")}
        path = folder / f"ckpt_{i}{suffix}"
        if suffix == ".pt":
            torch.save(state, path)
        else:
            save_tensors(path, state, {"format": "pt", "step": str(i)})
        paths.append(path)
    return paths


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_orthogonalize_opens_each_file_for_its_header_and_reads_it_once(tmp_path, monkeypatch, twa, suffix):
    paths = _run(tmp_path / "run", suffix)
    hashes = {p.name: sha256_file(p) for p in paths}
    opened = _count_reads(monkeypatch)
    twa("orthogonalize", tmp_path / "run", "-o", tmp_path / "basis.safetensors")
    # safetensors: the header at listing, then one pass; a pickle: its load at listing, then one pass that
    # reads the bytes for the hash and maps the tensors from them
    assert dict(opened) == {p.name: 2 if suffix == ".safetensors" else 3 for p in paths}
    recorded = checkpoints.sources_of(checkpoints.read_checkpoint(tmp_path / "basis.safetensors"))
    assert {Path(s.path).name: s.sha256 for s in recorded} == hashes


def test_swa_opens_each_file_twice_and_hashes_none(tmp_path, monkeypatch, twa):
    paths = _run(tmp_path / "run", ".safetensors")
    opened = _count_reads(monkeypatch)
    twa("swa", tmp_path / "run", "-o", tmp_path / "swa.safetensors")
    assert dict(opened) == {p.name: 2 for p in paths}


def test_one_pass_basis_equals_the_basis_read_by_columns(tmp_path):
    """The single-process pass and a rank's column reads (`columns` covering everything) agree bit for bit:
    vectors, coordinates, the buffers' mean and the recorded sources."""
    _run(tmp_path / "run", ".safetensors")
    ckpts = list_folder(tmp_path / "run")
    names = ["conv.weight", "half.weight", "fc.weight", "fc.bias"]
    one = orthogonalize(ckpts, names=names)
    by_columns = orthogonalize(ckpts, names=names, columns=(0, one.dim))
    assert torch.equal(one.vectors, by_columns.vectors) and torch.equal(one.coords, by_columns.coords)
    assert one.buffers.keys() == by_columns.buffers.keys() == {"bn.running_mean", "bn.num_batches_tracked", "scale"}
    assert all(torch.equal(one.buffers[k], by_columns.buffers[k]) for k in one.buffers)
    assert one.sources == by_columns.sources
    assert one.dim == sum(_state(0)[n].numel() for n in names)


def test_a_block_with_nan_is_refused_whole_before_anything_changes():
    """The orthogonalizer finds NaN and Inf from the row norms it takes anyway (no pass of its own), says which
    rows, and leaves the basis as it was."""
    from twa_cli.engine.orthogonalizer import NotFiniteRows, Orthogonalizer

    g = torch.Generator().manual_seed(0)
    grower = Orthogonalizer(50, capacity=4)
    grower.add_block(torch.randn(2, 50, generator=g))
    before = (grower.vectors.clone(), grower.coords.clone())
    block = torch.randn(3, 50, generator=g)
    block[1, 7], block[2, 0] = float("nan"), float("inf")
    kept = block.clone()
    with pytest.raises(NotFiniteRows) as caught:
        grower.add_block(block)
    assert caught.value.rows == [1, 2]
    assert grower.rank == 2 and grower.count == 2
    assert torch.equal(grower.vectors, before[0]) and torch.equal(grower.coords, before[1])
    assert torch.equal(block[0], kept[0])  # the block as it came, to name the tensor from
    huge = torch.full((1, 50), 3e38)  # finite, near fp32's largest: its fp64 norm is finite, so it is taken
    assert grower.add_block(huge) == [True]
