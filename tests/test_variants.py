import json

import pytest
import torch
from helpers import flat_trainable, tiny_run

from twa_cli.commands.common import task_of
from twa_cli.commands.swa import SwaRequest, swa
from twa_cli.commands.train_subspace import SubspaceConfig, train_subspace
from twa_cli.core.basis_files import load_basis
from twa_cli.core.evaluation import evaluate
from twa_cli.io.checkpoints import list_folder, load_tensors, read_checkpoint
from twa_cli.tasks.images import data_spec, load_data
from twa_cli.tasks.resolve import TaskRequest


def _run(src, out, val_split=0.0, **kw):
    return train_subspace(src, out, SubspaceConfig(epochs=1, lr=0.5, batch_size=64,
                                                   task=TaskRequest(val_split=val_split), **kw))


def test_affine_coefficients_sum_to_one_and_rebuild_the_result(cnn_run, tmp_path):
    result = _run(cnn_run, tmp_path / "affine", affine=True)
    assert result.report.kind == "affine"
    alpha = torch.tensor(result.coefficients, dtype=torch.float64)
    assert abs(float(alpha.sum()) - 1.0) < 1e-6
    names = [n for n, _ in load_basis(tmp_path / "affine" / "basis.safetensors").layout]
    stacked = torch.stack([flat_trainable(c.path, names) for c in list_folder(cnn_run)])
    w_twa = flat_trainable(result.result, names)
    assert float((alpha @ stacked - w_twa).norm() / w_twa.norm()) < 1e-5
    # the lr check runs for the affine hull too, through the optimizer's own projection
    assert result.lr_check is not None
    assert json.loads((tmp_path / "affine" / "lr-check.json").read_text()) == result.lr_check.to_dict()


def test_layerwise_table_has_a_row_per_tensor_that_rebuilds_it(cnn_run, tmp_path):
    result = _run(cnn_run, tmp_path / "layer", granularity="layer")
    layout = load_basis(tmp_path / "layer" / "basis.safetensors").layout
    groups = result.report.groups
    assert result.report.kind == "layer" and groups is not None
    assert [g.tensors for g in groups] == [[name] for name, _ in layout]
    saved = json.loads((tmp_path / "layer" / "coefficients.json").read_text())
    assert saved["kind"] == "layer"
    assert len(saved["layers"]) == len(layout)
    ckpts = list_folder(cnn_run)
    got = load_tensors(result.result)
    every = [load_tensors(c.path) for c in ckpts]
    for group in groups:
        name = group.tensors[0]
        rebuilt = sum(a * t[name].double() for a, t in zip(group.alpha, every, strict=True))
        assert torch.allclose(rebuilt, got[name].double(), atol=1e-5 * float(got[name].norm()) + 1e-7), name
    # layer-wise runs check the lr as well (through the layer-wise projection) and say so in lr-check.json
    assert result.lr_check is not None
    assert json.loads((tmp_path / "layer" / "lr-check.json").read_text()) == result.lr_check.to_dict()


def test_grouped_layers_follow_group_size(cnn_run, tmp_path):
    result = _run(cnn_run, tmp_path / "groups", granularity="layer", group_size=3)
    sizes = [len(g.tensors) for g in result.report.groups]
    assert all(s == 3 for s in sizes[:-1]) and 1 <= sizes[-1] <= 3


def test_validation_split_is_fixed_and_disjoint():
    a = load_data(data_spec("digits", val_split=0.2))
    b = load_data(data_spec("digits", val_split=0.2))
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])
    assert len(a.val) + len(a.train) == 1347
    train_rows = {tuple(x.flatten().tolist()) for x in a.train.tensors[0]}
    assert not any(tuple(x.flatten().tolist()) in train_rows for x in a.val.tensors[0][:50])


def test_fit_on_val_records_the_split_and_fits_on_the_held_out_images(cnn_run, tmp_path):
    result = _run(cnn_run, tmp_path / "val", fit_on="val", val_split=0.2)
    assert read_checkpoint(result.result).data["val_split"] == 0.2
    # the same command twice: the same coefficients, to the bit
    again = _run(cnn_run, tmp_path / "val-again", fit_on="val", val_split=0.2)
    assert again.coefficients == result.coefficients
    # the same basis and split, trained on the training part instead: other coefficients
    on_train = _run(cnn_run, tmp_path / "train", fit_on="train", val_split=0.2)
    assert on_train.coefficients != result.coefficients
    # other held-out images: other coefficients
    other = _run(cnn_run, tmp_path / "val-other", fit_on="val", val_split=0.3)
    assert other.coefficients != result.coefficients


def test_greedy_soup_is_the_mean_of_the_chosen_checkpoints(tmp_path, twa):
    runs = tmp_path / "soup"
    runs.mkdir()
    base = tiny_run(tmp_path / "base", model="mlp", epochs=1, per_epoch=1)
    init = list_folder(base)[-1].path
    for seed in range(3):
        twa("sample", tmp_path / f"ft{seed}", "--model", "mlp", "--epochs", "1", "--init", init, "--seed", seed,
            "--lr", "0.05", "--batch-size", "64", "--val-split", "0.2", "--quiet")
        (runs / f"ft{seed}.safetensors").symlink_to(list_folder(tmp_path / f"ft{seed}")[-1].path)
    ckpts = list_folder(runs)
    result = swa(runs, tmp_path / "greedy.safetensors",
                 SwaRequest(greedy=True, task=TaskRequest(val_split=0.2), device="cpu"))
    assert result.metric == "accuracy"
    # each ingredient's held-out accuracy, measured here on the validation split
    task = task_of(TaskRequest(val_split=0.2), ckpts[0])
    net = task.build_model()

    def held_out(tensors):
        net.load_state_dict(tensors)
        return evaluate(net, task, "val").accuracy

    own = [held_out(load_tensors(c)) for c in ckpts]
    assert result.individual == pytest.approx(own)
    # the soup starts from its best ingredient ...
    assert result.chosen and any(own[i] == max(own) for i in result.chosen)
    got = load_tensors(result.path)
    for name, value in got.items():
        expected = torch.stack([load_tensors(ckpts[i].path)[name].double() for i in result.chosen]).mean(0)
        assert torch.allclose(value.double(), expected, atol=1e-6), name
    # ... and never scores below it on the held-out split
    assert held_out(got) == pytest.approx(result.val)
    assert result.val >= max(own) - 1e-9


def test_greedy_soup_selects_on_the_val_split_the_checkpoints_record(tmp_path, twa):
    """`twa sample --val-split 0.2` then `twa swa --greedy` asked for --val-split again: the flag, else the
    metadata, as every other command reads it."""
    run = tiny_run(tmp_path / "run", model="mlp", epochs=2, per_epoch=1, val_split=0.2)
    recorded = json.loads(twa("swa", run, "--greedy", "-o", tmp_path / "a.safetensors", "--json").stdout)
    flagged = json.loads(twa("swa", run, "--greedy", "--val-split", "0.2", "-o", tmp_path / "b.safetensors",
                             "--json").stdout)
    assert recorded["chosen"] == flagged["chosen"] and recorded["val"] == flagged["val"]
    assert recorded["individual_val"] == flagged["individual_val"] and len(recorded["individual_val"]) == 3
    # a flag given takes the place of what is recorded: another split, other figures
    other = json.loads(twa("swa", run, "--greedy", "--val-split", "0.5", "-o", tmp_path / "c.safetensors",
                           "--json").stdout)
    assert other["individual_val"] != recorded["individual_val"]


def test_greedy_soup_of_runs_recording_different_val_splits_asks_which(tmp_path, twa):
    """A soup of two runs' checkpoints that recorded different --val-split took the first one's split without a
    word; which split to choose on is ambiguous, so the flag must say it."""
    import shutil

    soup = tmp_path / "soup"
    soup.mkdir()
    for name, split in (("a", 0.2), ("b", 0.3)):
        run = tiny_run(tmp_path / name, model="mlp", epochs=1, per_epoch=1, val_split=split)
        last = list_folder(run)[-1].path
        shutil.copy(last, soup / f"{name}-{last.name}")
    refused = twa("swa", soup, "--greedy", "-o", tmp_path / "s.safetensors", check=False)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(lines) == 1 and "--val-split" in lines[0], refused.stderr
    assert "a-" in lines[0] and "b-" in lines[0]  # both files named
    assert not (tmp_path / "s.safetensors").exists()
    chosen = json.loads(twa("swa", soup, "--greedy", "--val-split", "0.3", "-o", tmp_path / "s.safetensors",
                            "--json").stdout)
    assert len(chosen["individual_val"]) == 2


def test_sample_init_starts_from_the_given_weights(tmp_path, twa):
    base = tiny_run(tmp_path / "base", model="mlp", epochs=1, per_epoch=1)
    init = list_folder(base)[-1].path
    twa("sample", tmp_path / "ft", "--model", "mlp", "--epochs", "1", "--init", init, "--quiet")
    first = list_folder(tmp_path / "ft")[0].path
    a, b = load_tensors(first), load_tensors(init)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_variant_options_run_from_the_cli(cnn_run, tmp_path, twa):
    for i, flags in enumerate((["--affine"], ["--granularity", "layer", "--group-size", "2"],
                               ["--fit-on", "val", "--val-split", "0.1"])):
        proc = twa("train-subspace", cnn_run, "-o", tmp_path / f"v{i}", "--epochs", "1", "--lr", "0.5", "--json",
                   *flags)
        summary = json.loads(proc.stdout)
        assert summary["test"]["accuracy"] > 50
    bad = twa("train-subspace", cnn_run, "-o", tmp_path / "bad", "--fit-on", "val", check=False)
    assert bad.returncode == 1 and "--val-split" in bad.stderr


def test_greedy_soup_to_a_folder_writes_the_hugging_face_layout_with_the_output_flags(tmp_path, twa):
    runs = tmp_path / "soup"
    runs.mkdir()
    base = tiny_run(tmp_path / "base", model="small-cnn", epochs=1, per_epoch=1)
    init = list_folder(base)[-1].path
    for seed in range(2):
        twa("sample", tmp_path / f"ft{seed}", "--model", "small-cnn", "--epochs", "1", "--init", init, "--seed", seed,
            "--lr", "0.05", "--batch-size", "64", "--val-split", "0.2", "--quiet")
        (runs / f"ft{seed}.safetensors").symlink_to(list_folder(tmp_path / f"ft{seed}")[-1].path)
    out = tmp_path / "soup-hf"
    summary = json.loads(twa("swa", runs, "--greedy", "--val-split", "0.2", "-o", out, "--dtype", "bfloat16",
                             "--max-shard-size", "20KB", "--no-bn-update", "--json").stdout)
    assert summary["output"] == str(out) and summary["batchnorm"] == "averaged"
    index = out / "model.safetensors.index.json"
    assert index.exists() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    tensors = load_tensors(out)
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.bfloat16}
    assert read_checkpoint(out).meta["command"] == "swa --greedy"
    plan = json.loads(twa("swa", runs, "--greedy", "--val-split", "0.2", "-o", tmp_path / "p", "--dry-run",
                          "--json").stdout)
    assert plan["command"] == "swa --greedy" and not (tmp_path / "p").exists()
