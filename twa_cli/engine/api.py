"""TWA inside a training loop, in the style of `torch.optim.swa_utils`: no file is read or written here.

    from twa_cli import TWA

    twa = TWA(model)                              # the trainable parameters span the subspace
    for epoch in range(epochs):
        train_one_epoch(model, loader)
        twa.add(model)                            # the weights as they are join the basis (a copy, in memory)
    result = twa.fit(model, loader, loss)         # Algorithm 1: train in their span; the model holds the result

`loss(model, batch)` is the user's scalar loss (a mean over the batch). `fit` is the paper's method as
`twa train-subspace --preset paper` runs it: start at the center of the weights added (their uniform average,
SWA), eq. 8 with the tensor core's SubspaceSGD in the one training loop, BatchNorm recomputed at the end. Given
the same weights and batches, it returns what the command returns from the same checkpoints.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from twa_cli.engine.batch import Batch
from twa_cli.engine.batchnorm import recompute_bn
from twa_cli.engine.loop import LoaderBatches, Reporter, check_state_finite, train_epochs
from twa_cli.engine.mean import RunningMean
from twa_cli.engine.orthogonalizer import Allocate, Orthogonalizer
from twa_cli.engine.parallel import Processes, Replicated, average_batchnorm, check_same_batches, joined, several
from twa_cli.engine.subspace import FlatParameters, Projection, SubspaceSGD
from twa_cli.errors import TwaError
from twa_cli.units import layout_size

Loss = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass
class FitResult:
    """What `TWA.fit` found: one averaging coefficient per weights added (sum_i alpha_i w_i is the result on the
    trainable parameters), the final coordinates in the basis, and the loop's figures per epoch."""

    coefficients: list[float]
    coords: torch.Tensor
    history: list[dict[str, Any]] = field(default_factory=list)


class TWA:
    """An orthonormal basis of the weights added so far (`add`), and training in their span (`fit`).

    `names`: the parameters that span the subspace, in order (default: every parameter that requires grad).
    `capacity`: how many additions to make room for at once (more grow it). `device`: where the basis lives
    (default: the model's). `allocate`: the basis's storage instead, e.g. `twa_cli.MappedRows(folder)` for a file
    mapped into memory (CPU), when the basis would not fit in memory. The other floating tensors of the state dict
    (BatchNorm statistics, frozen weights) are averaged beside it, as `twa orthogonalize` averages them, to start
    from.
    """

    def __init__(self, model: nn.Module, *, names: list[str] | None = None, tol: float = 1e-6, capacity: int = 8,
                 device: torch.device | str | None = None, allocate: Allocate | None = None):
        params = dict(model.named_parameters())
        self.names = list(names) if names is not None else [n for n, p in params.items() if p.requires_grad]
        missing = [n for n in self.names if n not in params]
        if not self.names or missing:
            raise TwaError(f"the model has no parameter '{missing[0]}'" if missing else "the model trains nothing")
        self.layout = [(n, tuple(params[n].shape)) for n in self.names]
        dim = layout_size(self.layout)
        device = device if device is not None else params[self.names[0]].device
        self.basis = Orthogonalizer(dim, tol=tol, capacity=capacity, device=device, allocate=allocate)
        self.others = RunningMean()
        # Where the storage put the basis (an allocator may keep it on the CPU while the model is on a GPU): the
        # weights are copied there, and orthogonalized there.
        self._scratch = torch.empty(1, dim, dtype=torch.float32, device=self.basis.vectors.device)

    @property
    def count(self) -> int:
        """How many weights were added."""
        return self.basis.count

    @torch.no_grad()
    def add(self, model: nn.Module) -> bool:
        """Copy the model's current weights into the basis (one D-sized copy, no file); returns whether they
        added a direction (weights in the span of those added before are counted, not stored)."""
        params = dict(model.named_parameters())
        offset = 0
        for name, shape in self.layout:
            size = math.prod(shape)
            self._scratch[0, offset : offset + size].copy_(params[name].reshape(-1))
            offset += size
        added = self.basis.add_block(self._scratch)[0]  # refuses NaN or Inf before anything changes
        # Everything else the state dict holds, but for weights tied to a trained one (a language model's output
        # layer): a checkpoint file leaves those out too.
        tied = {params[n].data_ptr() for n in self.names}
        self.others.add((k, v) for k, v in model.state_dict().items()
                        if k not in params or params[k].data_ptr() not in tied)
        return added

    def center(self) -> torch.Tensor:
        """Coordinates of the uniform average of the weights added (SWA), where `fit` starts."""
        return self.basis.coords.mean(dim=1)

    def coefficients(self, coords: torch.Tensor) -> list[float]:
        """alpha (one per weights added) with sum_i alpha_i w_i = P^T coords; the smallest-norm choice when some
        added nothing new."""
        return [float(a) for a in torch.linalg.pinv(self.basis.coords) @ coords.detach().double().cpu()]

    def fit(self, model: nn.Module, loader: Iterable[Batch], loss: Loss, *, epochs: int = 10, lr: float = 2.0,
            schedule: str = "step", momentum: float = 0.9, weight_decay: float = 1e-5, seed: int = 0,
            bn_loader: Iterable[Batch] | None = None, bn_batches: int | None = None,
            reporter: Reporter | None = None, parallel: bool | None = None) -> FitResult:
        """Train `model` in the span of the weights added (the paper's Algorithm 1, Appendix A.2.1 defaults) on
        the batches of `loader` with `loss`, then recompute BatchNorm on `bn_loader` (default `loader`); the
        result is left in `model`. The model's parameters become views of one flat buffer (as in
        `twa train-subspace`); which of them require grad is restored at the end.

        `parallel=True`: under torch.distributed (DDP, where every process holds the model and `loader` gives each
        its part of every batch) the processes fit together, averaging the n coordinates of each step's gradient
        (`twa_cli.engine.parallel`), and end with the same model; every process must call `fit`, with the same
        number of batches. Otherwise (the default) this process fits alone, as a fit run on one rank only does;
        under torch.distributed that is said once, as the callbacks choose for themselves."""
        processes = self._checked(model, loader, parallel)
        device = next(model.parameters()).device
        self._load_others(model)
        requires = {n: p.requires_grad for n, p in model.named_parameters()}
        flat = FlatParameters(model, self.names)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                vectors = self.basis.vectors.to(device)
                projector = (Projection(vectors, flat.params.dtype) if processes is None
                             else Replicated(vectors, flat.params.dtype, processes))
                optimizer = SubspaceSGD(flat, projector, self.center(), lr=lr, momentum=momentum,
                                        weight_decay=weight_decay)
                history: list[dict[str, Any]] = []
                step = train_epochs(model, optimizer, LoaderBatches(loader, loss), epochs=epochs, lr=lr,
                                    schedule=schedule, seed=seed, device=device, reporter=reporter,
                                    after_epoch=lambda stats: history.append(stats.to_dict()), collective=processes)
                used = update_bn(bn_loader if bn_loader is not None else loader, model, loss,
                                 max_batches=bn_batches)
                if processes is not None:
                    average_batchnorm(model, processes, used)
            check_state_finite(model, step, lr)
            return FitResult(self.coefficients(optimizer.coords), optimizer.coords.detach().cpu().clone(), history)
        finally:
            # Each parameter gets its own memory back (savers such as `save_pretrained` take parameters sharing
            # one buffer for tied weights), trains as before, and holds no gradient of the fit.
            trained = set(self.names)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in trained:
                        p.data = p.data.clone()
                    p.requires_grad_(requires[name])
                    p.grad = None

    def _checked(self, model: nn.Module, loader: Iterable[Batch], parallel: bool | None) -> Processes | None:
        """What `fit` refuses before touching the model, and the processes it fits with (None: alone)."""
        if self.basis.rank == 0:
            raise TwaError("no weights were added: call add(model) first")
        trained = dict(model.named_parameters())
        wide = next((n for n in self.names if trained[n].dtype != torch.float32), None)
        if wide is not None:
            dtype = str(trained[wide].dtype).removeprefix("torch.")
            raise TwaError(f"TWA.fit trains fp32 parameters; '{wide}' is {dtype} (fit a float32 copy, model.float(), "
                           "and cast the result back)")
        processes = joined() if parallel else None
        if parallel and processes is None:
            raise TwaError("parallel=True: this process is not one of several joined by torch.distributed")
        if parallel is None and several():
            warnings.warn("TWA.fit: this process is one of several (torch.distributed) but fits alone, on its own "
                          "batches; pass parallel=True for every process to fit together", stacklevel=3)
        if processes is not None:
            check_same_batches(processes, len(loader), "TWA.fit's loader")  # type: ignore[arg-type]
        if len(loader) == 0:  # type: ignore[arg-type]
            raise TwaError("TWA.fit's loader has no batches to train on")
        return processes

    @torch.no_grad()
    def _load_others(self, model: nn.Module) -> None:
        """The averaged floating tensors outside the basis (BatchNorm statistics), in the model's dtypes."""
        if not self.others.count:
            return
        state = model.state_dict()
        for name, value in self.others.average().items():
            if name in state:
                state[name].copy_(value.to(state[name].dtype))

    def state_dict(self) -> dict[str, Any]:
        """The basis and the average beside it: what a training checkpoint keeps so that a resumed run goes on
        adding to the same basis."""
        return {"names": list(self.names), "basis": self.basis.state_dict(), "others": self.others.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise TwaError("a saved TWA basis of other parameters than this model trains")
        self.basis.load_state_dict(state["basis"])
        self.others.load_state_dict(state["others"])


def update_bn(loader: Iterable[Batch], model: nn.Module, loss: Loss, *, max_batches: int | None = None) -> int:
    """Recompute the model's BatchNorm statistics over `loader`, `loss(model, batch)` as the forward pass (as
    `torch.optim.swa_utils.update_bn`, for batches of any structure); returns the batches used."""
    return recompute_bn(model, loader, loss, max_batches=max_batches, device=next(model.parameters()).device)
