"""Checkpoint folders laid out the way other tools write them, with tiny tensors.

Each builder returns the state dicts it saved (keys as the bare model names them, in training order), so a
test can compare what the tool reads and averages with what was written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

State = dict[str, torch.Tensor]


def tiny_state(seed: int, dtype: torch.dtype = torch.float32) -> State:
    """A small model with a BatchNorm layer: floating weights, statistics, and an integer counter."""
    g = torch.Generator().manual_seed(seed)
    return {
        "0.weight": torch.randn(3, 4, generator=g).to(dtype),
        "0.bias": torch.randn(3, generator=g).to(dtype),
        "1.weight": torch.rand(3, generator=g).to(dtype),
        "1.bias": torch.randn(3, generator=g).to(dtype),
        "1.running_mean": torch.randn(3, generator=g).to(dtype),
        "1.running_var": torch.rand(3, generator=g).to(dtype) + 0.5,
        "1.num_batches_tracked": torch.tensor(10 * (seed + 1), dtype=torch.int64),
        "2.weight": torch.randn(2, 3, generator=g).to(dtype),
        "2.bias": torch.randn(2, generator=g).to(dtype),
    }


def hf_trainer_folder(root: Path, steps: tuple[int, ...] = (100, 200, 300), dtype: torch.dtype = torch.float32,
                      shards: int = 2) -> list[State]:
    """`Trainer(output_dir=root)`: checkpoint-N/ with a sharded model and its index (`shards=0`: one
    model.safetensors), trainer_state.json and the optimizer/scheduler/rng files, plus the final model saved
    beside them."""
    states = []
    log_history = []
    for i, step in enumerate(steps):
        state = tiny_state(i, dtype)
        states.append(state)
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        names = list(state)
        per = -(-len(names) // max(shards, 1))
        weight_map = {}
        if shards == 0:  # an unsharded model.safetensors
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        for s in range(shards):
            shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in names[s * per:(s + 1) * per]}
            save_file(part, str(folder / shard), metadata={"format": "pt"})
            weight_map.update({k: shard for k in part})
        total = sum(t.numel() * t.element_size() for t in state.values())
        if shards:
            (folder / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
        (folder / "config.json").write_text(json.dumps({"model_type": "tiny"}))
        log_history += [{"epoch": i + 0.5, "step": step, "loss": 1.0 / (i + 1)},
                        {"epoch": i + 0.5, "step": step, "eval_accuracy": [0.7, 0.9, 0.8][i % 3], "eval_loss": 0.5}]
        trainer_state = {"global_step": step, "epoch": i + 0.5, "log_history": log_history}
        (folder / "trainer_state.json").write_text(json.dumps(trainer_state))
        (folder / "optimizer.pt").write_bytes(b"not weights")
        (folder / "scheduler.pt").write_bytes(b"not weights")
        (folder / "rng_state.pth").write_bytes(b"not weights")
        (folder / "training_args.bin").write_bytes(b"not weights")
    save_file(states[-1], str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    return states


def lightning_folder(root: Path, epochs: int = 3) -> list[State]:
    """ModelCheckpoint(save_top_k=-1): epoch=E-step=S.ckpt with `state_dict` under the LightningModule's
    `model.` attribute, next to optimizer states and hyperparameters."""
    root.mkdir(parents=True)
    states = []
    for epoch in range(epochs):
        state = tiny_state(epoch)
        states.append(state)
        step = 10 * (epoch + 1)
        torch.save({
            "epoch": epoch, "global_step": step, "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in state.items()},
            "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}],
            "lr_schedulers": [], "hyper_parameters": {"lr": 0.1, "hidden": 3},
        }, root / f"epoch={epoch}-step={step}.ckpt")
    return states


def timm_folder(root: Path, epochs: int = 3, ema_only: bool = False) -> list[State]:
    """timm's train.py: checkpoint-E.pth.tar with `state_dict` (DataParallel's `module.` prefix), `state_dict_ema`,
    `epoch`, `arch` and the `metric` it ranks by. Returns the raw weights (or the EMA weights if `ema_only`)."""
    root.mkdir(parents=True)
    states = []
    for epoch in range(epochs):
        raw, ema = tiny_state(epoch), tiny_state(100 + epoch)
        states.append(ema if ema_only else raw)
        ckpt = {"epoch": epoch, "arch": "tiny", "metric": [71.5, 74.0, 73.0][epoch % 3],
                "state_dict_ema": ema, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}
        if not ema_only:
            ckpt["state_dict"] = {f"module.{k}": v for k, v in raw.items()}
        torch.save(ckpt, root / f"checkpoint-{epoch}.pth.tar")
    return states


def plain_folder(root: Path, count: int = 3, suffix: str = ".pt", dtype: torch.dtype = torch.float32) -> list[State]:
    """A loop that called torch.save(model.state_dict(), f"epoch{e}.pt")."""
    root.mkdir(parents=True)
    states = []
    for epoch in range(count):
        state = tiny_state(epoch, dtype)
        states.append(state)
        torch.save(state, root / f"epoch{epoch + 1}{suffix}")
    return states


def fairseq_folder(root: Path, count: int = 3) -> list[State]:
    """fairseq's checkpointN.pt: weights under `model`, beside `args`/`cfg` and optimizer history."""
    root.mkdir(parents=True)
    states = []
    for n in range(count):
        state = tiny_state(n)
        states.append(state)
        torch.save({"model": state, "optimizer_history": [{"num_updates": 100 * (n + 1)}],
                    "extra_state": {"epoch": n + 1}, "cfg": {"model": {"dropout": 0.1}}},
                   root / f"checkpoint{n + 1}.pt")
    return states


def arithmetic_mean(states: list[State]) -> State:
    """Reference: the mean of each floating tensor in fp64."""
    return {k: torch.stack([s[k].double() for s in states]).mean(0)
            for k in states[0] if states[0][k].is_floating_point()}
