import json
import pickle

import pytest
import torch
from layouts import fairseq_folder, hf_trainer_folder, lightning_folder, plain_folder, timm_folder, tiny_state
from safetensors.torch import save_file

from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import (
    check_compatible,
    list_folder,
    load_tensors,
    make_metadata,
    open_tensors,
    read_checkpoint,
    sha256_file,
)
from twa_cli.io.readers import ReadOptions, ShardedReader, open_reader
from twa_cli.io.writers import ResultTarget, write_result
from twa_cli.units import parse_size


def assert_same(got, expected):
    assert list(got) == list(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k


def test_hf_trainer_folder_lists_checkpoint_folders_by_step_and_skips_the_final_copy(tmp_path):
    states = hf_trainer_folder(tmp_path / "run", steps=(500, 1000, 1500))
    ckpts = list_folder(tmp_path / "run")
    assert [c.path.name for c in ckpts] == ["checkpoint-500", "checkpoint-1000", "checkpoint-1500"]
    assert [c.step for c in ckpts] == [500, 1000, 1500]
    assert [c.epoch for c in ckpts] == [0.5, 1.5, 2.5]
    assert json.loads(ckpts[1].meta["metrics"])["eval_accuracy"] == 0.9
    assert ckpts[0].format == "hf sharded"
    for ckpt, state in zip(ckpts, states, strict=True):
        assert_same(load_tensors(ckpt.path), state)
    assert check_compatible(ckpts).shapes["0.weight"] == (3, 4)


def test_sharded_index_opens_only_the_shard_it_needs(tmp_path):
    hf_trainer_folder(tmp_path / "run", steps=(1,), shards=3)
    with ShardedReader(tmp_path / "run" / "checkpoint-1" / "model.safetensors.index.json") as reader:
        assert len(reader.shards()) == 3
        assert not reader._open
        assert reader.shape("2.bias") == (2,)
        assert [p.name for p in reader._open] == ["model-00003-of-00003.safetensors"]
        reader.get("0.weight")
        assert len(reader._open) == 2


def test_a_single_hf_model_folder_is_one_checkpoint(tmp_path):
    hf_trainer_folder(tmp_path / "run", steps=(7,))
    assert [c.path for c in list_folder(tmp_path / "run" / "checkpoint-7")] == [tmp_path / "run" / "checkpoint-7"]


def test_lightning_ckpt_unwraps_state_dict_and_strips_model_prefix(tmp_path):
    states = lightning_folder(tmp_path / "lightning")
    ckpts = list_folder(tmp_path / "lightning")
    assert [c.step for c in ckpts] == [10, 20, 30] and [c.epoch for c in ckpts] == [0.0, 1.0, 2.0]
    assert ckpts[0].meta["wrapper"] == "state_dict"
    for ckpt, state in zip(ckpts, states, strict=True):
        assert_same(load_tensors(ckpt.path), state)


def test_timm_pth_tar_prefers_state_dict_like_timm_and_falls_back_to_ema(tmp_path):
    raw = timm_folder(tmp_path / "timm")
    ckpts = list_folder(tmp_path / "timm")
    assert [c.path.name for c in ckpts] == [f"checkpoint-{e}.pth.tar" for e in range(3)]
    assert ckpts[2].meta["metric"] == "73"
    for ckpt, state in zip(ckpts, raw, strict=True):
        assert_same(load_tensors(ckpt.path), state)  # `module.` stripped
    ema = timm_folder(tmp_path / "ema", ema_only=True)
    assert_same(load_tensors(tmp_path / "ema" / "checkpoint-1.pth.tar"), ema[1])
    assert read_checkpoint(tmp_path / "ema" / "checkpoint-1.pth.tar").meta["wrapper"] == "state_dict_ema"


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_plain_state_dict_files_in_natural_order(tmp_path, suffix):
    states = plain_folder(tmp_path / "plain", count=11, suffix=suffix)
    ckpts = list_folder(tmp_path / "plain")
    assert [c.path.name for c in ckpts] == [f"epoch{e}{suffix}" for e in range(1, 12)]
    assert_same(load_tensors(ckpts[10].path), states[10])


def test_fairseq_model_key(tmp_path):
    states = fairseq_folder(tmp_path / "fs")
    assert_same(load_tensors(list_folder(tmp_path / "fs")[2].path), states[2])


def test_explicit_strip_prefix_reaches_path_based_readers(tmp_path):
    folder = tmp_path / "pref"
    folder.mkdir()
    torch.save({f"backbone.{k}": v for k, v in tiny_state(0).items()}, folder / "a.pt")
    assert "backbone.0.weight" in load_tensors(folder / "a.pt")
    ckpts = list_folder(folder, ReadOptions(strip_prefix="backbone."))
    with open_tensors(ckpts[0]) as handle:  # the way averaging and basis code open a checkpoint
        assert "0.weight" in handle.keys()
        assert handle.shape("0.weight") == (3, 4)
        assert handle.dtype("0.weight") == torch.float32


def test_a_pickle_with_python_objects_is_refused_not_executed_but_timm_args_are_read(tmp_path):
    class Hook:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": tiny_state(0), "hook": Hook()}, fh)
    with pytest.raises(TwaError, match="pickled Python objects") as info:
        read_checkpoint(tmp_path / "evil.pt")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "PWNED").exists()
    # timm's train.py saves its argparse.Namespace as `args`: allowed under weights_only, so the file is read
    torch.save({"state_dict": tiny_state(0), "args": argparse_namespace()}, tmp_path / "args.pt")
    assert read_checkpoint(tmp_path / "args.pt").meta["wrapper"] == "state_dict"
    assert_same(load_tensors(tmp_path / "args.pt"), tiny_state(0))
    # any other class is still refused
    torch.save({"state_dict": tiny_state(0), "extra": Custom(1)}, tmp_path / "custom.pt")
    with pytest.raises(TwaError, match="pickled Python objects") as info:
        read_checkpoint(tmp_path / "custom.pt")
    assert "\n" not in str(info.value)


class Custom:
    def __init__(self, value):
        self.value = value


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=0.1)


def test_training_side_files_and_damaged_files(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    torch.save(tiny_state(0), folder / "model_1.pt")
    torch.save({"state": {}}, folder / "optimizer.pt")
    (folder / "notes.txt").write_text("hello")
    assert [c.path.name for c in list_folder(folder)] == ["model_1.pt"]
    (folder / "broken.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(TwaError, match=r"broken\.pt"):
        list_folder(folder)


def test_sharded_writer_round_trips_and_reads_back_lazily(tmp_path):
    state = tiny_state(3)
    meta = make_metadata("average", command="swa", sources=["a", "b"], coefficients=[0.5, 0.5])
    written = write_result(ResultTarget(tmp_path / "avg.safetensors", max_shard_size=60), state, meta, force=False)
    assert written.name == "avg.safetensors.index.json"
    shards = sorted(p.name for p in tmp_path.glob("avg-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"avg-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "avg.safetensors").exists()
    assert_same(load_tensors(written), state)
    ckpt = read_checkpoint(written)
    assert ckpt.kind == "average" and ckpt.json_field("coefficients") == [0.5, 0.5]
    assert ckpt.meta["format"] == "pt" and ckpt.meta["twa"] == "twa/1"
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert json.loads(written.read_text())["metadata"]["total_size"] == total
    assert len(sha256_file(written)) == 64
    # a smaller result written over it (--force) leaves no stale shards behind
    single = write_result(ResultTarget(tmp_path / "avg.safetensors", max_shard_size=10**9), state, meta, force=True)
    assert single.name == "avg.safetensors" and not list(tmp_path.glob("avg-*")) and not written.exists()


def test_writer_to_a_folder_uses_hugging_face_names(tmp_path):
    written = write_result(ResultTarget(tmp_path / "out", max_shard_size=100), tiny_state(0), {}, force=False)
    assert written == tmp_path / "out" and (written / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    assert_same(load_tensors(tmp_path / "out"), tiny_state(0))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1000") == 1000
    assert parse_size("1.5MB") == 1_500_000
    with pytest.raises(TwaError, match="--max-shard-size"):
        parse_size("lots")


def test_unknown_suffix_is_one_line(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(TwaError, match="not a checkpoint the tool reads"):
        open_reader(tmp_path / "w.npz")


def test_legacy_torch_format_and_peft_adapter_folders(tmp_path):
    torch.save(tiny_state(1), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert_same(load_tensors(tmp_path / "old.pt"), tiny_state(1))
    run = tmp_path / "lora"
    for step in (10, 20):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        save_file({"base_model.model.q.lora_A.weight": torch.full((2, 4), float(step))},
                  str(run / f"checkpoint-{step}" / "adapter_model.safetensors"))
    ckpts = list_folder(run)
    assert [c.step for c in ckpts] == [10, 20]
    assert float(load_tensors(ckpts[1].path)["base_model.model.q.lora_A.weight"][0, 0]) == 20.0


def test_a_checkpoint_name_that_is_not_a_regular_file_is_refused_not_skipped(tmp_path):
    """A FIFO (or socket, device) named like a checkpoint was left out of the listing without a word, so an
    average silently had one checkpoint fewer than the folder shows; reading it would block forever."""
    import os

    from helpers import write_synthetic_folder

    write_synthetic_folder(tmp_path, torch.randn(2, 5))
    os.mkfifo(tmp_path / "c9999.safetensors")
    with pytest.raises(TwaError, match=r"c9999\.safetensors: is not a regular file"):
        list_folder(tmp_path)
