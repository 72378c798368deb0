"""Any model through the Task interface: a user's task with dict batches and its own loss goes through every
command from the command line, and what a task records is run again only when the user names it."""

from __future__ import annotations

import json

import pytest
import torch

from twa_cli.commands.train_subspace import SubspaceConfig, train_subspace
from twa_cli.io.checkpoints import list_folder, load_tensors
from twa_cli.tasks.resolve import TaskRequest

HOOK = "custom_task:digits_as_dicts"


@pytest.fixture(scope="module")
def dict_run(tmp_path_factory, twa):
    out = tmp_path_factory.mktemp("dicts") / "run"
    twa("sample", out, "--task", HOOK, "--epochs", "3", "--per-epoch", "2", "--batch-size", "64", "--lr", "0.05",
        "--device", "cpu")
    return out


def test_a_task_hook_samples_averages_and_trains_in_the_subspace_from_the_command_line(dict_run, tmp_path, twa):
    ckpts = list_folder(dict_run)
    assert len(ckpts) == 7 and json.loads(ckpts[0].meta["task"]) == {"name": HOOK}
    swa = json.loads(twa("swa", dict_run, "-o", tmp_path / "swa.safetensors", "--task", HOOK, "--json").stdout)
    assert swa["batchnorm"] == "recomputed" and swa["test"]["accuracy"] > 50
    summary = json.loads(twa("train-subspace", dict_run, "-o", tmp_path / "twa", "--task", HOOK, "--epochs", "2",
                             "--json").stdout)
    assert len(summary["coefficients"]) == 7 and summary["lr_check"]["method"] == "double backward"
    scored = json.loads(twa("eval", tmp_path / "twa" / "twa.safetensors", "--task", HOOK, "--split", "both",
                            "--json").stdout)["results"][0]
    assert scored["test"]["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert scored["gap"] == pytest.approx(scored["train"]["accuracy"] - scored["test"]["accuracy"])


def test_the_task_s_own_loss_is_what_training_minimizes(dict_run, tmp_path):
    """The metrics of the last epoch are the task's label-smoothed loss, not plain cross-entropy."""
    result = train_subspace(dict_run, tmp_path / "twa", SubspaceConfig(epochs=1, device="cpu",
                                                                        task=TaskRequest(task=HOOK)))
    from custom_task import DigitsAsDicts

    task = DigitsAsDicts()
    net = task.build_model()
    net.load_state_dict(load_tensors(result.result))
    batch = {"pixels": torch.stack([task.splits["test"][i]["pixels"] for i in range(len(task.splits["test"]))]),
             "label": task.splits["test"].y}
    net.eval()
    with torch.no_grad():
        smoothed = float(task.loss(net, batch))
        plain = float(torch.nn.functional.cross_entropy(net(pixels=batch["pixels"])["scores"], batch["label"]))
    assert result.test.loss == pytest.approx(smoothed, rel=1e-5) and abs(smoothed - plain) > 1e-3


def test_a_recorded_task_runs_only_when_named_again(dict_run, tmp_path, twa):
    refused = twa("eval", list_folder(dict_run)[-1].path, check=False)
    assert refused.returncode == 1 and f"--task {HOOK}" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_a_task_hook_that_returns_something_else_is_one_line(tmp_path, twa):
    result = twa("sample", tmp_path / "x", "--task", "json:dumps", check=False)
    assert result.returncode == 1 and "--task json:dumps" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_each_piece_of_a_task_serves_the_core_alone():
    # The core asks for the piece it uses: batching for the data, the lr check's loss and the validation choice
    # for the metrics. Each works with an object that is only that piece.
    from torch.utils.data import TensorDataset

    from twa_cli.core.batching import batches
    from twa_cli.core.holdout import better
    from twa_cli.core.sharpness import sample_loss
    from twa_cli.tasks.base import Metrics, Task, TaskData, TaskMetrics, TaskModel

    class Data(TaskData):
        def dataset(self, split, *, augment):
            return TensorDataset(torch.arange(10.0)[:, None], torch.arange(10) % 2) if split == "train" else None

    class Measured(TaskMetrics):
        selection_metric = ("accuracy", True)

        def loss(self, model, batch):
            return (model(batch[0]) ** 2).mean()

    data, measured = Data(), Measured()
    data.hold_out(0.2)
    train = data.split("train", augment=True)
    assert len(train) == 8 and len(data.split("val", augment=False)) == 2
    got = [b for b, _ in batches(data, train, 3, shuffle=True, seed=1)]
    assert [len(b[0]) for b in got] == [3, 3, 2]
    model = torch.nn.Linear(1, 1)
    loss = sample_loss(model, measured, [(b, 1.0) for b in got])
    assert torch.isclose(loss, sum(measured.loss(model, b) for b in got) / 3)
    assert better(measured, Metrics({"loss": 1.0, "accuracy": 60.0}, 10), Metrics({"loss": 0.5, "accuracy": 50.0}, 10))
    assert not {"loss", "measure", "metrics"} & set(dir(Data)) and not {"dataset", "load"} & set(dir(Measured))
    assert issubclass(Task, TaskModel) and issubclass(Task, TaskData) and issubclass(Task, TaskMetrics)
    assert sorted(Task.__abstractmethods__) == ["build_model", "dataset", "loss"]  # what a user's task writes


def test_a_training_split_with_no_examples_is_refused_in_one_line_with_nothing_written(dict_run, tmp_path, twa):
    out = tmp_path / "twa"
    refused = twa("train-subspace", dict_run, "-o", out, "--task", "custom_task:digits_with_empty_train", "--json",
                  check=False)
    assert refused.returncode == 1 and "train split has no examples to train on" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_fit_on_an_empty_loader_is_refused():
    from twa_cli.engine import TWA
    from twa_cli.errors import TwaError

    model = torch.nn.Linear(2, 1)
    twa = TWA(model)
    twa.add(model)
    with pytest.raises(TwaError, match="no batches"):
        twa.fit(model, [], lambda m, b: m(b).sum())



def _structure(net):
    from twa_cli.tasks.models import tied_names, trainable_names

    return trainable_names(net), tied_names(net), {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_the_tools_own_models_are_outlined_on_the_meta_device_as_they_are_built(tmp_path):
    """The tensors spanning the subspace are read from the model's outline: the tool's own models (registry,
    transformers) are built there on the meta device, with the structure of a real build, tied weights included."""
    import transformers

    from twa_cli.tasks.classification import ClassificationTask
    from twa_cli.tasks.hf import hf_task

    registry = ClassificationTask({"name": "small-cnn", "kwargs": {"num_classes": 10, "in_channels": 1,
                                                                    "image_size": 8}}, {})
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    for task in (registry, hf_task(tmp_path / "gpt2", None, None)):
        outline = task.outline_model()
        assert all(t.is_meta for t in outline.state_dict().values())
        assert _structure(outline) == _structure(task.build_model())
    assert _structure(task.build_model())[1] == ["lm_head.weight"]  # the tie is there to compare


def test_a_task_of_ones_own_is_outlined_by_building_it_as_for_training(tmp_path):
    """A task's own code may cache or save while it builds: on the meta device that would keep meta tensors
    (a cached backbone) or write them (a saved starting point), so it is built for real."""
    import functools

    from twa_cli.tasks.base import Task

    @functools.lru_cache(maxsize=1)
    def backbone():
        return torch.nn.Linear(4, 4)

    class Cached(Task):
        def build_model(self):
            torch.save({"made": torch.ones(1)}, tmp_path / "init.pt")
            return torch.nn.Sequential(backbone(), torch.nn.Linear(4, 2))

        def dataset(self, split, *, augment):
            return None

        def loss(self, model, batch):
            return torch.zeros(())

    task = Cached()
    assert not any(t.is_meta for t in task.outline_model().state_dict().values())
    assert not task.build_model()[0].weight.is_meta  # the cache holds a real backbone
    assert not torch.load(tmp_path / "init.pt", weights_only=True)["made"].is_meta

