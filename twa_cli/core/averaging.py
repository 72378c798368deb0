"""The arithmetic mean of checkpoints, streamed file by file (memory of one model)."""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import Checkpoint, check_finite, open_tensors, to_storage_dtype


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
    sums: dict[str, torch.Tensor] = {}
    widest: dict[str, torch.dtype] = {}
    for done, ckpt in enumerate(ckpts, 1):
        with open_tensors(ckpt) as handle:
            for name in handle.keys():
                if name in skip:
                    continue
                t = handle.get(name)
                check_finite(t, f"{ckpt.path}: tensor '{name}'")
                if t.is_floating_point():
                    widest[name] = torch.promote_types(widest.get(name, t.dtype), t.dtype)
                    if name in sums:
                        sums[name] += t
                    else:
                        sums[name] = t.to(compute_dtype)
                elif name in sums and sums[name].is_floating_point():
                    raise TwaError(f"{ckpt.path}: tensor '{name}' is {t.dtype}, floating in the other checkpoints")
                else:
                    sums[name] = t.clone()
        if progress is not None:
            progress(done, len(ckpts))
    n = len(ckpts)
    return {k: to_storage_dtype(v / n, dtype or widest[k], f"the average's tensor '{k}'") if v.is_floating_point()
            else v for k, v in sums.items()}
