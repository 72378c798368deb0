"""TWA inside the training loops users already run: a `transformers.TrainerCallback` (`twa_cli.integrations.hf`)
and a Lightning `Callback` (`twa_cli.integrations.lightning`). Each adds the model's weights to an in-memory basis
at chosen steps or epochs (no checkpoint file is written for it), trains in their span at the end of training or
at a chosen fraction of it (the paper's "train half, then TWA"), optionally stops the run there, and leaves the
result in the trainer's model, saved where that tool saves. They use the tensor core's public API
(`twa_cli.engine`) and nothing else of the package (tests/test_layers.py)."""
