"""`twa plot`: the PCA against numpy, the loss surface against a direct evaluation, every picture rendered."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import trajectory, write_synthetic_folder
from PIL import Image

from twa_cli.commands import figures
from twa_cli.commands.common import task_of
from twa_cli.commands.plot import PlotOptions, classify, plot
from twa_cli.commands.surface import loss_surface
from twa_cli.commands.train_subspace import SubspaceConfig, train_subspace
from twa_cli.core.averaging import mean_of
from twa_cli.core.basis import orthogonalize
from twa_cli.core.basis_files import load_basis, save_basis
from twa_cli.core.batching import plain_batches
from twa_cli.core.batchnorm import recalibrate_on
from twa_cli.core.pca import checkpoint_pca, coordinates_of, pca_of_basis
from twa_cli.core.selection import Selection
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import list_folder, load_tensors
from twa_cli.tasks.resolve import TaskRequest


def numpy_pca(w: np.ndarray):
    """Reference: PCA of the rows of w (checkpoints x parameters), straight from numpy."""
    centred = w - w.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, s**2 / (s**2).sum(), vt


def test_pca_of_basis_coordinates_matches_numpy_on_the_weights(tmp_path):
    w = trajectory(9, 500, seed=3, step=0.05)
    write_synthetic_folder(tmp_path / "ckpts", w)
    basis = orthogonalize(list_folder(tmp_path / "ckpts"), hashes=False)
    pca = pca_of_basis(basis)
    points, shares, vt = numpy_pca(w.numpy())

    m = len(pca.shares)
    np.testing.assert_allclose(pca.shares.numpy(), shares[:m], rtol=1e-6, atol=1e-12)
    assert pca.shares.sum().item() == pytest.approx(1.0)
    signs = np.sign(np.sum(pca.points[:, :2].numpy() * points, axis=0))  # PCA fixes directions up to sign
    np.testing.assert_allclose(pca.points[:, :2].numpy(), points * signs, rtol=1e-5, atol=1e-7)
    assert pca.plane_share == pytest.approx(shares[:2].sum(), rel=1e-6)
    assert pca.directions_for(0.99) == int(np.searchsorted(np.cumsum(shares), 0.99) + 1)
    # the run moves towards +x from its first checkpoint to its last
    assert pca.points[-1, 0] > pca.points[0, 0]

    # a point of the span (a weighted average) lands where numpy projects it; the mean lands on the origin
    alpha = torch.linspace(-0.5, 1.0, 9, dtype=torch.float64)
    alpha = alpha / alpha.sum()
    twa = alpha @ w
    coords, residual = coordinates_of(basis, {"w": twa.float()})
    assert residual < 1e-3
    expected = (twa.numpy() - w.numpy().mean(axis=0)) @ vt[:2].T * signs
    np.testing.assert_allclose(pca.project(coords).numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pca.project(basis.center_coords()).numpy(), [0.0, 0.0], atol=1e-9)
    offset = twa.numpy() - w.numpy().mean(axis=0)
    in_plane = np.linalg.norm(offset @ vt[:2].T) / np.linalg.norm(offset)
    assert pca.plane_fraction(coords) == pytest.approx(in_plane, rel=1e-4)
    # a point off the span says how far off it is
    off = twa + 0.5 * torch.randn(500, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, residual = coordinates_of(basis, {"w": off.float()})
    assert residual > 0.01


def test_pca_needs_a_plane():
    with pytest.raises(TwaError, match="at least 3"):
        checkpoint_pca(torch.randn(2, 2, dtype=torch.float64))
    line = torch.outer(torch.tensor([1.0, 2.0], dtype=torch.float64), torch.arange(5, dtype=torch.float64))
    with pytest.raises(TwaError, match="line"):
        checkpoint_pca(line)


@pytest.fixture(scope="module")
def run(cnn_run, tmp_path_factory):
    """The quickstart layout in miniature: a basis file and, beside it, the train-subspace output made from it."""
    root = tmp_path_factory.mktemp("plot")
    ckpts = list_folder(cnn_run)
    save_basis(orthogonalize(ckpts, names=ckpts[0].trainable, hashes=False), root / "basis.safetensors")
    train_subspace(root / "basis.safetensors", root / "twa",
                   SubspaceConfig(epochs=2, lr=0.5, batch_size=64, bn_batches=2))
    results = [
        {"path": str(ckpts[-1].path), "test": {"accuracy": 91.0, "loss": 0.3, "count": 450}},
        {"path": str(root / "twa" / "twa.safetensors"), "test": {"accuracy": 93.0, "loss": 0.2, "count": 450}},
    ]
    (root / "eval.json").write_text(json.dumps({"results": results}))
    return root


def assert_image(path, size):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size


def test_every_picture_is_drawn_from_a_run(run, tmp_path):
    result = plot([run / "twa", run / "eval.json"], tmp_path / "pics")
    drawn = {d.name: d for d in result.drawn}
    assert set(drawn) == {"coefficients", "trajectory", "spectrum", "accuracy", "epochs-used"}
    assert result.skipped == []
    for name in ("coefficients", "trajectory", "accuracy", "epochs-used"):
        assert_image(drawn[name].path, figures.pixel_size(figures.SIZE))
    assert_image(drawn["spectrum"].path, figures.pixel_size(figures.WIDE))
    # the basis beside the output folder was recognised as the one TWA was trained in
    assert str(run / "basis.safetensors") in drawn["trajectory"].what
    assert "TWA marked" in drawn["trajectory"].what
    assert "SGD, 3 epochs" in drawn["accuracy"].what and "TWA, 2 epochs after epoch 3" in drawn["accuracy"].what
    # one TWA point at the 3 epochs of checkpoints it averaged; the SGD checkpoint becomes the reference line
    assert drawn["epochs-used"].what.startswith("test accuracy against epochs of checkpoints used: TWA at 1 point")
    assert "SGD final (epoch 3)" in drawn["epochs-used"].what


def test_without_a_basis_the_checkpoints_are_orthogonalized_again(run, tmp_path):
    moved = tmp_path / "twa-copy"
    moved.mkdir()
    for name in ("coefficients.json", "twa.safetensors"):
        shutil.copy(run / "twa" / name, moved / name)
    result = plot([moved], tmp_path / "pics", PlotOptions(fmt="svg"))
    drawn = {d.name: d for d in result.drawn}
    assert "the 7 checkpoints TWA averaged" in drawn["trajectory"].what
    assert drawn["spectrum"].path.suffix == ".svg" and drawn["spectrum"].path.read_text().lstrip().startswith("<?xml")
    assert any(s.startswith("epochs-used") for s in result.skipped)
    # the TWA point is the same whichever basis of the same checkpoints is used
    original = load_basis(run / "basis.safetensors")
    sources = list_folder(_source_folder(run))
    rebuilt = orthogonalize(sources, names=sources[0].trainable, hashes=False)
    tensors = load_tensors(run / "twa" / "twa.safetensors")
    a = pca_of_basis(original).project(coordinates_of(original, tensors)[0])
    b = pca_of_basis(rebuilt).project(coordinates_of(rebuilt, tensors)[0])
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4)


def _source_folder(run):
    rows = json.loads((run / "twa" / "coefficients.json").read_text())["coefficients"]
    return Path(rows[0]["path"]).parent


def test_a_sample_folder_alone_gives_trajectory_spectrum_and_accuracy(cnn_run, tmp_path):
    result = plot([cnn_run], tmp_path / "pics", PlotOptions(selection=Selection(end=5), fmt="pdf"))
    drawn = {d.name: d for d in result.drawn}
    assert set(drawn) == {"trajectory", "spectrum", "accuracy"}
    assert "5 checkpoints" in drawn["trajectory"].what
    assert drawn["trajectory"].path.read_bytes().startswith(b"%PDF")
    assert {s.split(":")[0] for s in result.skipped} == {"coefficients", "epochs-used"}


def test_the_epoch_axis_needs_a_steady_number_of_steps_per_epoch():
    assert figures._steps_per_epoch([0, 6, 11, 17], [0.0, 0.545455, 1.0, 1.54545]) == pytest.approx(11.0, rel=1e-4)
    assert figures._steps_per_epoch([0, 6, 11], [0.0, 1.0, 1.0]) is None  # a restarted count: no single scale
    assert figures._steps_per_epoch([0, 5], [0.0, None]) is None


def test_too_few_checkpoints_skip_the_trajectory_but_not_the_rest(cnn_run, tmp_path):
    result = plot([cnn_run], tmp_path / "pics", PlotOptions(selection=Selection(end=2)))
    assert [d.name for d in result.drawn] == ["accuracy"]
    assert "trajectory and spectrum: a PCA of the trajectory needs at least 3 checkpoints (got 2)" in result.skipped


def test_benchmark_json_feeds_the_epochs_used_picture(tmp_path):
    rows = [{"method": "TWA", "epochs": e, "accuracy": a + seed} for e, a in ((5, 60.0), (10, 64.0), (20, 67.0))
            for seed in (0, 1, 2)]
    rows += [{"method": "SGD", "epochs": e, "accuracy": a} for e, a in ((5, 40.0), (10, 45.0), (20, 55.0))]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"figure3": {"reference": {"label": "SGD final (40 epochs)", "accuracy": 68.7},
                                             "points": rows}}))
    result = plot([bench], tmp_path / "pics")
    (drawn,) = result.drawn
    assert drawn.what == ("test accuracy against epochs of checkpoints used: TWA at 3 points, SGD at 3 points; "
                          "SGD final (40 epochs) as a line")
    assert_image(drawn.path, figures.pixel_size(figures.SIZE))


def test_loss_surface_at_the_origin_is_the_mean_of_the_checkpoints(cnn_run):
    ckpts = list_folder(cnn_run)
    basis = orthogonalize(ckpts, names=ckpts[0].trainable, hashes=False)
    task = task_of(TaskRequest(), ckpts[0])  # the model and data the checkpoints record
    pca = pca_of_basis(basis)
    surface = loss_surface(basis, pca, ((-1.0, 1.0), (-2.0, 2.0)), task, resolution=3, num_batches=1, batch_size=64)
    assert surface.train_loss.shape == (3, 3) and surface.bn_recomputed
    assert surface.xs.tolist() == [-1.0, 0.0, 1.0] and surface.ys.tolist() == [-2.0, 0.0, 2.0]
    # direct evaluation of the mean of the checkpoints, BatchNorm recomputed on the same first batch
    net = task.build_model()
    net.load_state_dict(mean_of(ckpts))
    x, y = next(plain_batches(task, task.dataset("train", augment=False), 64))
    recalibrate_on(net, task, [(x, y)])
    net.eval()
    with torch.no_grad():
        loss = float(F.cross_entropy(net(x), y))
        xt, yt = next(plain_batches(task, task.dataset("test", augment=False), 64))
        error = 100.0 - 100.0 * float((net(xt).argmax(1) == yt).float().mean())
    assert float(surface.train_loss[1, 1]) == pytest.approx(loss, rel=1e-4)
    assert float(surface.test_error[1, 1]) == pytest.approx(error, abs=1e-9)
    assert float(surface.train_loss[1, 0]) != pytest.approx(loss, rel=1e-3)  # other points are other weights


def test_surface_picture_has_two_panels(run, tmp_path):
    opts = PlotOptions(surface=True, resolution=3, surface_batches=1, batch_size=64)
    result = plot([run / "basis.safetensors", run / "twa"], tmp_path / "pics", opts)
    drawn = {d.name: d for d in result.drawn}
    assert "3x3 grid, 1 batches per point" in drawn["trajectory"].what
    assert_image(drawn["trajectory"].path, figures.pixel_size(figures.WIDE))


def test_inputs_are_recognised_or_refused(run, tmp_path):
    found = classify([run / "twa" / "twa.safetensors", run / "basis.safetensors", run / "eval.json"])
    assert found.twa_dir == run / "twa" and found.basis_file == run / "basis.safetensors"
    assert found.evals == [run / "eval.json"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(TwaError, match="empty: neither"):
        classify([tmp_path / "empty"])
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(TwaError, match=r"other\.json: neither"):
        classify([tmp_path / "other.json"])
    with pytest.raises(TwaError, match="--format"):
        plot([run / "twa"], tmp_path / "pics", PlotOptions(fmt="jpg"))


def test_cli_writes_pictures_and_refuses_to_overwrite(run, tmp_path, twa):
    proc = twa("plot", run / "twa", "-o", tmp_path / "pics", "--json")
    summary = json.loads(proc.stdout)
    assert [d["name"] for d in summary["drawn"]] == ["coefficients", "trajectory", "spectrum", "accuracy"]
    again = twa("plot", run / "twa", "-o", tmp_path / "pics", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr
    inside = twa("plot", run / "twa", "-o", run / "twa" / "pics", check=False)
    assert inside.returncode == 1 and "inside the input folder" in inside.stderr


def test_cli_says_how_to_install_matplotlib_when_it_is_missing(run, tmp_path, twa, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    proc = twa("plot", run / "twa", "-o", tmp_path / "pics", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: twa plot needs matplotlib: pip install 'twa-cli[plot]'"
    assert not (tmp_path / "pics").exists()


def test_a_layer_wise_output_draws_its_table_of_coefficients(cnn_run, tmp_path, twa):
    twa("train-subspace", cnn_run, "-o", tmp_path / "layer", "--granularity", "layer", "--group-size", "3",
        "--epochs", "1", "--lr", "0.5", "--bn-batches", "2")
    groups = json.loads((tmp_path / "layer" / "coefficients.json").read_text())["layers"]
    result = plot([tmp_path / "layer"], tmp_path / "pics")
    drawn = {d.name: d for d in result.drawn}
    assert f"{len(groups)} groups of tensors" in drawn["coefficients"].what
    with Image.open(drawn["coefficients"].path) as image:
        assert image.format == "PNG" and image.size[0] == figures.pixel_size(figures.SIZE)[0]
    assert {"trajectory", "spectrum", "accuracy"} <= set(drawn)


def test_bad_resolution_and_unplottable_scores_are_refused_before_anything_is_written(run, tmp_path, twa):
    for resolution in ("0", "1", "100000"):
        proc = twa("plot", run / "twa", "-o", tmp_path / "pics", "--resolution", resolution, check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "--resolution" in proc.stderr, proc.stderr
    scores = json.loads((run / "eval.json").read_text())
    for damage in ("no accuracy", "nan accuracy", "no results"):
        broken = json.loads(json.dumps(scores))
        if damage == "no results":
            broken["results"] = {"path": "x"}
        else:
            for result in broken["results"]:
                result["test"].pop("accuracy")
                if damage == "nan accuracy":
                    result["test"]["accuracy"] = float("nan")
        path = run / f"eval-{damage.replace(' ', '-')}.json"
        path.write_text(json.dumps(broken))
        try:
            proc = twa("plot", path, "-o", tmp_path / "pics", check=False)
        finally:
            path.unlink()
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and str(path) in proc.stderr, proc.stderr
    assert not (tmp_path / "pics").exists()


def test_a_picture_that_fails_leaves_no_other_picture_and_no_folder(run, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(figures, "spectrum_figure", broken)
    with pytest.raises(OSError):
        plot([run / "twa"], tmp_path / "new" / "pics")
    assert not (tmp_path / "new").exists()
