"""Greedy model soup (Wortsman et al., 2022): average checkpoints, adding one only if held-out figures hold.

The uniform soup is `twa swa`. The greedy soup ranks the checkpoints by their own held-out figure (the task's
selection metric: accuracy for classifiers), starts from the best, and adds each next one to the average only
if the average's held-out figure does not get worse. Held-out means the validation split of the task's data
(`--val-split` or `--val-data`, else the one the checkpoints record), never the test set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from twa_cli.core.averaging import mean_of
from twa_cli.core.batchnorm import recalibrate_bn
from twa_cli.core.evaluation import evaluate
from twa_cli.engine.batchnorm import has_batchnorm
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import Checkpoint, load_tensors
from twa_cli.tasks.base import Task
from twa_cli.tasks.models import load_weights

log = logging.getLogger("twa")


@dataclass
class Soup:
    chosen: list[int]  # positions of the checkpoints in the soup
    individual: list[float]  # held-out figure of each checkpoint
    val: float  # held-out figure of the soup
    metric: str  # which figure
    state: dict[str, torch.Tensor]  # the soup's weights, BatchNorm recomputed


def greedy_soup(ckpts: list[Checkpoint], task: Task, net: nn.Module, *, device: str = "cpu",
                bn_update: bool = True, bn_batches: int | None = None, compute_dtype: torch.dtype = torch.float64,
                progress: Callable[[int, int], None] | None = None) -> Soup:
    """The greedy soup of `ckpts`; `net` is the task's model, on `device`. With `bn_update` every candidate
    average (and the soup) is scored after its BatchNorm statistics are recomputed (on at most `bn_batches`
    batches); without, with the averaged statistics. Sums run in `compute_dtype`."""
    if task.split("val", augment=False) is None:
        raise TwaError("--greedy needs a validation split to score candidates: pass --val-split (text: --val-data "
                       "FILE)")
    metric, higher = task.selection_metric
    sign = 1.0 if higher else -1.0
    bn = has_batchnorm(net) and bn_update

    def score(state: dict[str, torch.Tensor], source: str, recalibrate: bool) -> float:
        load_weights(net, state, source)
        if recalibrate:
            recalibrate_bn(net, task, max_batches=bn_batches, device=device)
        return evaluate(net, task, "val", device=device).values[metric]

    individual = []
    for i, ckpt in enumerate(ckpts):
        individual.append(score(load_tensors(ckpt), str(ckpt.path), False))
        if progress is not None:
            progress(i + 1, 2 * len(ckpts))
    order = sorted(range(len(ckpts)), key=lambda i: -sign * individual[i])
    chosen = [order[0]]
    sums = {k: v.to(compute_dtype) if v.is_floating_point() else v for k, v in load_tensors(ckpts[order[0]]).items()}
    best = individual[order[0]]
    for done, i in enumerate(order[1:], len(ckpts) + 1):
        candidate = load_tensors(ckpts[i])
        n = len(chosen) + 1
        state = {k: ((sums[k] + v) / n).to(v.dtype) if v.is_floating_point() else v for k, v in candidate.items()}
        value = score(state, "the soup", bn)
        if sign * value >= sign * best:
            chosen.append(i)
            best = value
            for k, v in candidate.items():
                sums[k] = sums[k] + v if v.is_floating_point() else v
        log.info("soup: %s %s (held-out %s %.4g)", ckpts[i].path.name,
                 "added" if chosen[-1] == i else "left out", metric, value)
        if progress is not None:
            progress(done, 2 * len(ckpts))
    chosen.sort()
    load_weights(net, mean_of([ckpts[i] for i in chosen], compute_dtype=compute_dtype), "the soup")
    if bn:
        recalibrate_bn(net, task, max_batches=bn_batches, device=device)
    val = evaluate(net, task, "val", device=device).values[metric]
    return Soup(chosen, individual, val, metric, {k: v.detach().cpu() for k, v in net.state_dict().items()})
