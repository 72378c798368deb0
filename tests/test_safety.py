"""Security and data safety, tried as an attacker and as a careless user would.

Nothing a file says runs code (a marker file never appears); an output is never an input, inside one, or
holding one; a result is replaced whole or not at all; of two writers of one new output only one succeeds; a
resume with other inputs is refused and one with a smaller --lr uses it; a diverged run keeps only finite
state; a basis that is not orthonormal is never written.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import snapshot
from safetensors import safe_open
from safetensors.torch import save_file

from twa_cli.core.basis import orthogonalize
from twa_cli.core.basis_files import save_basis
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import list_folder, load_tensors, read_checkpoint
from twa_cli.io.safetensors import save_tensors


def _marker_payload(marker: Path) -> dict:
    """A description naming code that would create `marker` if it were ever called."""
    return {"name": "os:system", "kwargs": {"command": f"touch {marker}"}}


def _hostile_copy(run: Path, dest: Path, field: str, payload: dict) -> Path:
    """The run's checkpoints with one metadata field replaced by `payload` (and no `trainable`, so that the
    tool would have to build the model to know what trains)."""
    dest.mkdir(parents=True)
    for src in sorted(run.glob("ckpt-*.safetensors"))[:4]:
        meta = dict(read_checkpoint(src).meta)
        meta[field] = json.dumps(payload)
        meta.pop("trainable", None)
        save_tensors(dest / src.name, load_tensors(src), meta)
    return dest


def _one_line_refusal(result, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.fixture
def hostile(mlp_run: Path, tmp_path: Path):
    marker = tmp_path / "MARKER"
    yield marker, tmp_path
    assert not marker.exists(), "a file made the tool run code"


@pytest.mark.parametrize("field,flag", [("arch", "--model"), ("data", "--data"), ("task", "--task")])
def test_no_metadata_field_runs_code_through_any_command(field, flag, mlp_run, hostile, twa):
    marker, root = hostile
    folder = _hostile_copy(mlp_run, root / "ckpts", field, _marker_payload(marker))
    first = folder / "ckpt-00000000.safetensors"
    commands = [
        ("eval", first),
        ("eval", first, "--split", "both"),
        ("swa", folder, "-o", root / "avg.safetensors"),
        ("swa", folder, "-o", root / "avg.safetensors", "--no-bn-update"),
        ("orthogonalize", folder, "-o", root / "basis.safetensors"),
        ("train-subspace", folder, "-o", root / "twa", "--epochs", "1"),
    ]
    for command in commands:
        _one_line_refusal(twa(*command, check=False), str(folder), "os:system", flag)
    assert not any(p.exists() for p in (root / "avg.safetensors", root / "basis.safetensors", root / "twa"))


def test_a_basis_built_from_a_hostile_checkpoint_runs_no_code(mlp_run, hostile, twa):
    marker, root = hostile
    folder = _hostile_copy(mlp_run, root / "ckpts", "arch", _marker_payload(marker))
    ckpts = list_folder(folder)
    names = list_folder(mlp_run)[0].trainable
    basis = save_basis(orthogonalize(ckpts, names=names, hashes=False), root / "basis.safetensors")
    assert json.loads(read_checkpoint(basis).meta["arch"])["name"] == "os:system"  # recorded, never run
    _one_line_refusal(twa("train-subspace", basis, "-o", root / "twa", check=False), str(basis), "--model os:system")
    _one_line_refusal(twa("plot", basis, "-o", root / "plots", "--surface", check=False), "--model os:system")


def test_an_index_whose_metadata_names_code_runs_none(mlp_run, hostile, twa):
    marker, root = hostile
    folder = root / "hf" / "checkpoint-1"
    folder.mkdir(parents=True)
    tensors = load_tensors(sorted(mlp_run.glob("ckpt-*.safetensors"))[-1])
    save_tensors(folder / "model-00001-of-00001.safetensors", tensors, {"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": 1, "arch": _marker_payload(marker)},
        "weight_map": {k: "model-00001-of-00001.safetensors" for k in tensors}}))
    _one_line_refusal(twa("eval", folder / "model.safetensors.index.json", check=False), "--model os:system")
    _one_line_refusal(twa("swa", root / "hf", "-o", root / "avg.safetensors", check=False), "--model os:system")


def test_config_from_a_result_never_runs_the_code_it_records(mlp_run, hostile, twa):
    _, root = hostile
    result = root / "result.safetensors"
    meta = dict(read_checkpoint(sorted(mlp_run.glob("ckpt-*.safetensors"))[-1]).meta)
    meta["invocation"] = json.dumps({"command": "sample", "options": {"data": "os:system", "model": "mlp",
                                                                       "epochs": 1}})
    save_tensors(result, {"w": torch.zeros(1)}, meta)
    refused = twa("sample", root / "again", "--config-from", result, check=False)
    _one_line_refusal(refused, str(result), "--data os:system")
    assert not (root / "again").exists()
    # Named on the command line by the user, the recorded value no longer matters (here: digits).
    twa("sample", root / "again", "--config-from", result, "--data", "digits", "--epochs", "1")


def test_metadata_never_switches_on_a_download_or_creates_a_folder(mlp_run, tmp_path, twa):
    elsewhere = tmp_path / "nonexistent" / "data"
    folder = _hostile_copy(mlp_run, tmp_path / "ckpts", "data", {"name": "mnist", "dir": str(elsewhere),
                                                                  "download": True})
    result = twa("eval", folder / "ckpt-00000000.safetensors", check=False)
    _one_line_refusal(result, str(elsewhere), "--download")
    assert not (tmp_path / "nonexistent").exists()


# ---------------------------------------------------------------------------------------------- outputs


def test_an_output_is_never_an_input_nor_inside_one_nor_holding_one(mlp_run, tmp_path, twa):
    run = tmp_path / "run"
    shutil.copytree(mlp_run, run)
    (tmp_path / "link").symlink_to(run, target_is_directory=True)
    before = snapshot(tmp_path)
    init = sorted(run.glob("ckpt-*.safetensors"))[3]
    cases = [
        (("swa", run, "-o", run, "--force"), "is an input"),
        (("swa", run, "-o", tmp_path / "link", "--force"), "is an input"),
        (("swa", run, "-o", run / "avg.safetensors", "--force"), "inside the input folder"),
        (("swa", run, "-o", tmp_path, "--force"), "holds the input"),
        (("train-subspace", run, "-o", run, "--force"), "is an input"),
        (("train-subspace", run, "-o", tmp_path / "link" / "t", "--force"), "inside the input folder"),
        (("sample", run, "--force", "--init", init, "--model", "mlp"), "holds the input"),
        (("orthogonalize", run, "-o", run / "b.safetensors", "--force"), "inside the input folder"),
        (("plot", run, "-o", run / "plots", "--force"), "inside the input folder"),
    ]
    for args, fragment in cases:
        _one_line_refusal(twa(*args, check=False), fragment)
    assert snapshot(tmp_path) == before


def test_an_output_is_never_written_inside_the_data_it_reads(tmp_path, twa):
    """The data is an input too: a run folder written into an image folder's train/ became a class of its own
    for every later command (the flags' --data-dir, or the one the checkpoints record)."""
    from PIL import Image

    imgs = tmp_path / "imgs"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (imgs / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (60 * i, 0, 200 if cls == "b" else 0)).save(imgs / split / cls / f"{i}.png")
    data = ["--data", "imagefolder", "--data-dir", imgs]
    run = tmp_path / "run"
    twa("sample", run, "--model", "mlp", *data, "--epochs", "1", "--batch-size", "8", "--per-epoch", "1", "--quiet")
    before = snapshot(tmp_path)
    cases = [
        ("sample", imgs / "train" / "zz", "--model", "mlp", *data, "--epochs", "1", "--batch-size", "8"),
        ("swa", run, "-o", imgs / "test" / "avg.safetensors"),  # the data recorded in the checkpoints
        ("swa", run, "-o", imgs / "test" / "avg", "--data", "imagefolder", "--data-dir", imgs),
        ("train-subspace", run, "-o", imgs / "test" / "t", "--epochs", "1", "--no-lr-check", "--select", "none",
         "--init", "center"),
        ("orthogonalize", run, "-o", imgs / "test" / "basis.safetensors"),  # the recorded data
        ("plot", run, "-o", imgs / "test" / "pictures", "--surface", "--resolution", "2"),
        ("watch", run, "-o", imgs / "train" / "w", "--polls", "2", "--settle", "0", "--interval", "0.01"),
        ("watch", tmp_path / "empty-run", "-o", imgs / "test" / "w", *data, "--polls", "1"),  # the flags' data
    ]
    (tmp_path / "empty-run").mkdir()
    before = snapshot(tmp_path)
    for args in cases:
        _one_line_refusal(twa(*args, check=False), "inside the input folder", str(imgs))
    assert snapshot(tmp_path) == before
    assert not [p for p in imgs.rglob("*") if p.name.endswith(".lock")]  # no lock file was left in the data


def _sharded_average(twa, run: Path, out: Path, *extra: str) -> None:
    twa("swa", run, "-o", out, "--max-shard-size", "30KB", *extra)


def _shard_set(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.parent.iterdir()) if p.name.startswith(out.name[:-12])}


@pytest.mark.parametrize("force", [True, False])
def test_a_failed_sharded_write_leaves_the_old_result_whole_and_nothing_new(mlp_run, tmp_path, twa, monkeypatch,
                                                                           force):
    from twa_cli.io import writers

    out = tmp_path / "res" / "avg.safetensors"
    if force:
        _sharded_average(twa, mlp_run, out, "--start", "2")
    before = snapshot(tmp_path)
    real = writers.save_tensors
    calls = []

    def disk_full_on_the_third_shard(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(writers, "save_tensors", disk_full_on_the_third_shard)
    result = twa("swa", mlp_run, "-o", out, "--max-shard-size", "30KB", *(["--force"] if force else []), check=False)
    _one_line_refusal(result, "No space left on device", str(out.parent))
    assert ".tmp" not in result.stderr  # the output it was writing, not a hidden temporary's name
    assert snapshot(tmp_path) == before  # the old set, index and shards, exactly; no new shard anywhere
    if force:
        assert load_tensors(out.with_name(out.name + ".index.json"))  # still reads whole


def test_a_sharded_result_replaced_with_force_is_the_new_one_only(mlp_run, tmp_path, twa):
    out = tmp_path / "avg.safetensors"
    _sharded_average(twa, mlp_run, out, "--start", "2")
    old = set(_shard_set(out))
    _sharded_average(twa, mlp_run, out, "--end", "3", "--force")
    index = out.with_name(out.name + ".index.json")
    named = set(json.loads(index.read_text())["weight_map"].values())
    assert set(_shard_set(out)) == named | {index.name}  # no shard of the old set is left
    assert named != old - {index.name}
    expected = torch.stack([load_tensors(c.path)["net.1.weight"] for c in list_folder(mlp_run)[:3]]).double().mean(0)
    assert torch.allclose(load_tensors(index)["net.1.weight"].double(), expected, atol=1e-6)


def test_a_folder_result_replaced_with_force_fails_whole(mlp_run, tmp_path, twa, monkeypatch):
    from twa_cli.io import writers

    out = tmp_path / "hf"
    twa("swa", mlp_run, "-o", out, "--max-shard-size", "30KB", "--start", "2")
    before = snapshot(tmp_path)
    real = writers.save_tensors
    calls = []

    def disk_full_on_the_second_shard(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(writers, "save_tensors", disk_full_on_the_second_shard)
    result = twa("swa", mlp_run, "-o", out, "--max-shard-size", "30KB", "--force", check=False)
    _one_line_refusal(result, "No space left on device", f"{out}/model-")
    assert ".tmp" not in result.stderr  # the output it was writing, not a hidden temporary's name
    assert snapshot(tmp_path) == before  # the old folder whole, and no staging folder left beside it


@pytest.mark.parametrize("extra", [["ckpt-00000001.safetensors", "notes.txt"], ["my-best.safetensors"],
                                   ["results.json"]])
def test_force_never_replaces_a_folder_of_other_files(mlp_run, tmp_path, twa, extra):
    # Only a model folder (model.safetensors or its shards and index, with configuration and tokenizer files)
    # is a result --force may replace; a folder of checkpoints and notes is somebody's work.
    keep = tmp_path / "keep"
    if extra == ["results.json"]:
        twa("swa", mlp_run, "-o", keep)  # a folder result the tool wrote, plus a file of the user's
    keep.mkdir(exist_ok=True)
    for name in extra:
        (keep / name).write_bytes(b"mine")
    before = snapshot(tmp_path)
    result = twa("swa", mlp_run, "-o", keep, "--force", check=False)
    _one_line_refusal(result, str(keep), "not part of a model folder")
    assert snapshot(tmp_path) == before


def test_force_replaces_a_folder_result_with_its_model_files(mlp_run, tmp_path, twa):
    out = tmp_path / "hf"
    twa("swa", mlp_run, "-o", out, "--end", "2")
    (out / "config.json").write_text("{}")  # as save_pretrained leaves beside the weights
    twa("swa", mlp_run, "-o", out, "--force")
    expected = torch.stack([load_tensors(c.path)["net.1.weight"] for c in list_folder(mlp_run)]).double().mean(0)
    assert torch.allclose(load_tensors(out / "model.safetensors")["net.1.weight"].double(), expected, atol=1e-6)


@pytest.mark.parametrize("command", [["sample", ".", "--model", "mlp", "--data", "digits", "--epochs", "1"],
                                     ["train-subspace", "{run}", "-o", ".", "--epochs", "1"]])
def test_the_working_folder_as_output(mlp_run, tmp_path, twa, monkeypatch, command):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = [a.format(run=mlp_run) for a in command]
    twa(*args)  # an empty working folder takes the run
    assert (work / "metrics.jsonl").exists()
    before = snapshot(tmp_path)
    result = twa(*args, "--force", check=False)  # replacing it whole would pull the folder from under the shell
    _one_line_refusal(result, "working folder")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("sources", ["[]", "[1, 2]"])
def test_a_basis_whose_sources_do_not_match_its_coords_is_refused_before_training(mlp_run, tmp_path, twa, sources):
    basis = tmp_path / "basis.safetensors"
    twa("orthogonalize", mlp_run, "-o", basis)
    with safe_open(basis, "pt") as handle:
        meta, tensors = dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, damaged, {**meta, "sources": sources})
    before = snapshot(tmp_path)
    result = twa("train-subspace", damaged, "-o", tmp_path / "out", "--epochs", "1", check=False)
    _one_line_refusal(result, str(damaged))
    assert snapshot(tmp_path) == before


_WRITE = ["swa", "{run}", "-o", "{out}", "--max-shard-size", "20KB"]


def test_a_shard_name_taken_meanwhile_names_the_output(mlp_run, tmp_path, twa, monkeypatch):
    # Two writers of one new sharded output: the one that finds a shard name taken when it places its shards
    # says the output exists, not a hidden temporary's name (a race the test below meets only sometimes).
    from twa_cli.io import writers

    real = os.link

    def taken_meanwhile(src, dst, *args, **kwargs):
        Path(dst).write_bytes(b"the other writer's shard")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(writers.os, "link", taken_meanwhile)
    out = tmp_path / "avg.safetensors"
    result = twa(*[a.format(run=mlp_run, out=out) for a in _WRITE], check=False)
    _one_line_refusal(result, str(out), "already exists")
    assert ".tmp" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg-00001-of-00005.safetensors"]  # the other's only


def test_two_writers_of_one_new_output_never_both_succeed(mlp_run, tmp_path):
    out = tmp_path / "avg.safetensors"
    args = [a.format(run=mlp_run, out=out) for a in _WRITE]
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "twa_cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    assert "already exists" in next(err for code, err in results if code == 1)
    index = out.with_name(out.name + ".index.json")
    assert set(json.loads(index.read_text())["weight_map"].values()) | {index.name} == set(_shard_set(out))


def test_an_output_appearing_after_the_check_is_not_replaced(mlp_run, tmp_path, twa, monkeypatch):
    """The race two writers run, made deterministic: the output appears between the check and the write."""
    from twa_cli.io import writers

    out = tmp_path / "avg.safetensors"
    real = writers.write_weights

    def someone_else_first(folder, stem, *args, **kwargs):
        (folder / f"{stem}.safetensors").write_bytes(b"the other writer's result")
        return real(folder, stem, *args, **kwargs)

    monkeypatch.setattr(writers, "write_weights", someone_else_first)
    _one_line_refusal(twa("swa", mlp_run, "-o", out, check=False), str(out), "already exists")
    assert out.read_bytes() == b"the other writer's result"


# ---------------------------------------------------------------------------------------------- resuming


def _interrupted_subspace_run(basis: Path, out: Path, twa, monkeypatch) -> None:
    """A train-subspace run that stops after its first epoch, leaving its state."""
    from twa_cli.commands import train_subspace as ts

    real = ts.save_train_state

    def stop_after_saving(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ts, "save_train_state", stop_after_saving)
    result = twa("train-subspace", basis, "-o", out, "--epochs", "3", "--device", "cpu", check=False)
    monkeypatch.setattr(ts, "save_train_state", real)
    assert result.returncode == 130 and (out / "train-state.safetensors").exists(), result.stderr


def _basis(run: Path, path: Path, end: int | None = None) -> Path:
    ckpts = list_folder(run)[:end]
    return save_basis(orthogonalize(ckpts, names=ckpts[0].trainable), path)


def test_resume_with_another_basis_or_folder_is_refused(mlp_run, tmp_path, twa, monkeypatch):
    basis = _basis(mlp_run, tmp_path / "basis.safetensors")
    other = _basis(mlp_run, tmp_path / "other.safetensors", end=5)
    out = tmp_path / "twa"
    _interrupted_subspace_run(basis, out, twa, monkeypatch)
    before = snapshot(tmp_path)
    _one_line_refusal(twa("train-subspace", other, "-o", out, "--epochs", "3", "--device", "cpu", "--resume",
                          check=False), "--resume", "differ")
    assert snapshot(tmp_path) == before

    folder_out = tmp_path / "twa-folder"
    _interrupted_subspace_run(mlp_run, folder_out, twa, monkeypatch)
    changed = tmp_path / "changed"
    shutil.copytree(mlp_run, changed)
    victim = sorted(changed.glob("ckpt-*.safetensors"))[3]
    tensors = load_tensors(victim)
    tensors["net.1.bias"] += 0.5
    save_tensors(victim, tensors, read_checkpoint(victim).meta)
    _one_line_refusal(twa("train-subspace", changed, "-o", folder_out, "--epochs", "3", "--device", "cpu",
                          "--resume", check=False), "--resume", "differ")


def test_resume_with_a_basis_whose_vectors_changed_is_refused(mlp_run, tmp_path, twa, monkeypatch):
    """Same checkpoints, same coordinates, other vectors (a basis file edited or rebuilt): not the same run."""
    basis = _basis(mlp_run, tmp_path / "basis.safetensors")
    out = tmp_path / "twa"
    _interrupted_subspace_run(basis, out, twa, monkeypatch)
    tensors = load_tensors(basis)
    tensors["basis"][0, 7] = torch.nextafter(tensors["basis"][0, 7], torch.tensor(1.0))  # one bit of one entry
    save_tensors(basis, tensors, read_checkpoint(basis).meta)
    before = snapshot(tmp_path)
    result = twa("train-subspace", basis, "-o", out, "--epochs", "3", "--device", "cpu", "--resume", check=False)
    _one_line_refusal(result, "--resume")
    assert snapshot(tmp_path) == before


def test_resume_with_a_new_lr_trains_at_that_lr(mlp_run, tmp_path, twa, monkeypatch):
    basis = _basis(mlp_run, tmp_path / "basis.safetensors")
    out = tmp_path / "twa"
    _interrupted_subspace_run(basis, out, twa, monkeypatch)
    result = twa("train-subspace", basis, "-o", out, "--epochs", "3", "--device", "cpu", "--resume", "--lr", "0.001")
    assert "--lr 0.001" in result.stderr
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["lr"] for e in epochs[1:]] == pytest.approx([1e-3, 1e-4])  # the step schedule from the new lr
    assert epochs[0]["lr"] != 0.001


# ---------------------------------------------------------------------------------------------- divergence


def test_divergence_keeps_only_finite_state_and_resume_with_a_smaller_lr_recovers(tmp_path, twa):
    out = tmp_path / "run"
    common = ["--model", "small-cnn", "--batch-size", "64", "--per-epoch", "2", "--device", "cpu"]
    twa("sample", out, *common, "--epochs", "1", "--lr", "0.05")
    result = twa("sample", out, *common, "--epochs", "3", "--lr", "10000", "--resume", check=False)
    assert result.returncode == 1 and "diverged" in result.stderr and "--resume" in result.stderr
    for path in out.glob("*.safetensors"):  # checkpoints and the resume state: weights and BatchNorm statistics
        for name, tensor in _raw_tensors(path).items():
            assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), (path.name, name)
    twa("sample", out, *common, "--epochs", "2", "--lr", "0.05", "--resume")


def _raw_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------------------------------------- the basis


def test_a_basis_that_is_not_orthonormal_is_never_written(mlp_run, tmp_path, twa):
    from twa_cli.errors import TwaError

    same = tmp_path / "same"
    same.mkdir()
    last = sorted(mlp_run.glob("ckpt-*.safetensors"))[-1]
    meta = dict(read_checkpoint(last).meta)
    paths = [save_tensors(same / f"c{i}.safetensors", load_tensors(last), {**meta, "step": str(i)}) for i in range(3)]
    # Given the copies themselves with --tol 0, the orthogonalizer would divide rounding noise by its own size:
    # it refuses to return such a basis.
    copies = [read_checkpoint(p) for p in paths]
    with pytest.raises(TwaError, match="orthonormal"):
        orthogonalize(copies, names=copies[0].trainable, tol=0.0)
    # A folder counts identical copies once, so the command builds the one direction they span.
    out = tmp_path / "basis.safetensors"
    result = twa("orthogonalize", same, "-o", out, "--tol", "0")
    assert "counted once" in result.stderr and json.loads(read_checkpoint(out).meta["rank"]) == 1


# ---------------------------------------------------------------------------------------------- precisions


def test_mixed_precisions_are_said_and_averaged_in_the_widest(mlp_run, tmp_path, twa):
    folder = tmp_path / "mixed"
    folder.mkdir()
    sources = sorted(mlp_run.glob("ckpt-*.safetensors"))[:4]
    for i, src in enumerate(sources):
        tensors = load_tensors(src)
        if i == 3:
            tensors = {k: v.half() for k, v in tensors.items()}
        save_tensors(folder / f"c{i}.safetensors", tensors, {"step": str(i)})
    listed = twa("inspect", folder)
    assert "mixed precisions" in listed.stderr and "float16/float32" in listed.stderr
    result = twa("swa", folder, "-o", tmp_path / "avg.safetensors")
    assert "different precisions" in result.stderr
    average = load_tensors(tmp_path / "avg.safetensors")
    assert all(t.dtype == torch.float32 for t in average.values())


def test_force_over_a_finished_run_replaces_it_whole(mlp_run, tmp_path, twa):
    out = tmp_path / "twa"
    twa("train-subspace", mlp_run, "-o", out, "--epochs", "1", "--device", "cpu", "--end", "5")
    twa("train-subspace", mlp_run, "-o", out, "--epochs", "1", "--device", "cpu", "--force")
    report = json.loads((out / "coefficients.json").read_text())
    assert len(report["coefficients"]) == len(list_folder(mlp_run))  # the new run's, not the old 5
    assert len(json.loads(read_checkpoint(out / "basis.safetensors").meta["sources"])) == len(report["coefficients"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".twa.lock", "twa"]  # nothing beside it but its lock


def test_force_refuses_a_run_folder_holding_files_it_did_not_write(mlp_run, tmp_path, twa):
    out = tmp_path / "twa"
    twa("train-subspace", mlp_run, "-o", out, "--epochs", "1", "--device", "cpu", "--end", "5")
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = twa("train-subspace", mlp_run, "-o", out, "--epochs", "1", "--device", "cpu", "--force", check=False)
    _one_line_refusal(result, str(out), "notes.txt", "did not write")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_failed_force_run_leaves_the_old_result_as_it_was(mlp_run, tmp_path, twa):
    out = tmp_path / "twa"
    twa("train-subspace", mlp_run, "-o", out, "--epochs", "1", "--device", "cpu", "--end", "5")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = twa("train-subspace", mlp_run, "-o", out, "--epochs", "2", "--lr", "1e9", "--no-lr-check",
                 "--select", "none",  # the fit's end: a default run keeps its best point instead
                 "--device", "cpu", "--force", check=False)
    assert result.returncode == 1 and "diverged" in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # nothing resumable: the partial run is gone (the empty file of the run's lock stays)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".twa.lock", "twa"]


def test_a_force_run_that_fails_later_resumes_beside_the_old_result(tmp_path, twa, monkeypatch):
    out = tmp_path / "run"
    common = ["--model", "mlp", "--batch-size", "64", "--device", "cpu"]
    twa("sample", out, *common, "--epochs", "1")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    from twa_cli.commands import sample as sampling

    calls = []

    def fail_in_the_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return save_train_state(*args, **kwargs)

    save_train_state = sampling.save_train_state
    monkeypatch.setattr(sampling, "save_train_state", fail_in_the_second_epoch)
    result = twa("sample", out, *common, "--epochs", "2", "--lr", "0.05", "--force", check=False)
    monkeypatch.undo()
    assert result.returncode == 1, result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old result, untouched
    partial = tmp_path / "run.partial"
    assert (partial / "train-state.safetensors").exists()
    twa("sample", out, *common, "--epochs", "2", "--lr", "0.05", "--resume")
    assert not partial.exists() and len(list(out.glob("ckpt-*.safetensors"))) == 3  # the new run, swapped in
    assert json.loads(read_checkpoint(out / "train-state.safetensors").meta["state"])["epochs_done"] == 2


def test_two_runs_cannot_claim_the_same_folder(tmp_path):
    from twa_cli.commands.runfolder import RunFolder

    new = tmp_path / "new"
    first, second = RunFolder(new, resume=False, force=False), RunFolder(new, resume=False, force=False)
    first.claim()
    with pytest.raises(TwaError, match="created by another process"):
        second.claim()
    empty = tmp_path / "empty"
    empty.mkdir()
    first, second = RunFolder(empty, resume=False, force=False), RunFolder(empty, resume=False, force=False)
    first.claim()
    with pytest.raises(TwaError, match="another twa process is writing"):
        second.claim()
    first.abandon()
    second.claim()  # free again once the first is done



# Three commands replacing a folder result with --force: (first run, second run), the output written to `{out}`.
_FOLDER_WRITERS = {
    "sample": (["sample", "{out}", "--model", "mlp", "--batch-size", "64", "--device", "cpu", "--epochs", "1"],
               ["sample", "{out}", "--model", "mlp", "--batch-size", "64", "--device", "cpu", "--epochs", "2",
                "--force"]),
    "train-subspace": (["train-subspace", "{run}", "-o", "{out}", "--epochs", "1", "--device", "cpu"],
                       ["train-subspace", "{run}", "-o", "{out}", "--epochs", "2", "--device", "cpu", "--force"]),
    "swa": (["swa", "{run}", "-o", "{out}", "--no-bn-update", "--end", "3"],
            ["swa", "{run}", "-o", "{out}", "--no-bn-update", "--force"]),
}


@pytest.mark.parametrize("command", sorted(_FOLDER_WRITERS))
def test_force_onto_a_symlinked_output_folder_replaces_through_the_link(mlp_run, tmp_path, twa, command):
    """F1: the new result goes where the link points, and the user's link stays, under its own name."""
    first, second = _FOLDER_WRITERS[command]
    target, link = tmp_path / "target", tmp_path / "link"
    twa(*[a.format(run=mlp_run, out=target) for a in first])
    before = snapshot(target)
    link.symlink_to(target, target_is_directory=True)
    twa(*[a.format(run=mlp_run, out=link) for a in second])
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.is_dir() and not target.is_symlink()
    assert snapshot(target) != before  # the new result, in the folder the link names
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != ".target.lock")  # a run folder's lock
    assert left == ["link", "target"]  # no link (nor anything) left under another name


@pytest.mark.parametrize("command", sorted(_FOLDER_WRITERS))
def test_a_dangling_link_as_output_folder_is_refused_before_any_work(mlp_run, tmp_path, twa, command):
    _, second = _FOLDER_WRITERS[command]
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone", target_is_directory=True)
    _one_line_refusal(twa(*[a.format(run=mlp_run, out=link) for a in second], check=False), str(link),
                      "does not exist")
    assert [p.name for p in tmp_path.iterdir()] == ["link"] and os.readlink(link) == str(tmp_path / "gone")


# Commands writing one file with --force: (first run, second run), the output written to `{out}`.
_FILE_WRITERS = {
    "swa": (["swa", "{run}", "-o", "{out}", "--no-bn-update", "--end", "3"],
            ["swa", "{run}", "-o", "{out}", "--no-bn-update", "--force"]),
    "orthogonalize": (["orthogonalize", "{run}", "-o", "{out}", "--end", "3"],
                      ["orthogonalize", "{run}", "-o", "{out}", "--force"]),
}


@pytest.mark.parametrize("command", sorted(_FILE_WRITERS))
def test_force_onto_a_symlinked_output_file_replaces_through_the_link(mlp_run, tmp_path, twa, command):
    """As for a folder (F1): the new result replaces the file the link names, whole, and the link stays (it
    was replaced by a regular file, leaving the file it named as it was)."""
    first, second = _FILE_WRITERS[command]
    (tmp_path / "store").mkdir()
    target, link = tmp_path / "store" / "real.safetensors", tmp_path / "link.safetensors"
    twa(*[a.format(run=mlp_run, out=target) for a in first])
    before = target.read_bytes()
    link.symlink_to(target)
    twa(*[a.format(run=mlp_run, out=link) for a in second])
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.is_file() and not target.is_symlink() and target.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.safetensors", "store"]
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["real.safetensors"]  # no temporary left


@pytest.mark.parametrize("command", sorted(_FILE_WRITERS))
def test_a_dangling_link_as_output_file_is_refused_before_any_work(mlp_run, tmp_path, twa, command):
    _, second = _FILE_WRITERS[command]
    link = tmp_path / "link.safetensors"
    link.symlink_to(tmp_path / "gone.safetensors")
    _one_line_refusal(twa(*[a.format(run=mlp_run, out=link) for a in second], check=False), str(link),
                      "does not exist")
    assert [p.name for p in tmp_path.iterdir()] == ["link.safetensors"]


def test_a_link_inside_a_run_folder_is_never_written_through(tmp_path, twa):
    """Only a result the user names is written through a link: a run folder's own file that is a link (a folder
    from elsewhere, `metrics.jsonl -> ~/notes`) is replaced on --resume, and what it named stays as it was."""
    run, outside = tmp_path / "run", tmp_path / "notes.txt"
    common = ["--model", "mlp", "--batch-size", "64", "--device", "cpu", "--per-epoch", "1", "--quiet"]
    twa("sample", run, *common, "--epochs", "1")
    outside.write_text("mine\n")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside)
    twa("sample", run, *common, "--epochs", "2", "--resume")
    assert outside.read_text() == "mine\n"
    assert not (run / "metrics.jsonl").is_symlink() and len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_sharded_result_through_a_link_to_a_file_is_refused_before_any_work(mlp_run, tmp_path, twa):
    """Shards and an index beside the file a link names would leave the link naming a removed file."""
    target, link = tmp_path / "real.safetensors", tmp_path / "link.safetensors"
    twa("swa", mlp_run, "-o", target, "--no-bn-update")
    before = target.read_bytes()
    link.symlink_to(target)
    _one_line_refusal(twa("swa", mlp_run, "-o", link, "--force", "--max-shard-size", "1KB", check=False),
                      str(link), "--max-shard-size")
    assert target.read_bytes() == before and os.readlink(link) == str(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.safetensors", "real.safetensors"]


def test_force_cannot_take_a_run_folder_another_run_is_writing(mlp_run, tmp_path, twa):
    """F2: the lock covers the result's name, not only the folder a run writes in (OUT or OUT.partial)."""
    out = tmp_path / "tsc"
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "first.log"
    with log.open("w") as sink:
        first = subprocess.Popen([sys.executable, "-m", "twa_cli", "train-subspace", str(mlp_run), "-o", str(out),
                                  "--epochs", "100000", "--lr", "0.05", "--device", "cpu", "--no-lr-check",
                                  "--no-eval-every-epoch"],
                                 stdout=subprocess.DEVNULL, stderr=sink, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # until the first run has written its first epoch
        assert first.poll() is None and (out / "metrics.jsonl").exists(), log.read_text()
        result = twa("train-subspace", mlp_run, "-o", out, "--epochs", "1", "--device", "cpu", "--no-lr-check",
                     "--force", check=False)
        _one_line_refusal(result, str(out), "another twa process is writing")
        assert not (tmp_path / "tsc.partial").exists()
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait(timeout=60)


def test_the_run_folder_lock_covers_force_and_resume(tmp_path):
    from twa_cli.commands.runfolder import RunFolder

    out = tmp_path / "run"
    first = RunFolder(out, resume=False, force=False)
    first.claim()
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "train-state.safetensors").write_bytes(b"state")
    for kwargs in ({"force": True, "resume": False}, {"force": False, "resume": True}):
        with pytest.raises(TwaError, match="another twa process is writing"):
            RunFolder(out, ours=lambda path: True, **kwargs).claim()
    assert not (tmp_path / "run.partial").exists()
    first.abandon()
    again = RunFolder(out, resume=False, force=True, ours=lambda path: True)
    again.claim()  # free again once the first is done
    assert again.work == tmp_path / "run.partial"
    again.abandon()


@pytest.mark.parametrize("flags", [["--resume", "--seed", "5"], ["--resume", "--lr", "0.3"], ["--resume"], []],
                         ids=["resume-new-seed", "resume-new-lr", "resume", "plain"])
def test_a_run_another_process_is_writing_is_said_before_anything_about_its_options(tmp_path, twa, flags):
    """While another process holds the run's lock, that is what is said first: not a changed option (--seed), not
    'nothing to resume' (its first epoch is not saved yet), not 'already exists'."""
    import multiprocessing

    out = tmp_path / "run"
    common = ["--model", "mlp", "--batch-size", "64", "--device", "cpu", "--per-epoch", "1", "--quiet"]
    twa("sample", out, *common, "--epochs", "1")
    if flags == ["--resume"]:
        (out / "train-state.safetensors").unlink()  # the holder has not saved its first epoch yet
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.get_context("fork").Process(target=_hold_lock, args=(tmp_path / ".run.lock", ready,
                                                                                   release))
    holder.start()
    try:
        assert ready.wait(60)
        result = twa("sample", out, *common, "--epochs", "2", *flags, check=False)
        _one_line_refusal(result, str(out), "another twa process is writing")
    finally:
        release.set()
        holder.join(60)


def _hold_lock(path, ready, release) -> None:
    from filelock import FileLock

    with FileLock(path, timeout=0):
        ready.set()
        release.wait(60)


def test_force_never_removes_the_partial_folder_of_a_running_force_run(tmp_path):
    """A --force run builds OUT.partial; a second --force run must not clear it as left over."""
    from twa_cli.commands.runfolder import RunFolder

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    first = RunFolder(out, resume=False, force=True, ours=lambda path: True)
    first.claim()
    (first.work / "basis.safetensors").write_bytes(b"being written")
    with pytest.raises(TwaError, match="another twa process is writing"):
        RunFolder(out, resume=False, force=True, ours=lambda path: True).claim()
    assert (tmp_path / "run.partial" / "basis.safetensors").read_bytes() == b"being written"
    first.abandon()


# ---------------------------------------------------------------------------------------------- found by attack


def test_recorded_model_arguments_cannot_switch_on_a_download(mlp_run, tmp_path, twa):
    """A file's arch may name a torchvision model, never the arguments that make torchvision fetch weights."""
    folder = tmp_path / "ckpts"
    _hostile_copy(mlp_run, folder, "arch", {"name": "torchvision:lraspp_mobilenet_v3_large",
                                            "kwargs": {"num_classes": 10, "weights_backbone": "DEFAULT"}})
    home = tmp_path / "torch-home"
    os.environ["TORCH_HOME"] = str(home)
    try:
        result = twa("eval", folder / "ckpt-00000000.safetensors", check=False)
    finally:
        del os.environ["TORCH_HOME"]
    _one_line_refusal(result, str(folder / "ckpt-00000000.safetensors"), "weights_backbone")
    assert not home.exists()


def test_config_from_never_chooses_the_output_nor_a_download(mlp_run, tmp_path, twa):
    result = tmp_path / "result.safetensors"
    meta = dict(read_checkpoint(sorted(mlp_run.glob("ckpt-*.safetensors"))[-1]).meta)
    meta["invocation"] = json.dumps({"command": "sample", "options": {
        "download": True, "data": "mnist", "data_dir": str(tmp_path / "dl" / "x"), "model": "mlp", "epochs": 1,
        "out": str(tmp_path / "elsewhere" / "deep")}})
    save_tensors(result, {"w": torch.zeros(1)}, meta)
    refused = twa("sample", tmp_path / "mine", "--config-from", result, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert not (tmp_path / "dl").exists() and not (tmp_path / "elsewhere").exists()


def test_config_from_a_code_name_in_any_shape_is_refused(mlp_run, tmp_path, twa, monkeypatch):
    marker = tmp_path / "PWNED"
    (tmp_path / "['evilmod.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = tmp_path / "cf.safetensors"
    meta = dict(read_checkpoint(sorted(mlp_run.glob("ckpt-*.safetensors"))[-1]).meta)
    meta["invocation"] = json.dumps({"command": "sample", "options": {"model": ["evilmod:build"], "data": "digits",
                                                                       "epochs": 1}})
    save_tensors(result, {"w": torch.zeros(1)}, meta)
    refused = twa("sample", tmp_path / "o", "--config-from", result, check=False)
    _one_line_refusal(refused, str(result), "--model")
    assert not marker.exists()


def test_a_result_never_removes_an_input_named_like_a_shard(mlp_run, tmp_path, twa):
    folder = tmp_path / "g2"
    folder.mkdir()
    ckpts = sorted(mlp_run.glob("ckpt-*.safetensors"))
    shutil.copy(ckpts[-1], folder / "model-00001-of-00002.safetensors")
    shutil.copy(ckpts[-2], folder / "model-00002-of-00002.safetensors")
    twa("swa", folder / "model-00001-of-00002.safetensors", "-o", folder / "model.safetensors", "--no-bn-update")
    assert all((folder / f"model-0000{i}-of-00002.safetensors").exists() for i in (1, 2))


def test_train_subspace_never_writes_into_the_folder_its_basis_was_made_from(mlp_run, tmp_path, twa):
    run = tmp_path / "run"
    shutil.copytree(mlp_run, run)
    basis = tmp_path / "basis.safetensors"
    twa("orthogonalize", run, "-o", basis)
    before = snapshot(run)
    for extra in ([], ["--init", "last"], ["--affine"]):
        result = twa("train-subspace", basis, "-o", run, "--force", "--epochs", "1", *extra, check=False)
        _one_line_refusal(result, str(run))
    assert snapshot(run) == before


_KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
calls = {"n": 0}
target = int(sys.argv[1])

def dying(real):
    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == target:
            os.kill(os.getpid(), signal.SIGKILL)  # as kill -9: no cleanup runs
        return real(*args, **kwargs)
    return wrapped

os.link, os.replace, Path.unlink = dying(os.link), dying(os.replace), dying(Path.unlink)
from twa_cli.cli import main
main(sys.argv[2:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [("30KB", "30KB"), ("30KB", None), (None, "30KB")])
def test_a_write_killed_at_any_step_leaves_the_old_result_or_the_new_one(mlp_run, tmp_path, twa, before, after):
    """kill -9 after each file operation of a result's replacement: the folder always lists exactly one result,
    whole, the old one or the new one; the next write clears what the kill left."""
    out = tmp_path / "res" / "avg.safetensors"
    shard = lambda size: ["--max-shard-size", size] if size else []  # noqa: E731
    twa("swa", mlp_run, "-o", out, "--end", "3", "--no-bn-update", *shard(before))
    old = load_tensors(_results(out.parent)[0])
    new = None
    for step in range(1, 40):
        argv = ["swa", str(mlp_run), "-o", str(out), "--start", "3", "--no-bn-update", "--force", *shard(after)]
        done = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(step), *argv], capture_output=True, text=True)
        listed = _results(out.parent)
        assert len(listed) == 1, [p.name for p in listed]
        got = load_tensors(listed[0])
        if done.returncode == 0:  # the write finished before the step-th operation: every step was tried
            new = got
            break
        assert done.returncode == -signal.SIGKILL, done.stderr
        assert all(torch.equal(got[k], old[k]) for k in old) or (
            new is not None and all(torch.equal(got[k], new[k]) for k in new)) or _is_average_of(got, mlp_run, 3)
    assert new is not None and _is_average_of(new, mlp_run, 3)
    twa("swa", mlp_run, "-o", out, "--start", "3", "--no-bn-update", "--force", *shard(after))
    names = {p.name for p in out.parent.iterdir()}
    index = out.with_name(out.name + ".index.json")
    written = {out.name} if after is None else {index.name, *json.loads(index.read_text())["weight_map"].values()}
    assert names == written, names - written


def _results(folder: Path) -> list[Path]:
    """What a folder listing sees as checkpoints there (averages included)."""
    from twa_cli.io.readers import checkpoint_paths

    return checkpoint_paths(folder)


def _is_average_of(tensors: dict, run: Path, start: int) -> bool:
    ckpts = list_folder(run)[start:]
    first = next(k for k, v in tensors.items() if v.is_floating_point())
    mean = torch.stack([load_tensors(c)[first].double() for c in ckpts]).mean(0)
    return torch.allclose(tensors[first].double(), mean, atol=1e-6)


@pytest.mark.parametrize("fraction", [1.5, "half", -0.1])
def test_a_bad_recorded_val_split_names_the_file_not_the_flag(mlp_run, tmp_path, twa, fraction):
    folder = _hostile_copy(mlp_run, tmp_path / "ckpts", "data", {"name": "digits", "val_split": fraction})
    first = folder / "ckpt-00000000.safetensors"
    result = twa("train-subspace", folder, "-o", tmp_path / "out", "--epochs", "1", "--model", "mlp", check=False)
    _one_line_refusal(result, str(first), "val_split", repr(fraction))
    assert "--val-split must" not in result.stderr


def test_an_interrupted_force_run_through_a_link_says_where_to_resume(tmp_path, twa, monkeypatch):
    from twa_cli.commands import sample as sampling

    target, link = tmp_path / "target", tmp_path / "link"
    common = ["--model", "mlp", "--batch-size", "64", "--device", "cpu"]
    twa("sample", target, *common, "--epochs", "1")
    link.symlink_to(target, target_is_directory=True)
    real = sampling.save_train_state
    calls = []

    def ctrl_c_in_the_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "save_train_state", ctrl_c_in_the_second_epoch)
    result = twa("sample", link, *common, "--epochs", "3", "--force", check=False)
    monkeypatch.undo()
    assert result.returncode == 130 and f"{tmp_path / 'target.partial'}" in result.stderr, result.stderr
    twa("sample", link, *common, "--epochs", "3", "--resume")
    assert len(list_folder(target)) == 4 and os.readlink(link) == str(target)


def _indexed(folder: Path, stem: str, tensors: dict, shard: Path | None = None) -> Path:
    """`stem.safetensors.index.json` naming one shard `stem-00001-of-00001.safetensors` (written there, or a
    symlink there to `shard`)."""
    name = f"{stem}-00001-of-00001.safetensors"
    if shard is None:
        save_tensors(folder / name, tensors, {"format": "pt"})
    else:
        (folder / name).symlink_to(os.path.relpath(shard, folder))
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(tensors, name)}))
    return index


def test_a_shard_symlinked_out_of_its_index_folder_is_refused(mlp_run, tmp_path, twa):
    """Issue 21: an index may name only files of its own folder; a symlink there to a file elsewhere was
    followed and read (the check compared names, not resolved paths)."""
    tensors = load_tensors(sorted(mlp_run.glob("ckpt-*.safetensors"))[1])
    secret = save_tensors(tmp_path / "elsewhere" / "secret.safetensors", tensors, {"format": "pt"})
    folder = tmp_path / "run"
    folder.mkdir()
    _indexed(folder, "a", tensors)
    index = _indexed(folder, "b", tensors, shard=secret)
    shard = folder / "b-00001-of-00001.safetensors"
    for command in (["swa", folder, "-o", tmp_path / "avg.safetensors"], ["inspect", folder], ["eval", index]):
        _one_line_refusal(twa(*command, check=False), str(index), shard.name, "outside")
    assert not (tmp_path / "avg.safetensors").exists()

    # A basis index is held to the same rule.
    ckpts = list_folder(mlp_run)
    whole = save_basis(orthogonalize(ckpts, names=ckpts[0].trainable, hashes=False), tmp_path / "whole.safetensors")
    basis_folder = tmp_path / "basis"
    basis_folder.mkdir()
    basis_index = basis_folder / "basis.safetensors"
    meta = dict(read_checkpoint(whole).meta)
    basis = load_tensors(whole)
    meta["shards"] = json.dumps([{"file": "basis.00001-of-00001.safetensors",
                                  "columns": [0, basis["basis"].shape[1]]}])
    save_tensors(basis_index, {**basis, "basis": basis["basis"][:, :0].contiguous()}, meta)
    (basis_folder / "basis.00001-of-00001.safetensors").symlink_to(whole)
    result = twa("train-subspace", basis_index, "-o", tmp_path / "t", "--epochs", "1", "--device", "cpu",
                 check=False)
    _one_line_refusal(result, str(basis_index), "basis.00001-of-00001.safetensors", "outside")


def test_shards_symlinked_within_one_folder_are_read(mlp_run, tmp_path, twa):
    """The Hugging Face cache's layout: the index and its shards are symlinks into one blobs/ folder."""
    tensors = load_tensors(sorted(mlp_run.glob("ckpt-*.safetensors"))[1])
    blobs, snapshot_folder = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot_folder.mkdir(parents=True)
    _indexed(blobs, "model", tensors)
    for blob in blobs.iterdir():
        (snapshot_folder / blob.name).symlink_to(os.path.relpath(blob, snapshot_folder))
    listed = json.loads(twa("inspect", snapshot_folder, "--json").stdout)
    assert listed, listed


def test_checking_the_data_as_an_input_runs_no_recorded_task_hook(tmp_path, twa):
    """The data-as-input checks of orthogonalize and plot resolved the recorded task, and a run made with
    `--task mod:fn` (a hook the files may name but never run) was refused ("repeat it as --task")."""
    from twa_cli.io.checkpoints import make_metadata
    from twa_cli.io.safetensors import save_tensors

    run = tmp_path / "run"
    run.mkdir()
    for i in range(3):
        save_tensors(run / f"c{i}.safetensors", {"w": torch.randn(20)},
                     make_metadata("checkpoint", step=str(i), trainable=["w"], task={"name": "mytasks:make_task"}))
    twa("orthogonalize", run, "-o", tmp_path / "basis.safetensors")
    assert (tmp_path / "basis.safetensors").exists()
    twa("plot", run, "-o", tmp_path / "pictures")
    assert (tmp_path / "pictures" / "trajectory.png").exists()
