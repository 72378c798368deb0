"""Small image folders: decoded once into memory, augmented per batch, deterministic per (seed, epoch)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from twa_cli.commands.common import task_of
from twa_cli.commands.sample import SampleConfig, sample
from twa_cli.commands.swa import SwaRequest, swa
from twa_cli.core.batching import batches, plain_batches
from twa_cli.core.batchnorm import recalibrate_bn, recalibrate_on
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import list_folder, load_tensors
from twa_cli.tasks.images import ImageTensors, data_spec, load_data, random_crop_flip
from twa_cli.tasks.resolve import TaskRequest, resolve_task


def _folder(root: Path, per_class: int = 6, size: int = 8, classes=("cat", "dog", "frog")) -> Path:
    """A tiny ImageFolder tree of random PNGs (lossless, so pixels can be compared exactly)."""
    rng = np.random.RandomState(0)
    for split in ("train", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.randint(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i:03d}.png")
    return root


def _request(root: Path) -> TaskRequest:
    return TaskRequest(model="small-cnn", data="imagefolder", data_dir=str(root))


def test_images_load_once_as_torchvision_would_decode_them(tmp_path):
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    root = _folder(tmp_path / "imgs")
    data = load_data(data_spec("imagefolder", root))
    assert isinstance(data.train, ImageTensors) and data.train.images.dtype == torch.uint8
    assert (len(data.train), data.num_classes, data.in_channels, data.image_size) == (18, 3, 3, 8)
    mean, std = data.test.mean.flatten().tolist(), data.test.std.flatten().tolist()
    reference = tvd.ImageFolder(str(root / "test"), transform=T.Compose([T.ToTensor(), T.Normalize(mean, std)]))
    x, y = next(plain_batches(resolve_task(_request(root)), data.test, 100))
    assert torch.equal(y, torch.tensor([label for _, label in reference.samples]))
    assert torch.allclose(x, torch.stack([reference[i][0] for i in range(len(reference))]), atol=1e-5)


def test_every_augmented_image_is_a_padded_crop_or_its_mirror():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(x, 1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    seen = set()
    for b in range(len(x)):
        crops = {(dy, dx): padded[b, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)}
        matches = [(dy, dx, flip) for (dy, dx), crop in crops.items() for flip in (False, True)
                   if torch.equal(out[b], crop.flip(-1) if flip else crop)]
        assert matches, f"image {b} is no crop of its padded original"
        seen.update(matches)
    assert len({m[:2] for m in seen}) == 9 and {m[2] for m in seen} == {False, True}  # all offsets, both flips


def test_augmentation_depends_only_on_the_global_seed(tmp_path):
    root = _folder(tmp_path / "imgs")
    data = load_data(data_spec("imagefolder", root))
    task = resolve_task(_request(root))

    def epoch(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.cat([x for (x, _), _ in batches(task, data.train, 4, shuffle=True, seed=0, epoch=1)])

    assert torch.equal(epoch(5), epoch(5))
    assert not torch.equal(epoch(5), epoch(6))
    plain = torch.cat([x for x, _ in plain_batches(task, data.train_eval, 4)])
    assert torch.equal(plain, torch.cat([x for x, _ in plain_batches(task, data.train_eval, 4)]))


def test_mixed_image_sizes_are_refused(tmp_path):
    root = _folder(tmp_path / "imgs")
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(root / "train" / "cat" / "odd.png")
    with pytest.raises(TwaError, match="different sizes"):
        load_data(data_spec("imagefolder", root))


def test_a_run_on_an_image_folder_is_reproducible(tmp_path):
    cfg = SampleConfig(task=_request(_folder(tmp_path / "imgs")), epochs=2, lr=0.05, batch_size=8, per_epoch=1)
    first = sample(tmp_path / "a", cfg).checkpoints[-1]
    second = sample(tmp_path / "b", cfg).checkpoints[-1]

    a, b = load_tensors(first), load_tensors(second)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batchnorm_statistics_are_recomputed_from_the_augmented_images(tmp_path):
    """SWA (and every other recalibration) normalizes as training did: over augmented images, reproducibly,
    without moving the random stream a training run draws its augmentation from."""
    cfg = SampleConfig(task=_request(_folder(tmp_path / "imgs")), epochs=2, lr=0.05, batch_size=8, per_epoch=1)
    run = sample(tmp_path / "run", cfg).out
    ckpts = list_folder(run)
    result = tmp_path / "swa.safetensors"
    swa(run, result, SwaRequest(device="cpu"))
    averaged = load_tensors(result)
    task = task_of(TaskRequest(), ckpts[0])  # the model and data the checkpoints record
    net = task.build_model()
    net.load_state_dict(averaged)

    def statistics(augmented: bool) -> dict[str, torch.Tensor]:
        if augmented:
            recalibrate_bn(net, task, batch_size=5)
        else:
            recalibrate_on(net, task, plain_batches(task, task.dataset("train", augment=False), 5))
        return {k: v.clone() for k, v in net.state_dict().items() if k.endswith(("running_mean", "running_var"))}

    stream = torch.get_rng_state()
    augmented = statistics(augmented=True)
    assert torch.equal(torch.get_rng_state(), stream)
    assert all(torch.equal(v, statistics(augmented=True)[k]) for k, v in augmented.items())
    plain = statistics(augmented=False)
    assert any(not torch.allclose(v, plain[k]) for k, v in augmented.items())
    swa_stats = {k: v for k, v in averaged.items() if k in augmented}
    net.load_state_dict(averaged)
    recalibrate_bn(net, task)
    recomputed = {k: v for k, v in net.state_dict().items() if k in augmented}
    assert all(torch.equal(swa_stats[k], recomputed[k]) for k in augmented)


def test_a_truncated_image_in_a_large_folder_is_named(tmp_path, twa):
    """Large images are read as batches need them; a damaged one stops the run with its name, in one line."""
    root = _folder(tmp_path / "imgs", per_class=2, size=80)
    Image.fromarray(np.full((80, 80, 3), 7, dtype=np.uint8)).save(root / "train" / "dog" / "broken.jpg", quality=95)
    broken = root / "train" / "dog" / "broken.jpg"
    broken.write_bytes(broken.read_bytes()[:300])  # cut short: PIL's error does not say which file
    result = twa("sample", tmp_path / "run", "--model", "small-cnn", "--data", "imagefolder", "--data-dir", root,
                 "--epochs", "1", "--batch-size", "4", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert str(broken) in result.stderr and "not a readable image" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ augmentation, a stated choice


def _stats(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def _foreign_run(root: Path, tmp_path: Path) -> Path:
    """A run on the image folder whose checkpoints say nothing of their data (as another tool's would): the
    tensors of a `sample` run, metadata reduced to the step."""
    from twa_cli.io.safetensors import save_tensors

    cfg = SampleConfig(task=_request(root), epochs=2, lr=0.05, batch_size=8, per_epoch=1)
    run = sample(tmp_path / "own", cfg).out
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for ckpt in list_folder(run):
        save_tensors(foreign / ckpt.name, load_tensors(ckpt), {"step": str(ckpt.step)})
    return foreign


def test_sample_states_and_records_its_augmentation_and_normalization(tmp_path):
    """Issue 21 new-user item 1: `sample`'s own choice for a small image folder (the paper's CIFAR crop and flip,
    CIFAR-10's mean and std) is recorded, and `--augment none` trains on the plain images."""
    root = _folder(tmp_path / "imgs")
    run = sample(tmp_path / "run", SampleConfig(task=_request(root), epochs=1, batch_size=8)).out
    data = list_folder(run)[0].data
    assert (data["augment"], data["normalize"]) == ("crop-flip", "cifar10")

    plain = TaskRequest(model="small-cnn", data="imagefolder", data_dir=str(root), augment="none")
    run = sample(tmp_path / "plain", SampleConfig(task=plain, epochs=1, batch_size=8)).out
    assert list_folder(run)[0].data["augment"] == "none"
    task = task_of(TaskRequest(), list_folder(run)[0])
    trained_on = torch.cat([x for (x, _), _ in batches(task, task.dataset("train", augment=True), 8, shuffle=True)])
    assert torch.equal(trained_on.sort(0).values,
                       torch.cat([x for x, _ in plain_batches(task, task.dataset("train", augment=False), 8)])
                       .sort(0).values)


def test_a_run_the_tool_did_not_write_is_recalibrated_on_the_view_it_names(tmp_path, twa):
    """Checkpoints that record no data: BatchNorm is recomputed on the plain images unless --augment says the
    run augmented, and the average records the choice."""
    root = _folder(tmp_path / "imgs")
    foreign = _foreign_run(root, tmp_path)
    flags = ["--model", "small-cnn", "--data", "imagefolder", "--data-dir", root, "--normalize", "cifar10"]
    results = {}
    for augment in ("none", "crop-flip"):
        out = tmp_path / f"avg-{augment}.safetensors"
        extra = [] if augment == "none" else ["--augment", augment]
        twa("swa", foreign, "-o", out, *flags, *extra)
        from twa_cli.io.checkpoints import read_checkpoint

        assert read_checkpoint(out).data["augment"] == augment
        results[augment] = load_tensors(out)
    task = task_of(TaskRequest(), list_folder(tmp_path / "avg-none.safetensors")[0])
    net = task.build_model()
    net.load_state_dict(results["none"])
    recalibrate_on(net, task, plain_batches(task, task.dataset("train", augment=False), 128))
    plain = _stats(net)
    assert all(torch.allclose(results["none"][k], v) for k, v in plain.items())
    assert any(not torch.allclose(results["crop-flip"][k], v) for k, v in plain.items())


def test_an_unstated_normalization_is_said_and_a_stated_one_is_used(tmp_path, twa):
    root = _folder(tmp_path / "imgs")
    foreign = _foreign_run(root, tmp_path)
    flags = ["--model", "small-cnn", "--data", "imagefolder", "--data-dir", root]
    guessed = twa("swa", foreign, "-o", tmp_path / "a.safetensors", *flags).stderr
    assert "--normalize" in guessed and "cifar10" in guessed.lower().replace("-", ""), guessed
    stated = twa("swa", foreign, "-o", tmp_path / "b.safetensors", *flags, "--normalize", "imagenet").stderr
    assert "--normalize" not in stated, stated
    task = task_of(TaskRequest(), list_folder(tmp_path / "b.safetensors")[0])
    assert task.data_spec["normalize"] == "imagenet"
    test = task.dataset("test", augment=False)
    assert torch.allclose(test.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_resolving_standard_gives_each_registry_set_its_own_view():
    from twa_cli.tasks.resolve import data_request

    for name, augment, normalize in (("cifar10", "crop-flip", "cifar10"), ("mnist", "none", "mnist")):
        spec, _ = data_request(TaskRequest(data=name, data_dir="/nowhere", augment="standard",
                                           normalize="standard"), resolve_recorded())
        assert (spec["augment"], spec["normalize"]) == (augment, normalize)


def resolve_recorded():
    from twa_cli.tasks.resolve import NOTHING

    return NOTHING


@pytest.mark.parametrize("flags, fragment", [
    (["--augment", "resized-crop-flip"], "--augment resized-crop-flip"),
    (["--normalize", "mnist"], "--normalize mnist"),
])
def test_a_view_the_data_cannot_have_is_refused(flags, fragment, tmp_path, twa):
    root = _folder(tmp_path / "imgs")
    result = twa("sample", tmp_path / "run", "--model", "small-cnn", "--data", "imagefolder", "--data-dir", root,
                 "--epochs", "1", *flags, check=False)
    assert result.returncode == 1 and fragment in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "run").exists()


def test_digits_take_no_view_flags(tmp_path, twa):
    result = twa("sample", tmp_path / "run", "--model", "mlp", "--augment", "crop-flip", check=False)
    assert result.returncode == 1 and "--augment" in result.stderr and "digits" in result.stderr, result.stderr


def test_a_recorded_view_of_unknown_name_names_the_file(tmp_path, twa):
    import json

    from twa_cli.io.checkpoints import read_checkpoint
    from twa_cli.io.safetensors import save_tensors

    root = _folder(tmp_path / "imgs")
    run = sample(tmp_path / "run", SampleConfig(task=_request(root), epochs=1, batch_size=8)).out
    victim = sorted(run.glob("ckpt-*.safetensors"))[-1]
    meta = dict(read_checkpoint(victim).meta)
    meta["data"] = json.dumps({**json.loads(meta["data"]), "augment": "os.system"})
    save_tensors(victim, load_tensors(victim), meta)
    result = twa("eval", victim, check=False)
    assert result.returncode == 1 and str(victim) in result.stderr and "'os.system'" in result.stderr, result.stderr


def test_the_flag_takes_the_place_of_the_recorded_view(tmp_path, twa):
    """A run `sample` wrote records crop-flip; `swa --augment none` recomputes BatchNorm on the plain images and
    records that."""
    from twa_cli.io.checkpoints import read_checkpoint

    root = _folder(tmp_path / "imgs")
    run = sample(tmp_path / "run", SampleConfig(task=_request(root), epochs=2, batch_size=8)).out
    out = tmp_path / "avg.safetensors"
    twa("swa", run, "-o", out, "--augment", "none")
    assert read_checkpoint(out).data["augment"] == "none"
    assert read_checkpoint(out).data["normalize"] == "cifar10"
    task = task_of(TaskRequest(), list_folder(out)[0])
    net = task.build_model()
    average = load_tensors(out)
    net.load_state_dict(average)
    recalibrate_on(net, task, plain_batches(task, task.dataset("train", augment=False), 128))
    assert all(torch.allclose(average[k], v) for k, v in _stats(net).items())


def test_an_image_folder_s_own_val_folder_is_the_validation_split(tmp_path, twa):
    """DIR/val/ beside DIR/test/ is the validation split (README, Data): `--fit-on val` and `swa --greedy` were
    refused for want of --val-split, as if only a carved fraction could be one."""
    root = _folder(tmp_path / "imgs")
    for cls in ("cat", "dog", "frog"):
        (root / "val" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / "val" / cls / f"{i}.png")
    run = tmp_path / "run"
    twa("sample", run, "--model", "mlp", "--data", "imagefolder", "--data-dir", root, "--epochs", "1",
        "--per-epoch", "2", "--batch-size", "4", "--quiet")
    soup = twa("swa", run, "--greedy", "-o", tmp_path / "soup.safetensors", "--json")
    import json

    assert len(json.loads(soup.stdout)["individual_val"]) == 3
    fitted = json.loads(twa("train-subspace", run, "-o", tmp_path / "fit", "--fit-on", "val", "--select", "none",
                            "--init", "center", "--epochs", "1", "--no-lr-check", "--json").stdout)
    assert fitted["coefficients"]
    # without val/ there is none, and the refusal still comes
    (root / "val").rename(tmp_path / "aside")
    refused = twa("swa", run, "--greedy", "-o", tmp_path / "no.safetensors", check=False)
    assert refused.returncode == 1 and "--val-split" in refused.stderr
