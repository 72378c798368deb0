"""Bad input never costs a result: through the real `twa` entry point, every case below exits 1 with one
line naming the problem, no traceback, and leaves every file and folder exactly as it was.

A case is one line of CASES: the command (placeholders are the inputs built by INPUTS) and the fragments its
error line must contain. A new kind of input is one more entry in INPUTS.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import snapshot

from twa_cli.core.basis import orthogonalize
from twa_cli.core.basis_files import save_basis
from twa_cli.io.checkpoints import list_folder, load_tensors, read_checkpoint
from twa_cli.io.safetensors import save_tensors
from twa_cli.tasks.models import MLP


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _first(folder: Path) -> Path:
    return sorted(folder.glob("ckpt-*.safetensors"))[1]


def _truncated(root: Path, run: Path) -> Path:
    folder = _copy_run(run, root / "truncated")
    victim = _first(folder)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return folder


def _corrupt_header(root: Path, run: Path) -> Path:
    folder = _copy_run(run, root / "corrupt")
    victim = _first(folder)
    data = bytearray(victim.read_bytes())
    data[8:40] = b"\x00\xff" * 16
    victim.write_bytes(bytes(data))
    return folder


def _with_nan(root: Path, run: Path) -> Path:
    folder = _copy_run(run, root / "nan")
    victim = _first(folder)
    tensors = load_tensors(victim)
    tensors["net.3.weight"][2, 5] = float("nan")
    save_tensors(victim, tensors, read_checkpoint(victim).meta)
    return folder


def _other_architecture(root: Path, run: Path) -> Path:
    """An MLP of another width, with metadata saying so."""
    path = root / "wide" / "wide.safetensors"
    meta = dict(read_checkpoint(_first(run)).meta)
    meta["arch"] = '{"kwargs": {"hidden": 64, "image_size": 8, "in_channels": 1, "num_classes": 10}, "name": "mlp"}'
    torch.manual_seed(0)
    return save_tensors(path, MLP(10, 64, hidden=64).state_dict(), meta)


def _mixed(root: Path, run: Path) -> Path:
    folder = root / "mixed"
    folder.mkdir()
    for i, src in enumerate(sorted(run.glob("ckpt-*.safetensors"))[:2]):
        shutil.copy(src, folder / f"a{i}.safetensors")
    shutil.copy(_other_architecture(root, run), folder / "b.safetensors")
    return folder


def _basis(root: Path, run: Path) -> Path:
    ckpts = list_folder(run)
    return save_basis(orthogonalize(ckpts, names=ckpts[0].trainable, hashes=False), root / "basis.safetensors")


def _existing(root: Path, run: Path) -> Path:
    path = root / "out" / "existing.safetensors"
    shutil.copy(_first(run), path)
    return path


def _pickled_objects(root: Path, run: Path) -> Path:
    """A .pt file whose loading needs an arbitrary Python object (a class the loader does not allow)."""
    from pathlib import PurePosixPath

    folder = root / "pickled"
    folder.mkdir()
    torch.save({"state_dict": load_tensors(_first(run)), "where": PurePosixPath("/data")}, folder / "ckpt.pt")
    return folder


def _text_pt(root: Path, run: Path) -> Path:
    folder = root / "textpt"
    folder.mkdir()
    (folder / "notes.pt").write_text("this is not a checkpoint\n" * 20)
    return folder


def _int_tensor(root: Path, run: Path) -> Path:
    """Three checkpoints where one stores a weight as int64."""
    folder = _copy_run(run, root / "intweight")
    victim = _first(folder)
    tensors = load_tensors(victim)
    tensors["net.3.weight"] = tensors["net.3.weight"].round().long()
    save_tensors(victim, tensors, read_checkpoint(victim).meta)
    return folder


def _binary_config(root: Path, run: Path) -> Path:
    path = root / "binary.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    return path


def _null_config(root: Path, run: Path) -> Path:
    path = root / "null.yaml"
    path.write_text("epochs: null\nmodel: mlp\n")
    return path


def _nan_metric(root: Path, run: Path) -> Path:
    folder = root / "nanmetric"
    folder.mkdir()
    for i in range(2):
        save_tensors(folder / f"c{i}.safetensors", {"w": torch.zeros(2)}, {"step": str(i), "val_loss": "nan"})
    return folder


def _text(name: str, text: str) -> Callable[[Path, Path], Path]:
    def build(root: Path, run: Path) -> Path:
        path = root / name
        path.write_text(text)
        return path

    return build


def _null_section(root: Path, run: Path) -> Path:
    path = root / "nullsection.yaml"
    path.write_text("model: mlp\nsample: ~\n")
    return path


def _image_folders(root: Path, run: Path) -> Path:
    """An image folder whose val/ has a class train/ lacks, and one with a truncated JPEG."""
    from PIL import Image

    layouts = (("imgs", {"train": ("a", "b"), "val": ("a", "c")}), ("badjpeg", {"train": ("a",), "val": ("a",)}))
    for name, classes in layouts:
        for split, names in classes.items():
            for c in names:
                folder = root / name / split / c
                folder.mkdir(parents=True)
                for i in range(2):
                    Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    jpeg = root / "badjpeg" / "train" / "a" / "2.jpg"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:40])
    return root / "imgs"


def _index_escape(root: Path, run: Path) -> Path:
    """A Hugging Face index whose weight_map points outside its folder."""
    import json

    folder = root / "escape"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../secret.safetensors"}}))
    save_tensors(root / "secret.safetensors", {"w": torch.zeros(2)}, {})
    return folder


def _index_empty_shard(root: Path, run: Path) -> Path:
    """A Hugging Face index naming a shard with no name (the folder itself)."""
    import json

    folder = root / "emptyshard"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": ""}}))
    return folder


def _recorded_arch(name: str, arch: str) -> Callable[[Path, Path], Path]:
    """A checkpoint whose metadata names the architecture `arch` (a name the registry does not know)."""

    def build(root: Path, run: Path) -> Path:
        path = root / f"{name}.safetensors"
        meta = dict(read_checkpoint(_first(run)).meta)
        meta["arch"] = json.dumps({"name": arch, "kwargs": {"num_classes": 10, "in_channels": 3}})
        return save_tensors(path, load_tensors(_first(run)), meta)

    return build


def _integers_only(root: Path, run: Path) -> Path:
    """Checkpoints holding only integer tensors: nothing to average."""
    folder = root / "ints"
    folder.mkdir()
    for i in range(3):
        save_tensors(folder / f"c{i}.safetensors", {"a": torch.arange(4) + i, "b": torch.ones(2, dtype=torch.int32)},
                     {"step": str(i)})
    return folder


# name -> builder(root, mlp run) returning a path; each case formats its command with these.
INPUTS: dict[str, Callable[[Path, Path], Path]] = {
    "run": lambda root, run: _copy_run(run, root / "run"),
    "empty": lambda root, run: (root / "empty").mkdir() or root / "empty",
    "truncated": _truncated,
    "corrupt": _corrupt_header,
    "nan": _with_nan,
    "mixed": _mixed,
    "wide": _other_architecture,
    "basis": _basis,
    "existing": _existing,
    "pickled": _pickled_objects,
    "textpt": _text_pt,
    "intweight": _int_tensor,
    "binaryconfig": _binary_config,
    "nullconfig": _null_config,
    "nullsection": _null_section,
    "wordconfig": _text("word.yaml", "model: mlp\nepochs: two\n"),
    "twiceconfig": _text("twice.yaml", "model: mlp\nepochs: 2\nsample:\n  lr: 0.1\n  lr: 0.5\n"),
    "twicejson": _text("twice.json", '{"model": "mlp", "epochs": 2, "epochs": 3}'),
    "seedconfig": _text("seed.toml", "model = \"mlp\"\n[sample]\nseed = 1.5\n"),
    "nanmetric": _nan_metric,
    "imgs": _image_folders,
    "escape": _index_escape,
    "emptyshard": _index_empty_shard,
    "ints": _integers_only,
    "tvcode": _recorded_arch("tvcode", "torchvision:os.system"),
    "timmpath": _recorded_arch("timmpath", "timm:../../os"),
}


@dataclass(frozen=True)
class Case:
    id: str
    command: str
    expect: tuple[str, ...]


def case(id: str, command: str, *expect: str) -> Case:
    return Case(id, command, expect)


CASES = [
    case("pickled-objects", "swa {pickled} -o {out}/avg.safetensors", "{pickled}/ckpt.pt", "pickled Python objects"),
    case("empty-folder", "swa {empty} -o {out}/avg.safetensors", "{empty}", "no .safetensors checkpoints"),
    case("missing-folder", "orthogonalize {root}/nope -o {out}/b.safetensors", "{root}/nope", "no such file"),
    case("missing-file", "eval {root}/nope.safetensors", "{root}/nope.safetensors", "no such file"),
    case("missing-basis", "train-subspace {root}/nope.safetensors -o {out}/t", "{root}/nope.safetensors", "no such"),
    case("differing-shapes", "swa {mixed} -o {out}/avg.safetensors", "'net.1.bias'", "{mixed}/a0.safetensors",
         "{mixed}/b.safetensors"),
    case("differing-shapes-basis", "orthogonalize {mixed} -o {out}/b.safetensors", "'net.1.bias'",
         "{mixed}/b.safetensors"),
    case("truncated", "swa {truncated} -o {out}/avg.safetensors", "{truncated}/{victim}",
         "not a readable safetensors file"),
    case("truncated-eval", "eval {truncated}/{victim}", "{truncated}/{victim}"),
    case("corrupt-header", "orthogonalize {corrupt} -o {out}/b.safetensors", "{corrupt}/{victim}"),
    case("nan-swa", "swa {nan} -o {out}/avg.safetensors", "{nan}/{victim}", "'net.3.weight'",
         "NaN or Inf"),
    case("nan-basis", "orthogonalize {nan} -o {out}/b.safetensors", "{nan}/{victim}",
         "'net.3.weight'", "NaN or Inf"),
    case("nan-eval", "eval {nan}/{victim}", "'net.3.weight'", "NaN or Inf"),
    case("model-misfit-swa", "swa {run} -o {out}/avg.safetensors --model small-cnn --data digits",
         "{run}/ckpt-00000000.safetensors", "'features.0.weight'", "--model"),
    case("model-misfit-basis", "orthogonalize {run} -o {out}/b.safetensors --model small-cnn --data digits",
         "'features.0.weight'", "--model"),
    case("model-misfit-eval", "eval {run}/ckpt-00000000.safetensors --model small-cnn --data digits",
         "'features.0.weight'", "--model"),
    case("model-misfit-train", "train-subspace {run} -o {out}/t --model small-cnn --data digits",
         "'features.0.weight'", "--model"),
    case("unknown-model", "sample {out}/new --model nosuchnet", "'nosuchnet'", "small-cnn", "resnet20", "mlp"),
    case("unknown-model-swa", "swa {run} -o {out}/avg.safetensors --model nosuchnet --data digits", "'nosuchnet'",
         "small-cnn"),
    case("unknown-data", "sample {out}/new --data nosuchdata", "'nosuchdata'", "digits", "cifar10", "mnist"),
    case("unknown-data-eval", "eval {run}/ckpt-00000000.safetensors --data nosuchdata", "'nosuchdata'", "digits"),
    case("missing-data-folder", "sample {out}/new --data mnist --data-dir {root}/nodata", "{root}/nodata",
         "--download"),
    case("data-without-folder", "sample {out}/new --data cifar10", "--data-dir", "--download"),
    case("select-nothing", "swa {run} -o {out}/avg.safetensors --start 50", "--start 50",
         "selects no checkpoint"),
    case("select-nothing-end", "orthogonalize {run} -o {out}/b.safetensors --end 0", "--end 0",
         "selects no checkpoint"),
    case("select-nothing-train", "train-subspace {run} -o {out}/t --start 7 --end 3", "selects no checkpoint"),
    case("basis-misfit", "train-subspace {basis} -o {out}/t --model small-cnn --data digits", "{basis}",
         "'net.1.weight'", "--model"),
    case("basis-init-misfit", "train-subspace {basis} -o {out}/t --init {wide}", "{wide}", "'net.1.weight'"),
    case("output-exists", "swa {run} -o {existing}", "{existing}", "already exists", "--force"),
    case("output-in-input", "swa {run} -o {run}/avg.safetensors", "inside the input folder"),
    case("output-under-a-file", "swa {run} -o {existing}/avg.safetensors", "{existing} is a file"),
    case("output-is-a-folder", "orthogonalize {run} -o {empty} --force", "{empty}", "is a folder"),
    case("run-into-a-file", "sample {existing} --model mlp", "{existing}", "is a file"),
    case("twa-into-a-file", "train-subspace {basis} -o {existing} --force", "{existing}", "is a file"),
    case("eval-a-folder", "eval {run}", "{run}", "not a readable safetensors file"),
    case("run-exists", "sample {run} --model mlp", "{run}", "already exists", "--resume"),
    case("force-checks-first", "sample {run} --model mlp --data nosuchdata --force", "'nosuchdata'"),
    case("resume-nothing", "sample {out}/new --resume", "nothing to resume"),
    case("resume-changed", "sample {run} --model mlp --resume --batch-size 32 --lr 0.05 --epochs 3",
         "--batch-size was 64", "now 32"),
    case("resume-changed-model",
         "sample {run} --model small-cnn --resume --batch-size 64 --per-epoch 3 --lr 0.05 --epochs 3",
         "--model was 'mlp'", "now 'small-cnn'"),
    # Damaged and hostile input (issue 16, items 7-10)
    case("text-pt-inspect", "inspect {textpt}", "{textpt}/notes.pt", "not a readable PyTorch checkpoint"),
    case("text-pt-swa", "swa {textpt} -o {out}/avg.safetensors", "{textpt}/notes.pt"),
    case("int-weight", "swa {intweight} -o {out}/avg.safetensors", "'net.3.weight'", "int64", "float32"),
    case("negative-lr", "sample {out}/new --model mlp --lr -1", "--lr", "-1"),
    case("nan-lr", "sample {out}/new --model mlp --lr nan", "--lr", "nan"),
    case("negative-momentum", "sample {out}/new --model mlp --momentum -1", "--momentum"),
    case("negative-weight-decay", "sample {out}/new --model mlp --weight-decay -1", "--weight-decay"),
    case("huge-seed", "sample {out}/new --model mlp --seed 99999999999999999999", "--seed"),
    case("binary-config", "sample {out}/new --config {binaryconfig}", "{binaryconfig}", "not a text file"),
    case("null-config", "sample {out}/new --config {nullconfig}", "{nullconfig}", "'epochs'", "null"),
    case("null-section", "sample {out}/new --config {nullsection}", "{nullsection}", "section 'sample'",
         "not a table"),
    case("val-class-missing", "sample {out}/new --model mlp --data imagefolder --data-dir {imgs}", "val/c",
         "train"),
    case("truncated-jpeg", "sample {out}/new --model mlp --data imagefolder --data-dir {root}/badjpeg", "2.jpg",
         "not a readable image"),
    case("train-negative-lr", "train-subspace {basis} -o {out}/t --lr -1", "--lr"),
    case("train-nan-lr", "train-subspace {basis} -o {out}/t --lr nan", "--lr"),
    case("train-negative-momentum", "train-subspace {basis} -o {out}/t --momentum -1", "--momentum"),
    case("index-escape", "swa {escape} -o {out}/avg.safetensors", "{escape}/model.safetensors.index.json",
         "../secret.safetensors"),
    case("index-escape-inspect", "inspect {escape}", "../secret.safetensors"),
    case("top-by-nan-metric", "inspect {nanmetric} --top 1 --by val_loss", "--by val_loss", "no finite value"),
    case("swa-to-ckpt", "swa {run} -o {out}/avg.ckpt", "{out}/avg.ckpt", ".safetensors"),
    case("swa-to-pth-tar", "swa {run} -o {out}/avg.pth.tar", "{out}/avg.pth.tar", ".safetensors"),
    case("index-empty-shard", "swa {emptyshard} -o {out}/avg.safetensors", "{emptyshard}/model.safetensors.index.json",
         "names shard ''"),
    case("tol-negative", "orthogonalize {run} -o {out}/b.safetensors --tol -1", "--tol"),
    case("tol-nan", "orthogonalize {run} -o {out}/b.safetensors --tol nan", "--tol"),
    case("user-callable-raises", "sample {out}/new --model os:getcwd --data digits", "--model os:getcwd"),
    case("transformers-class", "sample {out}/new --model transformers:BertForSequenceClassification",
         "--model transformers:BertForSequenceClassification", "hf:AutoModelFor"),
    case("timm-module", "sample {out}/new --model timm.models:test_resnet", "--model timm:test_resnet"),
    case("literal-markup", "sample {out}/new --model mlp --data mymod:factory", "--data mymod:factory"),
    case("literal-brackets", "eval {root}/we[ir]d.safetensors", "{root}/we[ir]d.safetensors", "no such file"),
    case("integers-swa", "swa {ints} -o {out}/avg.safetensors", "{ints}/c0.safetensors", "no floating-point tensor"),
    case("integers-basis", "orthogonalize {ints} -o {out}/b.safetensors", "{ints}/c0.safetensors",
         "no floating-point tensor"),
    case("recorded-torchvision-name", "eval {tvcode}", "{tvcode}", "'os.system'"),
    case("recorded-timm-name", "eval {timmpath}", "{timmpath}", "'../../os'"),
    case("data-callable-raises", "sample {out}/new --model mlp --data json:loads", "--data json:loads"),
    # A value a config file gives that its option cannot take is that file's error (it named only the flag, exit 2)
    case("config-value", "sample {out}/new --config {wordconfig}", "{wordconfig}", "--epochs"),
    case("config-section-value", "sample {out}/new --config {seedconfig}", "{seedconfig}", "--seed"),
    # A key given twice was taken at its last value, silently (YAML, JSON; TOML's parser refuses it itself)
    case("config-key-twice", "sample {out}/new --config {twiceconfig}", "{twiceconfig}", "'lr'", "twice"),
    case("config-key-twice-json", "sample {out}/new --config {twicejson}", "{twicejson}", "'epochs'", "twice"),
    # The file-system root has no name to write a result or a `.partial` folder beside.
    case("run-at-root", "sample / --model mlp", "/", "file-system root"),
    case("run-at-root-force", "sample / --model mlp --force", "file-system root"),
    case("train-at-root", "train-subspace {basis} -o / --force", "file-system root"),
    case("file-at-root", "orthogonalize {run} -o / --force", "file-system root"),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, mlp_run: Path) -> tuple[Path, dict[str, Path]]:
    """Every input, built once: (root, name -> path relative to root)."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "out").mkdir()
    return root, {name: build(root, mlp_run).relative_to(root) for name, build in INPUTS.items()}


@pytest.fixture
def inputs(template: tuple[Path, dict[str, Path]], tmp_path: Path, mlp_run: Path) -> dict[str, str]:
    """A fresh copy of every input per case, so a case that wrongly writes cannot affect the next."""
    source, built = template
    root = tmp_path / "inputs"
    shutil.copytree(source, root)
    paths = {name: str(root / rel) for name, rel in built.items()}
    victim = _first(mlp_run).name  # the file the damaging builders damage
    return {**paths, "root": str(root), "out": str(root / "out"), "victim": victim}


def _check_rejected(code: int, stderr: str, expect: list[str], before: dict, after: dict) -> None:
    lines = stderr.strip().splitlines()
    assert code == 1, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in expect:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert after == before, "a failed command changed the file system"


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_1_and_writes_nothing(c: Case, inputs: dict[str, str], tmp_path: Path, twa):
    root = tmp_path
    before = snapshot(root)
    result = twa(*shlex.split(c.command.format(**inputs)), check=False)
    _check_rejected(result.returncode, result.stderr, [e.format(**inputs) for e in c.expect], before, snapshot(root))


def test_debug_shows_the_traceback(inputs: dict[str, str], twa):
    from twa_cli.errors import TwaError

    with pytest.raises(TwaError, match=r"no \.safetensors checkpoints"):
        twa("swa", inputs["empty"], "-o", f"{inputs['out']}/a.safetensors", "--debug")


@pytest.mark.parametrize("c", [c for c in CASES if c.id in ("truncated",)],
                         ids=lambda c: c.id)
def test_the_installed_command_prints_no_traceback(c: Case, inputs: dict[str, str], tmp_path: Path):
    before = snapshot(tmp_path)
    argv = shlex.split(c.command.format(**inputs))
    proc = subprocess.run([sys.executable, "-m", "twa_cli", *argv], capture_output=True, text=True)
    _check_rejected(proc.returncode, proc.stderr, [e.format(**inputs) for e in c.expect], before, snapshot(tmp_path))


def test_a_failing_write_is_one_line_naming_the_output_and_leaves_nothing(inputs: dict[str, str], tmp_path: Path,
                                                                          monkeypatch, twa):
    """The system refusing a write (here a full disk, with an error that names no file, as a write to an unnamed
    temporary file raises) is reported like bad input, naming the output."""
    import errno

    from twa_cli.io import atomic

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    before = snapshot(tmp_path)
    result = twa("swa", inputs["run"], "-o", f"{inputs['out']}/avg.safetensors", check=False)
    _check_rejected(result.returncode, result.stderr, [f"{inputs['out']}/avg.safetensors", "No space left on device"],
                    before, snapshot(tmp_path))


def test_ctrl_c_anywhere_exits_130_and_restores_the_handler(inputs: dict[str, str], monkeypatch, twa):
    import os
    import signal

    from twa_cli.commands import swa

    real_mean_of = swa.mean_of

    def interrupted_mean_of(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of averaging
        return real_mean_of(*args, **kwargs)

    monkeypatch.setattr(swa, "mean_of", interrupted_mean_of)
    handler = signal.getsignal(signal.SIGINT)
    result = twa("swa", inputs["run"], "-o", f"{inputs['out']}/avg.safetensors", check=False)
    assert result.returncode == 130 and result.stderr.strip() == "error: interrupted"
    assert signal.getsignal(signal.SIGINT) is handler
    assert not Path(inputs["out"], "avg.safetensors").exists()
