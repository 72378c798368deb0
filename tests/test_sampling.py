"""`sample` options the benchmark relies on: a start from a checkpoint, and denser sampling as a superset."""

import pytest
import torch

from twa_cli.commands.sample import SampleConfig, sample
from twa_cli.core.selection import Selection, select_checkpoints
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import list_folder, load_tensors
from twa_cli.tasks.resolve import TaskRequest


def _cfg(**kw) -> SampleConfig:
    base = {"task": TaskRequest(model="mlp", data="digits"), "epochs": 2, "lr": 0.05, "batch_size": 64,
            "eval_every_epoch": False}
    base.update(kw)
    return SampleConfig(**base)


def test_sparser_sampling_is_every_kth_checkpoint_of_a_denser_run(tmp_path):
    dense = list_folder(sample(tmp_path / "dense", _cfg(per_epoch=10)).out)
    sparse = list_folder(sample(tmp_path / "sparse", _cfg(per_epoch=2)).out)
    chosen = select_checkpoints(dense, Selection(start=0, end=None, every=5))
    assert [c.step for c in chosen] == [c.step for c in sparse]
    for c, s in zip(chosen, sparse, strict=True):
        a, b = load_tensors(c.path), load_tensors(s.path)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_starts_from_the_checkpoint_and_trains_on(tmp_path):
    first = sample(tmp_path / "head", _cfg(epochs=1)).checkpoints[-1]
    tail = sample(tmp_path / "tail", _cfg(epochs=1, schedule="constant", init=str(first), seed=3))
    start, start_file = load_tensors(tail.checkpoints[0]), load_tensors(first)
    assert all(torch.equal(start[k], start_file[k]) for k in start)
    end = load_tensors(tail.checkpoints[-1])
    assert any(not torch.equal(end[k], start[k]) for k in end)
    assert "test_acc" not in tail.history[-1]  # --no-eval-every-epoch


def test_init_must_be_a_file(tmp_path):
    with pytest.raises(TwaError, match="--init"):
        sample(tmp_path / "x", _cfg(init=str(tmp_path / "missing.safetensors")))


def test_the_step_schedule_cuts_at_half_and_three_quarters_of_any_number_of_epochs():
    """As the paper's code: lr while epoch < 0.5 E, lr/10 while epoch < 0.75 E, then lr/100."""
    from twa_cli.engine.schedules import learning_rate

    def lrs(epochs):
        return [learning_rate("step", 2.0, epochs, e) for e in range(epochs)]

    assert lrs(1) == [2.0]
    assert lrs(2) == pytest.approx([2.0, 0.2])
    assert lrs(4) == pytest.approx([2.0, 2.0, 0.2, 0.02])
    assert lrs(5) == pytest.approx([2.0, 2.0, 2.0, 0.2, 0.02])
    assert lrs(10) == pytest.approx([2.0] * 5 + [0.2] * 3 + [0.02] * 2)
    assert lrs(40) == pytest.approx([2.0] * 20 + [0.2] * 10 + [0.02] * 10)
