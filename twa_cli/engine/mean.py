"""The uniform average of weights (SWA), taken one set of tensors at a time, as they come.

Sums are kept in `compute_dtype` (fp64 by default: the mean of many fp32 checkpoints is then exact to fp32's
rounding whatever their number), in the order the tensors were added. Integer tensors (BatchNorm's batch
counters) are not averaged: the last one added is kept. No file is read here: `twa swa` feeds it tensors read
from checkpoints, the training loop's callbacks the model's own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from twa_cli.errors import TwaError


class RunningMean:
    """The mean of every tensor added under a name; `count` is how many sets were added."""

    def __init__(self, compute_dtype: torch.dtype = torch.float64):
        self.compute_dtype = compute_dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.widest: dict[str, torch.dtype] = {}  # the widest precision each tensor came in
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], where: str = "") -> None:
        """Add one set of tensors (a state dict, or (name, tensor) pairs read one at a time). `where` names the
        set in an error."""
        items = tensors.items() if isinstance(tensors, Mapping) else tensors
        for name, t in items:
            t = t.detach()
            if t.is_floating_point():
                self.widest[name] = torch.promote_types(self.widest.get(name, t.dtype), t.dtype)
                if name in self.sums:
                    self.sums[name] += t.to(self.sums[name].device)
                else:
                    self.sums[name] = t.to(self.compute_dtype, copy=True)
            elif name in self.sums and self.sums[name].is_floating_point():
                raise TwaError(f"{where}tensor '{name}' is {t.dtype}, floating in what was added before")
            else:
                self.sums[name] = t.clone()
        self.count += 1

    def average(self) -> dict[str, torch.Tensor]:
        """The mean of each floating tensor in `compute_dtype` (cast it with `widest` in mind), the last of each
        integer one."""
        if not self.count:
            raise TwaError("nothing was added to the average")
        return {k: v / self.count if v.is_floating_point() else v for k, v in self.sums.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums = {k: v.clone() for k, v in state["sums"].items()}
        self.widest = {k: v.dtype for k, v in self.sums.items()}
        self.count = int(state["count"])
