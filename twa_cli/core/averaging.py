"""The arithmetic mean of checkpoint files, each read through once (`twa_cli.io.through`) into the tensor
core's `RunningMean` (memory of the sums and one tensor)."""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from twa_cli.engine.mean import RunningMean
from twa_cli.io.checkpoints import Checkpoint, check_finite, to_storage_dtype
from twa_cli.io.through import read_through


def mean_of(
    ckpts: list[Checkpoint],
    skip: Collection[str] = (),
    progress: Callable[[int, int], None] | None = None,
    compute_dtype: torch.dtype = torch.float64,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The mean of every floating tensor, summed in `compute_dtype` in the checkpoints' order and returned in
    `dtype`, or else in the widest precision any checkpoint stores it in (fp32 and fp16 give fp32; fp16 and
    bf16 give fp32 too); a mean beyond `dtype`'s range is refused. Integer tensors (BatchNorm's batch counters)
    are taken from the last checkpoint."""
    mean = RunningMean(compute_dtype)
    for done, ckpt in enumerate(ckpts, 1):
        mean.add(((name, checked(tensor, f"{ckpt.path}: tensor '{name}'"))
                  for name, tensor in read_through(ckpt.path, ckpt.options, skip=skip)),
                 where=f"{ckpt.path}: ")
        if progress is not None:
            progress(done, len(ckpts))
    return stored(mean, dtype)


def stored(mean: RunningMean, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A running mean's tensors in `dtype`, else each in the widest precision it came in (see `mean_of`)."""
    return {k: to_storage_dtype(v, dtype or mean.widest[k], f"the average's tensor '{k}'") if v.is_floating_point()
            else v for k, v in mean.average().items()}


def checked(tensor: torch.Tensor, what: str) -> torch.Tensor:
    check_finite(tensor, what)
    return tensor
