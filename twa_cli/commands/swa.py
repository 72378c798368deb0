"""`twa swa`: the uniform average of checkpoints (SWA), or the greedy soup, BatchNorm recomputed, written in the
layout the output path asks for."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from twa_cli.commands.common import (
    aligned,
    check_held_out,
    compatible,
    data_inputs,
    described,
    hf_folder,
    knows_task,
    pick,
    resolve_device,
    task_of,
)
from twa_cli.commands.estimates import Plan, plan_swa
from twa_cli.core.averaging import mean_of
from twa_cli.core.batchnorm import recalibrate_bn
from twa_cli.core.evaluation import score_if_any
from twa_cli.core.selection import Selection
from twa_cli.core.soups import greedy_soup
from twa_cli.engine.batchnorm import has_batchnorm
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import Checkpoint, Source, check_compatible, make_metadata, to_storage_dtype
from twa_cli.io.outputs import check_not_an_input
from twa_cli.io.readers import ReadOptions
from twa_cli.io.writers import ResultTarget, write_result
from twa_cli.tasks.base import Metrics, Task
from twa_cli.tasks.models import check_fits, load_weights, trainable_names
from twa_cli.tasks.resolve import TaskRequest
from twa_cli.units import STORAGE_DTYPES, torch_dtype

log = logging.getLogger("twa")


@dataclass
class SwaRequest:
    selection: Selection = field(default_factory=Selection)
    read: ReadOptions = field(default_factory=ReadOptions)
    task: TaskRequest = field(default_factory=TaskRequest)
    bn_update: bool = True
    bn_batches: int | None = None
    greedy: bool = False  # the greedy soup (needs a validation split: the flags', else the checkpoints')
    compute_dtype: str = "float64"  # precision of the sums
    dtype: str | None = None  # precision of the result; None: each tensor's own (the widest among the checkpoints)
    max_shard_size: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.compute_dtype not in ("float64", "float32"):
            raise TwaError(f"--compute-dtype must be float64 or float32 (got '{self.compute_dtype}')")
        if self.dtype is not None and self.dtype not in STORAGE_DTYPES:
            raise TwaError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)} (got '{self.dtype}')")


@dataclass
class SwaResult:
    path: Path
    sources: list[Path]
    bn: str  # "recomputed" | "averaged" | "none"
    test: Metrics | None
    # The greedy soup: positions of the checkpoints it kept, each one's held-out figure, the soup's.
    chosen: list[int] | None = None
    individual: list[float] | None = None
    val: float | None = None
    metric: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"output": str(self.path), "checkpoints": len(self.sources), "batchnorm": self.bn,
                               "sources": [str(p) for p in self.sources],
                               "test": self.test.to_dict() if self.test else None}
        if self.chosen is not None:
            out.update(chosen=self.chosen, individual_val=self.individual, val=self.val, metric=self.metric)
        return out


def swa(folder: str | Path, output: str | Path, request: SwaRequest | None = None, *, force: bool = False,
        dry_run: bool = False, progress: Callable[[int, int], None] | None = None,
        invocation: dict[str, Any] | None = None) -> SwaResult | Plan:
    """Average the selected checkpoints of `folder` uniformly (or greedily), recompute BatchNorm statistics,
    and write the result to `output` (see `twa_cli.io.writers` for the layouts). With `dry_run`, the plan."""
    request = request or SwaRequest()
    ckpts = pick(folder, request.selection, request.read)
    source_folder = ckpts[-1].path if ckpts[-1].path.is_dir() else None
    target = ResultTarget(Path(output), request.max_shard_size, source_folder)
    target.check(force, [Path(folder)])
    layout = compatible(ckpts)
    device = resolve_device(request.device)
    task = task_of(request.task, ckpts[0], need_data=False) if _needs_model(request.task, ckpts[0]) else None
    if task is not None:
        check_not_an_input(target.path, data_inputs(task), folder=target.folder)  # the data is an input too
    if request.greedy and task is not None:
        _one_recorded_split(request.task, ckpts)
        check_held_out(task, "--greedy")  # the split the flags or the checkpoints name, before the model is built
    net = None
    if task is not None:  # before the long pass over the files: a model that does not fit fails at once
        net = task.build_model()
        ckpts = aligned(ckpts, net)
        layout = check_compatible(ckpts)
        check_fits(net, layout.shapes, str(ckpts[0].path))
    has_data = task is not None and task.has_data
    if request.greedy and not has_data:
        raise TwaError("--greedy needs the architecture and the data (--model, --data) to score candidates")
    if dry_run:
        return plan_swa(ckpts, compute_dtype=request.compute_dtype, dtype=request.dtype, model_known=has_data,
                        device=device, greedy=request.greedy)
    compute = torch_dtype(request.compute_dtype)
    out_dtype = torch_dtype(request.dtype) if request.dtype else None
    result = SwaResult(Path(output), [c.path for c in ckpts], "none", None)
    coefficients = [1.0 / len(ckpts)] * len(ckpts)
    if request.greedy:
        assert task is not None and net is not None
        net.to(device)
        soup = greedy_soup(ckpts, task, net, device=device, bn_update=request.bn_update,
                           bn_batches=request.bn_batches, compute_dtype=compute, progress=progress)
        average = soup.state
        result.chosen, result.individual = soup.chosen, soup.individual
        result.val, result.metric = soup.val, soup.metric
        result.bn = ("recomputed" if request.bn_update else "averaged") if has_batchnorm(net) else "none"
        coefficients = [1.0 / len(soup.chosen) if i in soup.chosen else 0.0 for i in range(len(ckpts))]
        widest = layout.widest
        average = {k: v.to(widest[k]) if v.is_floating_point() else v for k, v in average.items()}
        result.test = score_if_any(net, task, "test", device=device)
    else:
        average = mean_of(ckpts, progress=progress, compute_dtype=compute, dtype=out_dtype)
        average, result.bn, result.test = recalibrated(net, task, average, request, device)
    sources = [Source.of(c, with_hash=False) for c in ckpts]
    trainable = trainable_names(net) if net is not None else ckpts[0].trainable
    return write_average(target, average, result, request, task=task, first=ckpts[0], sources=sources,
                         trainable=trainable, coefficients=coefficients, force=force, invocation=invocation,
                         command="swa --greedy" if request.greedy else "swa")


def write_average(target: ResultTarget, average: dict[str, torch.Tensor], result: SwaResult, request: SwaRequest, *,
                  task: Task | None, first: Checkpoint, sources: list[Source], trainable: list[str] | None,
                  coefficients: list[float],
                  force: bool, invocation: dict[str, Any] | None, command: str = "swa") -> SwaResult:
    """Write an average (its BatchNorm statistics as `result.bn` says) with the metadata every average carries;
    `first` is the first checkpoint averaged (what it records about its task), `sources` all of them."""
    has_data = task is not None and task.has_data
    if result.bn == "averaged":
        log.warning("BatchNorm statistics were averaged, not recomputed (%s)",
                    "--no-bn-update" if has_data else "no architecture or data known")
    out_dtype = torch_dtype(request.dtype) if request.dtype else None
    if out_dtype is not None:  # after BatchNorm recomputation the model's fp32 state comes back
        average = {k: to_storage_dtype(v, out_dtype, f"the average's tensor '{k}'") for k, v in average.items()}
    recorded_task = task.describe() if task is not None else described(request.task, first)
    meta = make_metadata(
        "average", invocation=invocation, **recorded_task, trainable=trainable, command=command,
        sources=[s.to_dict() for s in sources], coefficients=coefficients,
        step=str(sources[-1].step) if sources[-1].step is not None else None, bn=result.bn,
        compute_dtype=request.compute_dtype, dtype=request.dtype or "same as input",
    )
    result.path = write_result(target, average, meta, force=force)
    return result


def _one_recorded_split(request: TaskRequest, ckpts: list[Checkpoint]) -> None:
    """A greedy soup chooses on one validation split: without a flag naming it, the checkpoints (of several runs,
    as soups usually are) must record the same one."""
    if request.val_split or request.val_data is not None:
        return
    first: dict[str, Checkpoint] = {}
    for ckpt in ckpts:
        first.setdefault(repr((ckpt.data or {}).get("val_split")), ckpt)
    if len(first) > 1:
        (a, ca), (b, cb) = list(first.items())[:2]
        raise TwaError(f"{ca.path.name} and {cb.path.name} record different validation splits (val_split {a} and "
                       f"{b}): pass --val-split or --val-data to say which one the greedy soup chooses on")


def _needs_model(request: TaskRequest, ckpt: Checkpoint) -> bool:
    """Whether to build the model: to recompute BatchNorm statistics and to test. A Hugging Face model has no
    statistics, so it is built only to be scored, on the text the user gives (a greedy soup's validation text
    is enough)."""
    if not knows_task(request, ckpt):
        return False
    given_text = request.data or request.eval_data or request.val_data
    return not (hf_folder(ckpt) is not None and given_text is None and request.model is None
                and "arch" not in ckpt.meta)


def recalibrated(net: torch.nn.Module | None, task: Task | None, average: dict[str, torch.Tensor],
                 request: SwaRequest, device: str) -> tuple[dict[str, torch.Tensor], str, Metrics | None]:
    """The average loaded into the model, its BatchNorm statistics recomputed and its test figures, when the
    data is known; without a model, the average as it is ("averaged" statistics where it holds some)."""
    if net is None or task is None:
        return average, "averaged" if any("running_mean" in k or "running_var" in k for k in average) else "none", None
    load_weights(net, average, "the average")
    bn = "averaged" if has_batchnorm(net) else "none"
    if not task.has_data:
        return average, bn, None
    net.to(device)
    if request.bn_update and has_batchnorm(net):
        recalibrate_bn(net, task, max_batches=request.bn_batches, device=device)
        bn = "recomputed"
        state = {k: v.to("cpu") for k, v in net.state_dict().items()}
        average = {k: state[k].to(average[k].dtype) if average[k].is_floating_point() else state[k] for k in average}
    return average, bn, score_if_any(net, task, "test", device=device)




