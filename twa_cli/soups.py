"""Greedy model soup (Wortsman et al., 2022): average checkpoints, adding one only if held-out accuracy holds.

The uniform soup is `twa swa`. The greedy soup ranks the checkpoints by their own held-out accuracy, starts from
the best, and adds each next one to the average only if the average's held-out accuracy does not drop. Held-out
means the validation split of the data spec (`--val-split`), never the test set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from twa_cli.averaging import mean_of
from twa_cli.batchnorm import has_batchnorm, recalibrate_bn
from twa_cli.checkpoints import Checkpoint, check_compatible, load_tensors, make_metadata, save_tensors
from twa_cli.data import Datasets, load_data
from twa_cli.errors import TwaError
from twa_cli.evaluation import Score, evaluate
from twa_cli.models import build_model, load_weights, trainable_names

log = logging.getLogger("twa")


@dataclass
class SoupResult:
    path: Path
    chosen: list[int]  # positions of the checkpoints in the soup
    individual: list[float]  # held-out accuracy of each checkpoint
    val: float  # held-out accuracy of the soup
    test: Score | None


def _score(net: torch.nn.Module, state: dict[str, torch.Tensor], data: Datasets, device: str, recalibrate: bool) -> float:
    net.load_state_dict(state)
    if recalibrate:
        recalibrate_bn(net, data.train, device=device)
    return evaluate(net, data.val_eval, device=device).accuracy  # type: ignore[arg-type]


def greedy_soup(
    ckpts: list[Checkpoint],
    out: str | Path,
    *,
    model: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> SoupResult:
    """Write the greedy soup of `ckpts` to `out`; needs the architecture and a data spec with a validation split."""
    check_compatible(ckpts)
    arch, spec = model or ckpts[0].arch, data or ckpts[0].data
    if arch is None or spec is None:
        raise TwaError("--greedy needs the architecture and the data (--model, --data) to score candidates")
    if not spec.get("val_split"):
        raise TwaError("--greedy needs a held-out split to score candidates: pass --val-split")
    datasets = load_data(spec)
    net = build_model(arch).to(device)
    bn = has_batchnorm(net)
    individual = []
    for i, ckpt in enumerate(ckpts):
        state = load_tensors(ckpt.path)
        load_weights(net, state, str(ckpt.path))
        individual.append(evaluate(net, datasets.val_eval, device=device).accuracy)  # type: ignore[arg-type]
        if progress is not None:
            progress(i + 1, 2 * len(ckpts))
    order = sorted(range(len(ckpts)), key=lambda i: -individual[i])
    chosen = [order[0]]
    sums = {k: v.double() for k, v in load_tensors(ckpts[order[0]].path).items()}
    best = individual[order[0]]
    for done, i in enumerate(order[1:], len(ckpts) + 1):
        candidate = load_tensors(ckpts[i].path)
        n = len(chosen) + 1
        state = {k: ((sums[k] + candidate[k].double()) / n).to(candidate[k].dtype) if candidate[k].is_floating_point()
                 else candidate[k] for k in candidate}
        accuracy = _score(net, state, datasets, device, bn)
        if accuracy >= best:
            chosen.append(i)
            best = accuracy
            for k, v in candidate.items():
                sums[k] = sums[k] + v.double() if v.is_floating_point() else v
        log.info("soup: %s %s (held-out accuracy %.2f%%)", ckpts[i].path.name,
                 "added" if chosen[-1] == i else "left out", accuracy)
        if progress is not None:
            progress(done, 2 * len(ckpts))
    chosen.sort()
    soup = mean_of([ckpts[i] for i in chosen])
    load_weights(net, soup, "the soup")
    if bn:
        recalibrate_bn(net, datasets.train, device=device)
    val = evaluate(net, datasets.val_eval, device=device).accuracy  # type: ignore[arg-type]
    test = evaluate(net, datasets.test, device=device)
    coefficients = [1.0 / len(chosen) if i in chosen else 0.0 for i in range(len(ckpts))]
    meta = make_metadata(
        "average", arch=arch, data=spec, trainable=trainable_names(net), command="swa --greedy",
        sources=[str(c.path.resolve()) for c in ckpts], coefficients=coefficients,
        bn="recomputed" if bn else "none",
    )
    save_tensors(out, {k: v.cpu() for k, v in net.state_dict().items()}, meta)
    return SoupResult(Path(out), chosen, individual, val, test)
