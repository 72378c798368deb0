"""The tensor core: TWA on tensors already in memory, with no file read or written and no flag parsed.

`Orthogonalizer` grows an orthonormal basis one weight vector (or block) at a time; `RunningMean` is the uniform
average (SWA); `SubspaceSGD` is eq. 8 as a torch optimizer whose whole state is in `state_dict()`, run on any
`Projector` (where the basis lives; `Projection` holds the whole of it in this process); the one training loop
(`loop.train_epochs`); BatchNorm recomputation; processes fitting together under DDP (`parallel`); and `TWA`, the
in-loop API built on them. The commands feed them what they read from files; the callbacks of `twa_cli.integrations`
feed them a trainer's model. Nothing here imports `twa_cli.io`, tasks, commands or the CLI (tests/test_layers.py),
and nothing is imported until used.
"""

from importlib import import_module
from typing import Any

_API = {
    "TWA": "twa_cli.engine.api", "FitResult": "twa_cli.engine.api", "update_bn": "twa_cli.engine.api",
    "Orthogonalizer": "twa_cli.engine.orthogonalizer", "RunningMean": "twa_cli.engine.mean",
    "SubspaceSGD": "twa_cli.engine.subspace", "FlatParameters": "twa_cli.engine.subspace",
    "Projector": "twa_cli.engine.subspace", "Projection": "twa_cli.engine.subspace",
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'twa_cli.engine' has no attribute '{name}'")
