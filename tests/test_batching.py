"""Batches of data read example by example are loaded by worker processes, ahead of the step, with the same
augmentation whatever the number of workers (none included), and leave torch's generator (dropout's) alone."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import Dataset

from twa_cli.core.batching import batches, in_memory
from twa_cli.errors import TwaError
from twa_cli.tasks.base import Part, Task
from twa_cli.tasks.text import Examples


class Augmenting(Dataset):
    """Each example drawn with torch's generator, as torchvision's random crops and flips are, and tagged with
    the process that loaded it."""

    def __init__(self, n: int, broken: int | None = None):
        self.n, self.broken = n, broken

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i == self.broken:
            raise TwaError(f"/data/img{i}.jpg: not a readable image (truncated)")
        return torch.tensor([float(i)]) + torch.rand(3), torch.tensor(os.getpid())


class _Loading(Task):
    """Only what loading uses: the base class's own `load` and `collate`."""

    def build_model(self):
        raise NotImplementedError

    def dataset(self, name, *, augment):
        raise NotImplementedError

    def loss(self, model, batch):
        raise NotImplementedError


def _task() -> Task:
    return _Loading()


def _load(workers: int, n: int = 37, epoch: int = 2):
    return [(b, w) for b, w in batches(_task(), Augmenting(n), 8, shuffle=True, seed=5, epoch=epoch,
                                       workers=workers)]


def test_augmented_batches_are_the_same_with_any_number_of_workers_and_in_workers_indeed():
    alone, one, two = _load(0), _load(1), _load(2)
    assert len(alone) == 5 and [w for _, w in alone] == [1.0] * 5
    for a, b, c in zip(alone, one, two, strict=True):
        assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][0], c[0][0])
    assert {int(p) for (_, pids), _ in alone for p in pids} == {os.getpid()}
    assert os.getpid() not in {int(p) for (_, pids), _ in two for p in pids}
    # Every example once, in the epoch's order; another epoch draws other augmentations.
    seen = torch.cat([x[:, 0] for (x, _), _ in alone]).floor().long()
    assert sorted(seen.tolist()) == list(range(37))
    assert not torch.equal(_load(0, epoch=3)[0][0][0], alone[0][0][0])


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_leaves_torch_s_generator_as_it_was(workers):
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    _load(workers)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_error_in_a_worker_is_the_same_one_line(workers):
    with pytest.raises(TwaError) as caught:
        list(batches(_task(), Augmenting(30, broken=17), 8, workers=workers))
    assert str(caught.value) == "/data/img17.jpg: not a readable image (truncated)"


def test_data_held_in_memory_is_sliced_on_this_thread():
    tensors = torch.utils.data.TensorDataset(torch.arange(10.0))
    assert in_memory(tensors) and in_memory(Part(tensors, torch.arange(3)))
    assert in_memory(Examples([{"input_ids": [1, 2]}]))
    assert not in_memory(Augmenting(3)) and not in_memory(Part(Augmenting(3), torch.arange(2)))


def test_a_task_that_says_0_workers_is_loaded_on_this_thread():
    task = _task()
    task.workers = 0
    pids = {int(p) for (_, tags), _ in batches(task, Augmenting(40), 8) for p in tags}
    assert pids == {os.getpid()}


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_never_reseeds_a_gpu_s_generator(workers, monkeypatch):
    # torch.manual_seed reseeds every GPU's generator as well, and fork_rng(devices=[]) would not put it back.
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded.append)
    _load(workers)
    assert reseeded == []


class _AsIs(_Loading):
    """A task whose batches are a tuple holding a NumPy array, which DataLoader's default collation would turn
    into a list holding a tensor."""

    def load(self, dataset, indices):
        return (indices.numpy().copy(), "tag")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_comes_back_as_the_task_loaded_it(workers):
    import numpy as np

    got = [b for b, _ in batches(_AsIs(), Augmenting(20), 8, workers=workers)]
    assert [type(b) for b in got] == [tuple] * 3 and all(isinstance(b[0], np.ndarray) for b in got)
    assert got[2][0].tolist() == [16, 17, 18, 19]


class _MissingFile(Augmenting):
    def __getitem__(self, i: int):
        if i == 17:
            open(f"/nonexistent-twa-test/img{i}.jpg", "rb")
        return super().__getitem__(i)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_that_cannot_be_read_in_a_worker_is_the_same_system_error(workers):
    with pytest.raises(OSError) as caught:
        list(batches(_task(), _MissingFile(30), 8, workers=workers))
    assert (caught.value.filename, caught.value.strerror) == ("/nonexistent-twa-test/img17.jpg",
                                                              "No such file or directory")


def test_under_torchrun_each_rank_s_part_draws_its_own_augmentation():
    from twa_cli.core.placement import ColumnShards

    data, common = Augmenting(32), dict(shuffle=True, seed=3, epoch=1)
    alone = [b for (b, _), _ in batches(_task(), data, 16, workers=0, **common)]
    ranks = [[b for (b, _), _ in batches(_task(), data, 16, workers=w, **common,
                                         parts=ColumnShards(rank=r, world=2, backend="gloo", device="cpu"))]
             for r, w in ((0, 0), (1, 2))]
    together = torch.cat([ranks[0][0], ranks[1][0]])
    assert torch.equal(together[:, 0].floor(), alone[0][:, 0].floor())  # the same examples, split in two
    assert torch.equal(ranks[0][0], alone[0][:8])  # rank 0 draws as one process does
    noise = [part[0] - part[0][:, :1].floor() for part in ranks]
    assert not torch.allclose(noise[0], noise[1])


def test_negative_workers_are_refused_in_one_line():
    with pytest.raises(TwaError, match="workers: -1"):
        list(batches(_task(), Augmenting(20), 8, workers=-1))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_seed_beyond_a_generator_s_range_still_loads(workers):
    assert len(list(batches(_task(), Augmenting(20), 8, shuffle=True, seed=2**62, workers=workers))) == 3


@pytest.mark.parametrize("device, pinned", [("cpu", False), ("cuda", True), ("cuda:1", True)])
def test_batches_bound_for_a_gpu_are_handed_over_in_page_locked_memory(device, pinned, monkeypatch):
    # No GPU here: what is checked is that the training loop's batches ask the workers for page-locked memory
    # exactly when the device is a GPU (the copy to it is non-blocking, `twa_cli.engine.batch.move`).
    import twa_cli.core.batching as batching
    from twa_cli.core.training import TaskBatches

    asked = []

    class Recording(batching.DataLoader):
        def __init__(self, *args, pin_memory=False, **kwargs):
            asked.append(pin_memory)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(batching, "DataLoader", Recording)
    task = _task()
    task.workers = 2
    source = TaskBatches(task, Augmenting(20), 8, seed=0, pin=batching.pinned_for(device))
    assert len(list(source.epoch(0))) == 3 and asked == [pinned]


class _Raising(Augmenting):
    def __init__(self, n: int, error: Exception):
        super().__init__(n)
        self.error = error

    def __getitem__(self, i: int):
        if i == 17:
            raise self.error
        return super().__getitem__(i)


class _MyOSError(OSError):
    pass


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("error", [ValueError("bad row 17"), KeyError("label"), _MyOSError(13, "denied", "/x.jpg")])
def test_any_error_in_a_worker_comes_back_as_itself(workers, error):
    with pytest.raises(type(error)) as caught:
        list(batches(_task(), _Raising(30, error), 8, workers=workers))
    assert type(caught.value) is type(error) and str(caught.value) == str(error)
    notes = getattr(caught.value, "__notes__", [])
    if workers and not isinstance(error, OSError):  # a bug in the data set: where in the worker it happened
        assert any("_Raising" in line or "__getitem__" in line for note in notes for line in note.splitlines())


class _TwoArguments(Exception):
    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")


def test_an_error_that_cannot_travel_between_processes_comes_back_named_with_its_message():
    with pytest.raises(RuntimeError, match=r"_TwoArguments: /x\.jpg: bad"):
        list(batches(_task(), _Raising(30, _TwoArguments("/x.jpg", "bad")), 8, workers=2))


class _InterruptHandling(Augmenting):
    def __getitem__(self, i: int):
        import signal

        return torch.tensor([float(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)]), torch.tensor(os.getpid())


def test_workers_leave_ctrl_c_to_the_main_process():
    import signal

    def handler(signum, frame):  # as the CLI's, which raises its own interruption
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        got = [b for (b, _), _ in batches(_task(), _InterruptHandling(20), 8, workers=2)]
    finally:
        signal.signal(signal.SIGINT, previous)
    assert torch.cat(got).eq(1.0).all()  # ignored in every worker: the main process stops them


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 1), (3, 2), (16, 4)])
def test_the_default_number_of_workers_follows_the_cores_this_process_may_use(cores, workers, monkeypatch):
    from twa_cli.core.batching import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's count, which a container's share is not
    assert default_workers() == workers
