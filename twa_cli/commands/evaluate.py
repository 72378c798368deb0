"""`twa eval`: the task's figures for each checkpoint (accuracy and loss per example for classifiers), on the
test split, the training split or both, and the generalization gap as in the paper's tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twa_cli.commands.common import aligned, resolve_device, task_of
from twa_cli.core.batchnorm import recalibrate_bn
from twa_cli.core.evaluation import evaluate
from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import load_tensors, read_checkpoint
from twa_cli.io.readers import ReadOptions
from twa_cli.tasks.base import Metrics
from twa_cli.tasks.models import load_weights
from twa_cli.tasks.resolve import TaskRequest

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
    """Score each checkpoint; the task comes from the flags, else from each checkpoint's metadata."""
    request = request or EvalRequest()
    device = resolve_device(request.device)
    return [_score(Path(p), request, device) for p in paths]


def _score(path: Path, request: EvalRequest, device: str) -> EvalResult:
    ckpt = read_checkpoint(path, request.read)
    task = task_of(request.task, ckpt)
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
