"""Training inside the span of the checkpoints: Algorithm 1 with equation 8.

The trainable parameters and their gradients live in one contiguous buffer each (the modules' parameters
are views into them), so a step reads the gradient with one matrix-vector product, updates n coordinates,
and writes the weights with a second one: no concatenation, no allocation, no copy back, no host sync.

Why coordinates: eq. 8 is SGD with momentum on w, with the gradient projected through P P^T and weight decay
lambda*w. Started inside the span, w, the momentum and every update stay inside it, so the whole update can be
carried out on a = P w (n numbers) and w rebuilt as P^T a. This is the same iteration, with no D-sized
momentum buffer and no drift out of the subspace. A start outside the span (a user's file) keeps its
off-span part r, which eq. 8 only shrinks by weight decay: w = P^T a + s r with a scalar s.

Where P lives is not the optimizer's business: it is given a `Projector` (the whole basis in one process,
one basis per group of layers, or a torchrun rank's columns, `twa_cli.core.placement`) and runs the same
step on all of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from twa_cli.errors import TwaError


class FlatParameters:
    """Rebind a model's trainable parameters (in `names` order) as views of one flat buffer, grads too.

    `multiple_of` pads both buffers with zeros to a multiple of it, so that they split into equal shards
    (one per rank, `twa_cli.distributed`); the padding belongs to no parameter and stays zero.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], multiple_of: int = 1):
        params = dict(model.named_parameters())
        names = list(names)
        missing = [n for n in names if n not in params]
        if missing:
            raise TwaError(f"the basis covers '{missing[0]}', which the model does not have")
        first = params[names[0]]
        total = sum(params[n].numel() for n in names)
        total = -(-total // multiple_of) * multiple_of
        self.names = names
        self.params = torch.zeros(total, dtype=first.dtype, device=first.device)
        self.grads = torch.zeros(total, dtype=first.dtype, device=first.device)
        offset = 0
        for name in names:
            p = params[name]
            size = p.numel()
            view = self.params[offset : offset + size].view_as(p)
            view.copy_(p.detach())
            p.data = view
            p.grad = self.grads[offset : offset + size].view_as(p)
            offset += size
        # Parameters outside the basis must not train: freeze them.
        for name, p in params.items():
            if name not in set(names):
                p.requires_grad_(False)


class Projector:
    """Where the basis P (n x D) lives, and so what c = P g and w = P^T a mean for the flat buffers.

    The optimizer calls, in this order, on each step: `gradient(grads)` (the gradient this process
    projects: the whole buffer, or a rank's summed slice), `coords_of` into c, `reduce(c)` (the sum over
    processes holding other columns of P, as a mean); then `own(params)` (the part of the weights this
    process writes), `point_of` into it, and `share(params)` (the other processes' parts). This class is
    the single-process identity for the placement steps; `coords_of` and `point_of` are the products.
    """

    rank: int  # n, the number of coordinates

    def coords_of(self, vector: torch.Tensor, out: torch.Tensor) -> None:
        """out = P vector (vector: what `gradient` or `own` returned)."""
        raise NotImplementedError

    def point_of(self, coords: torch.Tensor, out: torch.Tensor) -> None:
        """out = P^T coords (out: what `own` returned)."""
        raise NotImplementedError

    def gradient(self, grads: torch.Tensor) -> torch.Tensor:
        return grads

    def reduce(self, coords: torch.Tensor) -> None:
        return None

    def own(self, params: torch.Tensor) -> torch.Tensor:
        return params

    def share(self, params: torch.Tensor) -> None:
        return None


class SubspaceSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay restricted to the row space of a basis: a `Projector`, or a k x D
    tensor of orthonormal rows held whole in this process (`Projection`)."""

    def __init__(
        self,
        flat: FlatParameters,
        basis: Projector | torch.Tensor,
        coords: torch.Tensor,
        *,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-5,
        offspan: torch.Tensor | None = None,
        offspan_decays: bool = True,
    ):
        super().__init__([flat.params], {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.flat = flat
        self.trained_names = list(flat.names)  # the parameters, in the order they fill D
        self.projector = basis if isinstance(basis, Projector) else Projection(basis, flat.params.dtype)
        device = flat.params.device
        self.coords = coords.to(device=device, dtype=torch.float32).clone()
        if self.coords.shape != (self.projector.rank,):
            raise TwaError(f"internal: {self.coords.numel()} coordinates for a basis of rank {self.projector.rank}")
        self.momentum = torch.zeros_like(self.coords)
        self._grad_coords = torch.zeros_like(self.coords)
        self.offspan = offspan  # r (the part of w this process writes), the start's part outside the span, or None
        # False for the affine variant, whose fixed offset is the center of the checkpoints, not a decaying start.
        self.offspan_decays = offspan_decays
        self.offspan_scale = 1.0  # s
        self.offspan_momentum = 0.0
        self.steps = 0
        # Where torch.optim keeps an optimizer's state, so `optimizer.state` shows it as for any other optimizer.
        self.state[flat.params] = {"coords": self.coords, "momentum": self.momentum}
        self._write_params()

    @torch.no_grad()
    def gradient_coords(self) -> torch.Tensor:
        """c = P g: the gradient in subspace coordinates (P^T c is the projected gradient of eq. 7), summed
        over the processes that hold other columns. The lr check reads Hessian-vector products the same way."""
        self.projector.coords_of(self.projector.gradient(self.flat.grads), self._grad_coords)
        self.projector.reduce(self._grad_coords)
        return self._grad_coords

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        group = self.param_groups[0]
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        c = self.gradient_coords()
        # eq. 8 in coordinates: m <- mu m + (c + wd a);  a <- a - lr m
        self.momentum.mul_(mu).add_(c).add_(self.coords, alpha=wd)
        self.coords.add_(self.momentum, alpha=-lr)
        if self.offspan is not None and self.offspan_decays:
            self.offspan_momentum = mu * self.offspan_momentum + wd * self.offspan_scale
            self.offspan_scale -= lr * self.offspan_momentum
        self.steps += 1
        self._write_params()
        return None

    def zero_grad(self, set_to_none: bool = False) -> None:
        self.flat.grads.zero_()

    @torch.no_grad()
    def direction(self, coords: torch.Tensor) -> torch.Tensor:
        """P^T coords as a whole parameter vector (laid out as the flat buffer): a direction in weight space."""
        out = torch.zeros_like(self.flat.params)  # a projector may leave padding it does not own as it is
        self.projector.point_of(coords.to(out.dtype), self.projector.own(out))
        self.projector.share(out)
        return out

    @torch.no_grad()
    def move_to(self, coords: torch.Tensor) -> None:
        """Put the weights at `coords` (momentum untouched): the lr check probes points near the start."""
        self.coords.copy_(coords)
        self._write_params()

    @torch.no_grad()
    def _write_params(self) -> None:
        """w = P^T a (+ s r), written straight into the parameter buffer."""
        own = self.projector.own(self.flat.params)
        self.projector.point_of(self.coords, own)
        if self.offspan is not None:
            own.add_(self.offspan, alpha=self.offspan_scale)
        self.projector.share(self.flat.params)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: {"state": {0: coords, momentum, step, offspan}, "param_groups": [...]}. The
        whole state of the iteration is here (the basis and the start's off-span part are inputs, like the
        parameters), so a loop that checkpoints its optimizer the standard way resumes the same run."""
        own = self.state[self.flat.params]
        own["step"] = torch.tensor(self.steps, dtype=torch.int64)
        # s and its momentum in fp64, as the step computes them: restored bit for bit.
        own["offspan"] = torch.tensor([self.offspan_scale, self.offspan_momentum], dtype=torch.float64)
        return super().state_dict()

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` returned, bit for bit, into this optimizer's own tensors (the weights are
        rewritten from the coordinates). torch's base class would cast the fp64 offspan to the parameters'
        dtype and rebind the tensors this optimizer steps, so the copy is done here."""
        groups, states = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, list) or len(groups) != 1 or not isinstance(states, dict) or len(states) != 1:
            raise ValueError("not the state of a SubspaceSGD (one parameter group, one state)")
        saved = next(iter(states.values()))
        for name in ("coords", "momentum"):
            if tuple(saved[name].shape) != tuple(self.coords.shape):
                raise ValueError(f"the saved {name} have shape {list(saved[name].shape)}, this optimizer's "
                                 f"{list(self.coords.shape)}: a state of another basis")
        self.coords.copy_(saved["coords"])
        self.momentum.copy_(saved["momentum"])
        self.steps = int(saved["step"])
        self.offspan_scale, self.offspan_momentum = (float(v) for v in saved["offspan"])
        for key, value in groups[0].items():
            if key != "params":
                self.param_groups[0][key] = value
        self._write_params()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The state as named tensors (what the CLI's resume file holds under `optim.`)."""
        return dict(next(iter(self.state_dict()["state"].values())))

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state_dict({"state": {0: tensors}, "param_groups": self.state_dict()["param_groups"]})


class Projection(Projector):
    """c = P g and w = P^T a for a whole basis P (k x D) in this process, which may be stored in half precision.

    An fp32 basis is used by torch.mv directly. A bf16/fp16 basis is widened one slab of columns at a time
    into a preallocated fp32 scratch (cache-sized on CPU), so the products accumulate in fp32, the basis is
    read at half the bytes, and a step allocates nothing.
    """

    def __init__(self, basis: torch.Tensor, dtype: torch.dtype):
        self.basis = basis
        self.dtype = dtype
        k, dim = basis.shape
        self.rank = k
        self.widen = basis.dtype != dtype
        budget = (1 << 20) if basis.device.type == "cpu" else (1 << 26)
        self.step = max(1024, budget // (4 * max(k, 1))) if self.widen else dim
        self.scratch = torch.empty(k, min(self.step, dim) if self.widen else 0, dtype=dtype, device=basis.device)

    def coords_of(self, vector: torch.Tensor, out: torch.Tensor) -> None:
        """out = P vector."""
        if not self.widen:
            torch.mv(self.basis, vector, out=out)
            return
        out.zero_()
        for s, slab in self._slabs():
            out.addmv_(slab, vector[s : s + slab.shape[1]])

    def point_of(self, coords: torch.Tensor, out: torch.Tensor) -> None:
        """out = P^T coords."""
        if not self.widen:
            torch.mv(self.basis.t(), coords, out=out)
            return
        for s, slab in self._slabs():
            torch.mv(slab.t(), coords, out=out[s : s + slab.shape[1]])

    def _slabs(self):
        dim = self.basis.shape[1]
        for s in range(0, dim, self.step):
            width = min(self.step, dim - s)
            slab = self.scratch[:, :width]
            slab.copy_(self.basis[:, s : s + width])
            yield s, slab
