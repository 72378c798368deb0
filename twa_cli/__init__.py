"""twa: Trainable Weight Averaging (Li et al., ICLR 2023) as a command-line tool and a library.

Every command is a function here, taking the same options as the command line, as typed objects:

    import twa_cli as twa

    run = twa.sample("runs/digits", twa.SampleConfig(epochs=12, per_epoch=1))
    twa.swa("runs/digits", "swa.safetensors", twa.SwaRequest(selection=twa.Selection(end=7)))
    result = twa.train_subspace("runs/digits", "runs/twa", twa.SubspaceConfig(selection=twa.Selection(end=7)))
    print(result.test.accuracy, result.report.alpha)

Inside a training loop, without files (`twa_cli.engine`; callbacks for the Hugging Face Trainer and Lightning in
`twa_cli.integrations`):

    averager = twa.TWA(model)
    ...; averager.add(model)                      # after some epochs or steps
    averager.fit(model, train_loader, loss)       # loss(model, batch) -> scalar; the model holds the result

The package is layered, each layer importing only those below it: `units`/`errors`, then `io` (files),
`engine` (the tensor core: no files), `tasks` (models, data, the Task interface), `core` (the algorithms on
checkpoint files), `commands` (one per command), `cli`; `integrations` (training-loop callbacks) use `engine`.
Nothing is imported until it is used, so `twa --version` does not load torch.
"""

from importlib import import_module
from typing import Any

__version__ = "0.2.0"

_API = {
    # commands
    "sample": "twa_cli.commands.sample", "SampleConfig": "twa_cli.commands.sample",
    "swa": "twa_cli.commands.swa", "SwaRequest": "twa_cli.commands.swa",
    "orthogonalize": "twa_cli.commands.orthogonalize", "OrthogonalizeRequest": "twa_cli.commands.orthogonalize",
    "train_subspace": "twa_cli.commands.train_subspace", "SubspaceConfig": "twa_cli.commands.train_subspace",
    "evaluate_checkpoints": "twa_cli.commands.evaluate", "EvalRequest": "twa_cli.commands.evaluate",
    "inspect": "twa_cli.commands.inspect",
    "plot": "twa_cli.commands.plot", "PlotOptions": "twa_cli.commands.plot",
    # what they take
    "Selection": "twa_cli.core.selection", "ReadOptions": "twa_cli.io.readers", "TaskRequest": "twa_cli.tasks.resolve",
    "Task": "twa_cli.tasks.base", "Metrics": "twa_cli.tasks.base", "TaskModel": "twa_cli.tasks.base",
    "TaskData": "twa_cli.tasks.base", "TaskMetrics": "twa_cli.tasks.base",
    "TwaError": "twa_cli.errors",
    # in a training loop (twa_cli.engine, the tensor core; callbacks in twa_cli.integrations)
    "TWA": "twa_cli.engine", "FitResult": "twa_cli.engine", "update_bn": "twa_cli.engine",
    "Orthogonalizer": "twa_cli.engine", "RunningMean": "twa_cli.engine", "SubspaceSGD": "twa_cli.engine",
    "MappedRows": "twa_cli.io.mapped",  # a basis in a file mapped into memory (TWA(..., allocate=MappedRows(dir)))
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'twa_cli' has no attribute '{name}'")
