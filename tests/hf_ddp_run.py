"""A tiny GPT-2 trained by the real `transformers.Trainer` with twa's callback, under torchrun on CPU processes
(DDP over gloo): weights join the basis every 2 steps, TWA trains in their span at the end on each process's
part of the Trainer's batches, and each process saves the model it ends with and the callback's coefficients to
OUT/rank<R>.pt. Used by tests/test_inloop_hf.py.

    python -m torch.distributed.run --nproc-per-node 2 tests/hf_ddp_run.py OUT [alone]

`alone`: each process fits on its own batches only (`TWA.fit(parallel=False)`), to show what the default avoids.
"""

from __future__ import annotations

import sys
from pathlib import Path

import realtools
import torch
from helpers import exit_once_every_rank_has_saved
from transformers import DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from twa_cli.integrations.hf import TWACallback


def main(out: Path, alone: bool) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lines = realtools.simple_text(120, 0).splitlines()
    tokenizer = realtools._byte_bpe_tokenizer(lines)
    ids: list[int] = []
    for line in lines:
        ids += tokenizer(line + "\n")["input_ids"] + [tokenizer.eos_token_id]
    blocks = [{"input_ids": ids[i : i + 32]} for i in range(0, len(ids) - 31, 32)]
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    options = {"epochs": 2, "lr": 0.5, **({"parallel": False} if alone else {})}
    callback = TWACallback(every_steps=2, fit_options=options)
    args = TrainingArguments(output_dir=str(out / "run"), max_steps=8, per_device_train_batch_size=4,
                             learning_rate=3e-3, save_strategy="no", use_cpu=True, report_to="none",
                             disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=blocks, callbacks=[callback],
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    torch.save({"state": {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"},
                "coefficients": callback.result.coefficients, "count": callback.twa.count,
                "world": args.world_size}, out / f"rank{args.process_index}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] == ["alone"])
    exit_once_every_rank_has_saved()
