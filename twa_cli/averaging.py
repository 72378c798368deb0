"""`twa swa`: the uniform average of checkpoints (SWA), streamed file by file."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from twa_cli.batchnorm import has_batchnorm, recalibrate_bn
from twa_cli.checkpoints import (
    Checkpoint,
    check_compatible,
    check_finite,
    make_metadata,
    open_tensors,
    save_checkpoint,
)
from twa_cli.data import load_data
from twa_cli.errors import TwaError
from twa_cli.evaluation import Score, evaluate
from twa_cli.models import build_model, check_fits, load_weights, trainable_names

log = logging.getLogger("twa")


def mean_of(
    ckpts: list[Checkpoint],
    skip: Collection[str] = (),
    progress: Callable[[int, int], None] | None = None,
    compute_dtype: torch.dtype = torch.float64,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The arithmetic mean of every floating tensor (summed in `compute_dtype`, returned in `dtype` or else its
    own dtype); integer tensors (BatchNorm's batch counters) are taken from the last checkpoint. Memory of one
    model."""
    sums: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for done, ckpt in enumerate(ckpts, 1):
        with open_tensors(ckpt.path) as handle:
            for name in handle.keys():
                if name in skip:
                    continue
                try:
                    t = handle.get_tensor(name)
                except Exception as exc:
                    raise TwaError(f"{ckpt.path}: cannot read tensor '{name}'; is the file truncated? ({exc})") from exc
                check_finite(t, f"{ckpt.path}: tensor '{name}'")
                dtypes[name] = t.dtype
                if t.is_floating_point():
                    if name in sums:
                        sums[name] += t
                    else:
                        sums[name] = t.to(compute_dtype)
                else:
                    sums[name] = t.clone()
        if progress is not None:
            progress(done, len(ckpts))
    n = len(ckpts)
    return {k: (v / n).to(dtype or dtypes[k]) if v.is_floating_point() else v for k, v in sums.items()}


@dataclass
class SwaResult:
    path: Path
    count: int
    bn: str  # "recomputed" | "averaged" | "none"
    test: Score | None


def swa(
    ckpts: list[Checkpoint],
    out: str | Path,
    *,
    model: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    bn_update: bool = True,
    bn_batches: int | None = None,
    evaluate_test: bool = True,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    compute_dtype: torch.dtype = torch.float64,
    dtype: torch.dtype | None = None,
    max_shard_size: int | None = None,
) -> SwaResult:
    """Average the checkpoints uniformly, recompute BatchNorm statistics, and write the result to `out`.

    Sums run in `compute_dtype`; floating tensors are written in `dtype`, or each in its own dtype when None
    (an fp16 or bf16 checkpoint stays fp16 or bf16). Above `max_shard_size` bytes the result is sharded."""
    if not ckpts:
        raise TwaError("no checkpoints to average")
    shapes = check_compatible(ckpts)
    out = Path(out)
    arch = model or ckpts[0].arch
    data_spec = data or ckpts[0].data
    net = None
    if arch is not None:  # before the long pass over the files: a model that does not fit fails at once
        net = build_model(arch)
        check_fits(net, shapes, str(ckpts[0].path))
    average = mean_of(ckpts, progress=progress, compute_dtype=compute_dtype, dtype=dtype)
    bn, test, trainable = "none", None, ckpts[0].trainable
    if net is not None:
        load_weights(net, average, "the average")
        trainable = trainable_names(net)
        if has_batchnorm(net):
            bn = "averaged"
        if data_spec is not None and (bn_update or evaluate_test):
            datasets = load_data(data_spec)
            net.to(device)
            if bn_update and has_batchnorm(net):
                recalibrate_bn(net, datasets.train, max_batches=bn_batches, device=device)
                bn = "recomputed"
                average = {k: v.to("cpu") for k, v in net.state_dict().items()}
            if evaluate_test:
                test = evaluate(net, datasets.test, device=device)
    elif any("running_mean" in k or "running_var" in k for k in average):
        bn = "averaged"
    if bn == "averaged":
        log.warning("BatchNorm statistics were averaged, not recomputed (%s)",
                    "--no-bn-update" if arch is not None and data_spec is not None else "no architecture or data known")
    meta = make_metadata(
        "average", arch=arch, data=data_spec, trainable=trainable, command="swa",
        sources=[str(c.path.resolve()) for c in ckpts], coefficients=[1.0 / len(ckpts)] * len(ckpts),
        step=str(ckpts[-1].step) if ckpts[-1].step is not None else None, bn=bn,
        compute_dtype=str(compute_dtype).removeprefix("torch."), dtype=str(dtype).removeprefix("torch.") if dtype else "same as input",
    )
    if dtype is not None:  # after BatchNorm recomputation the model's fp32 state comes back
        average = {k: v.to(dtype) if v.is_floating_point() else v for k, v in average.items()}
    written = save_checkpoint(out, average, meta, max_shard_size=max_shard_size)
    return SwaResult(written, len(ckpts), bn, test)
