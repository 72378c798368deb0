"""`twa eval`: the task's figures for each checkpoint (accuracy and loss per example for classifiers), on the
test split, the training split or both, and the generalization gap as in the paper's tables."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twa_cli.commands.common import aligned, recorded, resolve_device
from twa_cli.core.batchnorm import recalibrate_bn
from twa_cli.core.evaluation import evaluate
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import Checkpoint, load_tensors, read_checkpoint
from twa_cli.io.readers import ReadOptions
from twa_cli.tasks.base import Metrics
from twa_cli.tasks.models import load_weights
from twa_cli.tasks.resolve import Recorded, TaskRequest, resolve_task

SPLITS = ("test", "train", "both")


@dataclass
class EvalRequest:
    task: TaskRequest = field(default_factory=TaskRequest)
    read: ReadOptions = field(default_factory=ReadOptions)
    split: str = "test"
    bn_update: bool = False
    bn_batches: int | None = None
    batch_size: int = 256
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise TwaError(f"--split must be one of {', '.join(SPLITS)} (got '{self.split}')")


@dataclass
class EvalResult:
    path: str
    test: Metrics | None
    train: Metrics | None

    @property
    def gap(self) -> float | None:
        """Generalization gap: training accuracy minus test accuracy, in points, as in the paper's tables."""
        if self.train is None or self.test is None or self.train.accuracy is None or self.test.accuracy is None:
            return None
        return self.train.accuracy - self.test.accuracy

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path}
        for name in ("test", "train"):
            score = getattr(self, name)
            if score is not None:
                out[name] = score.to_dict()
        if self.gap is not None:
            out["gap"] = self.gap
        return out


def evaluate_checkpoints(paths: list[str | Path], request: EvalRequest | None = None) -> list[EvalResult]:
    """Score each checkpoint; the task comes from the flags, else from each checkpoint's metadata (the data,
    from the first that records one)."""
    request = request or EvalRequest()
    device = resolve_device(request.device)
    ckpts = [read_checkpoint(Path(p), request.read) for p in paths]
    knowns = _with_shared_data(request.task, [recorded(c) for c in ckpts])
    return [_score(ckpt, known, request, device) for ckpt, known in zip(ckpts, knowns, strict=True)]


def _with_shared_data(request: TaskRequest, knowns: list[Recorded]) -> list[Recorded]:
    """Without --data or --task, the data the first checkpoint that records one names, for those that record
    none: the models given side by side are scored on the same examples (a Trainer's or timm's checkpoint
    records none). Read from a file, it is resolved as any recorded data is: registry names only."""
    data = next((r.data for r in knowns if r.data), None)
    if request.data is not None or request.task is not None or data is None:
        return knowns
    return [r if r.data else replace(r, data=data) for r in knowns]


def _score(ckpt: Checkpoint, known: Recorded, request: EvalRequest, device: str) -> EvalResult:
    path = ckpt.path
    task = resolve_task(request.task, known)
    net = task.build_model()
    load_weights(net, load_tensors(aligned([ckpt], net)[0]), str(path))
    net.to(device)
    if request.bn_update:
        recalibrate_bn(net, task, max_batches=request.bn_batches, device=device)
    test = train = None
    if request.split in ("test", "both"):
        test = evaluate(net, task, "test", batch_size=request.batch_size, device=device)
    if request.split in ("train", "both"):
        train = evaluate(net, task, "train", batch_size=request.batch_size, device=device)
    return EvalResult(str(path), test, train)
