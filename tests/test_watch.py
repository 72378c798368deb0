"""`twa watch`: following a run folder while a job writes it. The basis it grows one checkpoint at a time equals
`twa orthogonalize` of the same files, its SWA equals `twa swa`; it waits for a checkpoint still being written,
forgets one deleted before it settled, sets aside one that does not fit, survives its own kill -9 (--resume),
and ends with exit 0 once TWA reaches --target (3 when it does not)."""

from __future__ import annotations

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
from helpers import trajectory, write_synthetic_folder

from twa_cli.commands.orthogonalize import orthogonalize
from twa_cli.commands.train_subspace import SubspaceConfig
from twa_cli.commands.watch import WatchRequest, watch
from twa_cli.core.basis_files import load_basis
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import load_tensors
from twa_cli.tasks.resolve import TaskRequest

ROOT = Path(__file__).resolve().parent.parent


class Writer:
    """Stands for the training job: each time the watcher sleeps, the next action runs (copy a checkpoint in,
    write half a file, delete one)."""

    def __init__(self, actions):
        self.actions = list(actions)

    def __call__(self, _seconds: float) -> None:
        if self.actions:
            self.actions.pop(0)()


def _copy(src: Path, run: Path):
    return lambda: shutil.copy(src, run / src.name)


def _model_free(polls: int, every: int = 100) -> WatchRequest:
    # No architecture and no data: the basis and SWA only (a TWA round needs data to train on).
    return WatchRequest(every=every, interval=0.01, settle=0, polls=polls)


def _same_span(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far the rows of `a` are from the span of the orthonormal rows of `b` (0 when a lies in it; with
    as many orthonormal rows each, they span the same subspace)."""
    a, b = a.double(), b.double()
    assert a.shape == b.shape
    return float((a - (a @ b.T) @ b).norm(dim=1).max())


@pytest.fixture
def synthetic(tmp_path: Path) -> list[Path]:
    return write_synthetic_folder(tmp_path / "src", trajectory(6, 300, step=1e-2))


def test_the_grown_basis_and_swa_equal_the_commands_on_the_same_files(tmp_path: Path, synthetic, twa):
    run = tmp_path / "run"
    run.mkdir()
    result = watch(run, tmp_path / "out", _model_free(polls=14), sleep=Writer(_copy(p, run) for p in synthetic))
    assert result.checkpoints == 6 and result.ended == "polls"
    # The last round of a model-free run writes the basis only (TWA needs the model and its data).
    assert [(r.checkpoints, r.twa) for r in result.rounds] == [(6, None)]
    ref = load_basis(orthogonalize(run, tmp_path / "ref.safetensors").path)
    assert _same_span(load_basis(tmp_path / "out" / "basis.safetensors").vectors, ref.vectors) < 1e-6
    state = json.loads((tmp_path / "out" / "watch-state" / "state.json").read_text())
    assert state["rank"] == ref.rank == 6
    rows = torch.stack([load_tensors(tmp_path / "out" / "watch-state" / "rows" / f"row-{i:05d}.safetensors")["row"]
                        for i in range(6)])
    assert _same_span(rows, ref.vectors) < 1e-6
    twa("swa", run, "-o", tmp_path / "swa.safetensors")
    ours, theirs = load_tensors(tmp_path / "out" / "swa.safetensors"), load_tensors(tmp_path / "swa.safetensors")
    assert ours.keys() == theirs.keys()
    assert torch.allclose(ours["w"], theirs["w"], rtol=0, atol=1e-6)


def test_a_checkpoint_being_written_is_waited_for_and_a_deleted_one_forgotten(tmp_path: Path, synthetic):
    run = tmp_path / "run"
    run.mkdir()
    whole = synthetic[0].read_bytes()
    half = run / synthetic[0].name
    gone = run / synthetic[1].name
    actions = [
        lambda: half.write_bytes(whole[: len(whole) // 2]),  # the writer is halfway through
        lambda: None,  # ... and stays there (a settled but unreadable file)
        lambda: shutil.copy(synthetic[1], gone),
        lambda: gone.unlink(),  # deleted before it settled
        lambda: half.write_bytes(whole),  # the write completes
        lambda: None,
    ]
    result = watch(run, tmp_path / "out", _model_free(polls=8), sleep=Writer(actions))
    state = json.loads((tmp_path / "out" / "watch-state" / "state.json").read_text())
    assert result.checkpoints == 1
    assert [Path(s["path"]).name for s in state["sources"]] == [synthetic[0].name]
    assert state["set_aside"] == {}


def test_a_checkpoint_that_does_not_fit_or_holds_nan_is_set_aside(tmp_path: Path, synthetic):
    run = tmp_path / "run"
    run.mkdir()
    odd = write_synthetic_folder(tmp_path / "odd", torch.ones(1, 7), name="w")[0]
    nan = write_synthetic_folder(tmp_path / "nan", torch.full((1, 300), float("nan")), name="w")[0]
    actions = [_copy(synthetic[0], run), lambda: shutil.copy(odd, run / "c9000.safetensors"),
               lambda: shutil.copy(nan, run / "c9001.safetensors")]
    result = watch(run, tmp_path / "out", _model_free(polls=6), sleep=Writer(actions))
    assert result.checkpoints == 1
    reasons = {Path(k).name: v for k, v in result.set_aside.items()}
    assert set(reasons) == {"c9000.safetensors", "c9001.safetensors"}
    assert "does not fit" in reasons["c9000.safetensors"] and "NaN" in reasons["c9001.safetensors"]


def test_resume_after_a_stop_goes_on_with_the_same_basis(tmp_path: Path, synthetic):
    run = tmp_path / "run"
    run.mkdir()
    for p in synthetic[:3]:
        shutil.copy(p, run)
    watch(run, tmp_path / "out", _model_free(polls=2), sleep=lambda s: None)
    for p in synthetic[3:]:
        shutil.copy(p, run)
    with pytest.raises(TwaError, match="already exists"):
        watch(run, tmp_path / "out", _model_free(polls=2), sleep=lambda s: None)
    result = watch(run, tmp_path / "out", _model_free(polls=2), sleep=lambda s: None, resume=True)
    assert result.checkpoints == 6
    state = json.loads((tmp_path / "out" / "watch-state" / "state.json").read_text())
    assert [Path(s["path"]).name for s in state["sources"]] == [p.name for p in synthetic]


def test_killed_with_sigkill_it_resumes_to_the_basis_of_an_uninterrupted_watch(tmp_path: Path):
    src = write_synthetic_folder(tmp_path / "src", trajectory(12, 200_000, step=1e-2))
    run = tmp_path / "run"
    run.mkdir()
    for p in src:
        shutil.copy(p, run)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "twa_cli", "watch", str(run), "-o", str(out), "--settle", "0", "--interval", "0.05",
            "--polls", "3"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "watch-state" / "state.json"
    deadline = time.monotonic() + 60
    count = 0
    while time.monotonic() < deadline and proc.poll() is None:
        count = json.loads(state.read_text() or "{}").get("count", 0) if state.exists() else 0
        if count >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and 2 <= count < 12  # killed while taking checkpoints in
    done = subprocess.run([*argv, "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    saved = json.loads(state.read_text())
    assert saved["count"] == 12 and [Path(s["path"]).name for s in saved["sources"]] == [p.name for p in src]
    rows = torch.stack([load_tensors(out / "watch-state" / "rows" / f"row-{i:05d}.safetensors")["row"]
                        for i in range(saved["rank"])])
    reference = load_basis(orthogonalize(run, tmp_path / "ref.safetensors").path)
    assert saved["rank"] == reference.rank
    assert _same_span(rows, reference.vectors) < 1e-5


def test_rounds_train_in_the_grown_span_and_target_ends_the_watch(tmp_path: Path, mlp_run: Path, twa):
    ckpts = sorted(p for p in mlp_run.iterdir() if p.name.startswith("ckpt"))
    run = tmp_path / "run"
    run.mkdir()
    seen = []
    request = WatchRequest(subspace=SubspaceConfig(epochs=1, device="cpu", task=TaskRequest(data="digits")),
                           every=3, interval=0.01, settle=0, polls=len(ckpts) + 2)
    result = watch(run, tmp_path / "out", request, sleep=Writer(_copy(p, run) for p in ckpts), on_round=seen.append)
    assert [r.checkpoints for r in result.rounds] == [3, 6, len(ckpts)][: len(result.rounds)]
    assert result.rounds[-1].checkpoints == len(ckpts)
    last = result.rounds[-1]
    assert last.metric == "max:accuracy" and last.twa >= last.swa  # never worse than its start on the split
    lines = [json.loads(x) for x in (tmp_path / "out" / "watch.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [r.round for r in seen] == list(range(1, len(seen) + 1))
    coefficients = json.loads((tmp_path / "out" / "twa" / "coefficients.json").read_text())
    assert len(coefficients["coefficients"]) == len(coefficients["sources"]) == len(ckpts)
    # The CLI: a target already met ends it at the first round with 0; one that cannot be met, with 3.
    met = twa("watch", run, "-o", tmp_path / "met", "--data", "digits", "--device", "cpu", "--epochs", "1",
              "--every", "3", "--settle", "0", "--interval", "0.01", "--polls", "5", "--target", "0", "--json")
    report = json.loads(met.stdout)
    assert report["ended"] == "target" and report["reached"] and len(report["rounds"]) == 1
    missed = twa("watch", run, "-o", tmp_path / "missed", "--data", "digits", "--device", "cpu", "--epochs", "1",
                 "--every", "100", "--settle", "0", "--interval", "0.01", "--polls", "2", "--target", "101",
                 check=False)
    assert missed.returncode == 3, missed.stderr


@pytest.mark.parametrize("case", ["not-a-folder", "output-inside-run", "nothing-to-resume", "bad-interval",
                                  "target-without-model"])
def test_bad_input_is_one_line(tmp_path: Path, synthetic, twa, case):
    run = synthetic[0].parent
    args = {"not-a-folder": [synthetic[0], "-o", tmp_path / "out"],
            "output-inside-run": [run, "-o", run / "watch"],
            "nothing-to-resume": [run, "-o", tmp_path / "out", "--resume"],
            "bad-interval": [run, "-o", tmp_path / "out", "--interval", "-1"],
            "target-without-model": [run, "-o", tmp_path / "out", "--target", "90", "--settle", "0",
                                     "--interval", "0.01", "--polls", "3"]}[case]
    before = sorted(p.name for p in run.iterdir())
    result = twa("watch", *args, *([] if "--polls" in args else ["--polls", "1"]), check=False)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in run.iterdir()) == before
    assert not (tmp_path / "out").exists() or case == "nothing-to-resume"


def test_watching_a_live_transformers_trainer_run(tmp_path: Path, twa):
    """The real Trainer writes its checkpoint-* folders (and its final model beside them) in another process
    while the watch follows the folder; the watch ends after the writer has been idle. Every checkpoint folder is
    taken in once, the final model copy is not, and SWA and TWA are Hugging Face folders that load back."""
    from realtools import _write_tsv, sentiment_sentences
    from transformers import AutoModelForSequenceClassification

    root = tmp_path / "bert"
    val = _write_tsv(tmp_path / "val.tsv", sentiment_sentences(128, 2000))  # held-out sentences to choose on
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen([sys.executable, str(ROOT / "tests" / "realtools.py"), "build_hf_classifier_run",
                               str(root), "0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (root / "run").is_dir() and time.monotonic() < deadline:  # the Trainer makes its output_dir
            time.sleep(0.1)
        request = WatchRequest(subspace=SubspaceConfig(epochs=1, device="cpu", batch_size=16,
                                                       task=TaskRequest(data=str(root / "data" / "train.tsv"),
                                                                        val_data=str(val))),
                               every=2, interval=0.2, settle=0.5, idle_exit=3600)
        calls_after_exit = []

        def clock() -> float:
            # Idle for good once the writer has exited and the watch has looked a dozen times more, seconds apart
            # (however slowly a loaded machine runs the Trainer, its pauses never end the watch early).
            if writer.poll() is not None:
                calls_after_exit.append(time.monotonic())
                if len(calls_after_exit) > 24 and calls_after_exit[-1] - calls_after_exit[0] > 3:
                    return time.monotonic() + 1e6
            return time.monotonic()

        result = watch(root / "run", tmp_path / "out", request, clock=clock)
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0, writer.stderr.read().decode()[-2000:] if writer.stderr else ""
    checkpoints = sorted((root / "run").glob("checkpoint-*"))
    assert result.checkpoints == len(checkpoints) == 4 and result.ended == "idle"
    state = json.loads((tmp_path / "out" / "watch-state" / "state.json").read_text())
    assert sorted(Path(s["path"]).name for s in state["sources"]) == [p.name for p in checkpoints]
    assert result.rounds[-1].checkpoints == 4 and result.rounds[-1].twa is not None
    reference = load_basis(orthogonalize(root / "run", tmp_path / "ref.safetensors").path)
    assert _same_span(load_basis(tmp_path / "out" / "basis.safetensors").vectors, reference.vectors) < 1e-5
    loaded = {}
    for name in ("swa", "twa"):
        loaded[name], info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / name,
                                                                               output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
    twa("swa", root / "run", "-o", tmp_path / "reference-swa")
    reference_swa = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reference-swa").state_dict()
    for key, value in loaded["swa"].state_dict().items():
        assert torch.allclose(value, reference_swa[key], rtol=0, atol=1e-6), key


def test_two_watchers_of_one_output_the_second_is_refused(tmp_path: Path, synthetic):
    from filelock import FileLock

    out = tmp_path / "out"
    with FileLock(tmp_path / ".out.lock"), pytest.raises(TwaError, match="another twa watch"):
        watch(synthetic[0].parent, out, _model_free(polls=1), sleep=lambda s: None)
    assert not out.exists()


def test_a_sharded_checkpoint_is_taken_in_once_its_index_and_every_shard_are_there(tmp_path: Path):
    """A shard set arrives file by file (here the index first, as a writer that names its shards up front would):
    the watch waits until every shard the index names is there and settled, then reads it whole."""
    from twa_cli.io.checkpoints import make_metadata
    from twa_cli.io.writers import ResultTarget, write_result

    staging = tmp_path / "staging"
    weights = trajectory(2, 300, seed=5).float()
    sets = []
    for i, step in enumerate((100, 200)):
        folder = staging / str(step)
        folder.mkdir(parents=True)
        tensors = {"w": weights[i], "v": torch.full((40,), float(i))}
        index = write_result(ResultTarget(folder / f"c{step:04d}.safetensors", max_shard_size=800), tensors,
                             make_metadata("checkpoint", step=str(step), trainable=["w"]), force=False)
        shards = sorted(p for p in folder.iterdir() if p != index)
        assert index.name.endswith(".index.json") and len(shards) >= 2
        sets.append((index, shards))
    run = tmp_path / "run"
    run.mkdir()
    (first_index, first_shards), (index, shards) = sets
    actions = [lambda: [shutil.copy(p, run) for p in (*first_shards, first_index)],
               _copy(index, run), lambda: None, lambda: None, *[_copy(p, run) for p in shards], lambda: None]
    counts = []

    def sleeping(seconds: float) -> None:
        state = tmp_path / "out" / "watch-state" / "state.json"
        counts.append(json.loads(state.read_text())["count"] if state.exists() else 0)
        writer(seconds)

    writer = Writer(actions)
    result = watch(run, tmp_path / "out", _model_free(polls=len(actions) + 2), sleep=sleeping)
    assert result.checkpoints == 2 and result.set_aside == {}
    assert counts[len(actions) - 1] == 1  # nothing taken from the second set while one of its shards was missing
    swa = load_tensors(tmp_path / "out" / "swa.safetensors")
    assert torch.allclose(swa["w"], weights.mean(dim=0), rtol=0, atol=1e-6)
    assert torch.allclose(swa["v"], torch.full((40,), 0.5))


def test_a_trainer_deleting_its_oldest_checkpoints_does_not_break_the_rounds(tmp_path: Path):
    """save_total_limit: the Trainer deletes its oldest checkpoint folders, the first one taken in (whose config
    and tokenizer the basis had named) among them; later rounds build the model from a folder still there."""
    from realtools import _write_tsv, build_hf_classifier_run, sentiment_sentences

    bert = build_hf_classifier_run(tmp_path / "bert", save_final=False)
    val = _write_tsv(tmp_path / "val.tsv", sentiment_sentences(128, 2000))
    checkpoints = sorted(bert.run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    run = tmp_path / "run"
    run.mkdir()
    actions = [lambda: shutil.copytree(checkpoints[0], run / checkpoints[0].name), lambda: None,
               lambda: shutil.rmtree(run / checkpoints[0].name),  # rotated away once taken in
               *[lambda c=c: shutil.copytree(c, run / c.name) for c in checkpoints[1:]], lambda: None]
    request = WatchRequest(subspace=SubspaceConfig(epochs=1, device="cpu", batch_size=16,
                                                   task=TaskRequest(data=str(bert.train), val_data=str(val))),
                           every=2, interval=0.01, settle=0, polls=len(actions) + 2)
    result = watch(run, tmp_path / "out", request, sleep=Writer(actions))
    assert result.checkpoints == len(checkpoints) == 4
    assert [r.checkpoints for r in result.rounds] == [2, 4] and all(r.twa is not None for r in result.rounds)
    assert (tmp_path / "out" / "twa" / "config.json").exists() and (tmp_path / "out" / "swa" / "config.json").exists()


def test_force_replaces_an_earlier_watch_whole_or_not_at_all(tmp_path: Path, synthetic):
    """--force set the earlier watch aside and removed it only once the new one held a checkpoint: a new watch
    that takes nothing in leaves the old output as it was; one that does replaces it; a file of the user's in it
    is refused."""
    from helpers import snapshot

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(synthetic[0], run)
    out = tmp_path / "out"
    watch(run, out, _model_free(polls=2), sleep=lambda s: None)
    before = snapshot(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    watch(empty, out, _model_free(polls=2), sleep=lambda s: None, force=True)
    assert snapshot(out) == before and not [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    shutil.copy(synthetic[1], run)
    result = watch(run, out, _model_free(polls=2), sleep=lambda s: None, force=True)
    assert result.checkpoints == 2 and not [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TwaError, match=r"notes\.txt"):
        watch(run, out, _model_free(polls=2), sleep=lambda s: None, force=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_order_is_natural_and_a_fifo_is_left_out_without_ending_the_watch(tmp_path: Path):
    """checkpoint-1000 sorted before checkpoint-500 when several were taken in one look (the last source, whose
    step an average records, was not the newest); a FIFO named like a checkpoint ended the whole watch."""
    src = write_synthetic_folder(tmp_path / "src", trajectory(3, 50))
    run = tmp_path / "run"
    run.mkdir()
    for step, path in zip((500, 1000, 20), src, strict=True):
        shutil.copy(path, run / f"ckpt-{step}.safetensors")
    os.mkfifo(run / "ckpt-9999.safetensors")
    result = watch(run, tmp_path / "out", _model_free(polls=3), sleep=lambda s: None)
    state = json.loads((tmp_path / "out" / "watch-state" / "state.json").read_text())
    assert result.checkpoints == 3
    assert [Path(s["path"]).name for s in state["sources"]] == ["ckpt-20.safetensors", "ckpt-500.safetensors",
                                                                 "ckpt-1000.safetensors"]


def test_a_checkpoint_saved_again_under_the_same_name_is_taken_in_again(tmp_path: Path, synthetic):
    """A loop that saves every epoch over one weights file had only its first epoch taken in, without a word."""
    run = tmp_path / "run"
    run.mkdir()
    target = run / "weights.safetensors"

    def save(i):
        def write():
            shutil.copy(synthetic[i], target)
            os.utime(target, ns=(10**9 * (i + 1), 10**9 * (i + 1)))  # distinct times even on a coarse clock
        return write

    actions = [save(0), lambda: None, save(1), lambda: None, save(2), lambda: None]
    result = watch(run, tmp_path / "out", _model_free(polls=len(actions) + 2), sleep=Writer(actions))
    assert result.checkpoints == 3
    ours = load_tensors(tmp_path / "out" / "swa.safetensors")["w"]
    expected = torch.stack([load_tensors(p)["w"] for p in synthetic[:3]]).double().mean(dim=0)
    assert torch.allclose(ours.double(), expected, rtol=0, atol=1e-6)


def test_swa_of_a_bfloat16_run_is_written_in_bfloat16_as_twa_swa_writes_it(tmp_path: Path, twa):
    from twa_cli.io.checkpoints import make_metadata
    from twa_cli.io.safetensors import save_tensors

    run = tmp_path / "run"
    run.mkdir()
    for i, row in enumerate(trajectory(3, 64, step=1e-1)):
        save_tensors(run / f"c{i}.safetensors", {"w": row.to(torch.bfloat16)},
                     make_metadata("checkpoint", step=str(i), trainable=["w"]))
    watch(run, tmp_path / "out", _model_free(polls=3), sleep=lambda s: None)
    twa("swa", run, "-o", tmp_path / "swa.safetensors")
    ours = load_tensors(tmp_path / "out" / "swa.safetensors")["w"]
    theirs = load_tensors(tmp_path / "swa.safetensors")["w"]
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)


def test_a_shard_set_that_never_completes_is_reported_once(tmp_path: Path, synthetic, caplog):
    import logging

    from twa_cli.commands.watch import INCOMPLETE_LOOKS

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(synthetic[0], run)
    index = {"metadata": {}, "weight_map": {"w": "c9000-00001-of-00002.safetensors",
                                             "v": "c9000-00002-of-00002.safetensors"}}
    (run / "c9000.safetensors.index.json").write_text(json.dumps(index))  # its shards never come
    with caplog.at_level(logging.WARNING, logger="twa"):
        result = watch(run, tmp_path / "out", _model_free(polls=INCOMPLETE_LOOKS + 5), sleep=lambda s: None)
    assert result.checkpoints == 1
    said = [r.getMessage() for r in caplog.records if "still incomplete" in r.getMessage()]
    assert len(said) == 1 and "c9000.safetensors.index.json" in said[0]
