"""An orthonormal basis of the span of some weight vectors, grown one vector (or a block) at a time.

Successive checkpoints are nearly collinear, so classical Gram-Schmidt in fp32 (the reference code's) loses
orthogonality. Here each block of new vectors is orthogonalized against the basis so far twice ("twice is
enough", block classical Gram-Schmidt with reorthogonalization) with inner products accumulated in fp64, then
column by column within the block. A vector whose residual is below `tol` of its norm adds no direction: it is
dropped (a duplicate, or a combination of earlier ones), never divided by almost zero.

The orthogonalizer takes tensors, never files: `twa orthogonalize` feeds it blocks read from disk, the training
loop's callbacks feed it the model's weights as they are. Its vectors live on whatever device the first one is on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from twa_cli.errors import TwaError

# A basis whose rows are further than this from orthonormal (max |P P^T - I|, measured in fp64 before any
# narrowing to half precision) is refused: training in it would not be training in the span.
ORTHOGONALITY_BOUND = 1e-4
# Columns of the parameter vector handled at once when widening to fp64: small enough that the fp64 copies
# stay in cache and cost no memory worth counting next to the basis.
CHUNK_BYTES = 1 << 22

Reduce = Callable[[torch.Tensor], None]  # sums a tensor in place over the ranks that each hold some columns
# Storage for `rows` fp32 vectors of `dim` weights: memory by default, or what the caller provides (a file mapped
# into memory, `twa_cli.io.mapped.MappedRows`, for a basis larger than the memory it may use).
Allocate = Callable[[int, int], torch.Tensor]


@dataclass
class Dropped:
    """A vector that added no direction: its position among those added, and its residual over its norm."""

    index: int
    relative_residual: float


class Orthogonalizer:
    """Rows `vectors` (rank x D) orthonormal, spanning every vector added; vector i is `vectors.T @ coords[:, i]`.

    `capacity`: how many vectors to make room for at once (the basis is one preallocated matrix, so adding
    allocates nothing D-sized); past it the room doubles, which copies the basis once. `reduce`: under torchrun,
    each rank holds some columns of every vector and the inner products are summed over the ranks.
    """

    def __init__(self, dim: int, *, tol: float = 1e-6, capacity: int = 8, device: torch.device | str = "cpu",
                 reduce: Reduce | None = None, allocate: Allocate | None = None):
        if not (0.0 <= tol < 1.0):
            raise TwaError(f"tol must be a number in [0, 1) (got {tol})")
        self.dim = dim
        self.tol = tol
        self.reduce = reduce
        self._allocate = allocate or (lambda rows, width: torch.empty(rows, width, dtype=torch.float32, device=device))
        self._q = self._allocate(max(capacity, 1), dim)
        self._coords = torch.zeros(max(capacity, 1), max(capacity, 1), dtype=torch.float64)
        self.rank = 0  # directions so far
        self.count = 0  # vectors added so far
        self.dropped: list[Dropped] = []

    @property
    def vectors(self) -> torch.Tensor:
        """The basis, (rank x D): a view of the orthogonalizer's storage, not a copy."""
        return self._q[: self.rank]

    @property
    def coords(self) -> torch.Tensor:
        """(rank x count) fp64: the coordinates of every vector added."""
        return self._coords[: self.rank, : self.count]

    def free_rows(self, count: int) -> torch.Tensor:
        """The next `count` rows of the basis's storage, not yet part of the basis: a place to read vectors into
        and pass to `add_block` (their own place in the basis), so adding them needs no memory of its own."""
        self._make_room(count)
        return self._q[self.rank : self.rank + count]

    def add(self, vector: torch.Tensor) -> bool:
        """Add one flat vector (copied); returns whether it added a direction. A vector holding NaN or Inf is
        refused (`NotFiniteRows`)."""
        block = vector.detach().reshape(1, -1).to(self._q.device, torch.float32, copy=True)
        return self.add_block(block)[0]

    def add_block(self, block: torch.Tensor) -> list[bool]:
        """Add the rows of `block` (b x D fp32, on the basis's device, or `free_rows(b)`), which are overwritten
        as scratch; returns for each row whether it added a direction. A block with a row holding NaN or Inf is refused
        whole, before anything changes (`NotFiniteRows`, the block as it came): the rows' fp64 norms, needed
        anyway, are finite exactly when every entry is (squares of fp32 values cannot overflow fp64), so the
        check costs no pass of its own."""
        b = block.shape[0]
        norms = _norms(block, self.reduce)
        bad = [j for j in range(b) if not math.isfinite(float(norms[j]))]
        if bad:
            raise NotFiniteRows(bad)
        self._make_room(b)
        q, coords, n0, k = self._q, self._coords, self.count, self.rank
        c_old = torch.zeros(k, b, dtype=torch.float64)
        _project_out(q[:k], block, c_old, self.reduce)
        coords[:k, n0 : n0 + b] = c_old
        block_start = k  # directions added by this block so far are q[block_start:k]
        added = []
        for j in range(b):
            row = block[j : j + 1]
            c_blk = torch.zeros(k - block_start, 1, dtype=torch.float64)
            _project_out(q[block_start:k], row, c_blk, self.reduce)
            coords[block_start:k, n0 + j] += c_blk[:, 0]
            residual = float(_norms(row, self.reduce)[0])
            relative = residual / max(float(norms[j]), 1e-300)
            if relative <= self.tol:
                self.dropped.append(Dropped(n0 + j, relative))
                added.append(False)
                continue
            torch.div(row[0], residual, out=q[k])
            coords[k, n0 + j] = residual
            k += 1
            added.append(True)
        self.rank, self.count = k, n0 + b
        return added

    def orthogonality_error(self) -> float:
        return orthogonality_error(self.vectors, self.reduce)

    def _make_room(self, more: int) -> None:
        rows, cols = self._q.shape[0], self._coords.shape[1]
        if self.rank + more > rows:
            grown = self._allocate(max(2 * rows, self.rank + more), self.dim)
            grown[: self.rank].copy_(self._q[: self.rank])
            self._q = grown
        if self.count + more > cols or self.rank + more > self._coords.shape[0]:
            size = max(2 * cols, self.count + more, self._q.shape[0])
            grown_c = torch.zeros(size, size, dtype=torch.float64)
            grown_c[: self.rank, : self.count] = self.coords
            self._coords = grown_c

    # The basis travels with a training run's checkpoint (Lightning's callback state, a Trainer's folder).
    def state_dict(self) -> dict[str, Any]:
        return {"vectors": self.vectors, "coords": self.coords, "count": self.count, "tol": self.tol,
                "dropped": [[d.index, d.relative_residual] for d in self.dropped]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vectors, coords = state["vectors"], state["coords"]
        if vectors.dim() != 2 or vectors.shape[1] != self.dim or tuple(coords.shape) != (vectors.shape[0],
                                                                                           int(state["count"])):
            raise TwaError(f"a saved basis of shape {list(vectors.shape)} (coordinates {list(coords.shape)}) does "
                           f"not fit {self.dim} weights")
        self.rank, self.count = 0, 0
        self._make_room(max(vectors.shape[0], int(state["count"])))
        self._q[: vectors.shape[0]].copy_(vectors)
        self._coords[: coords.shape[0], : coords.shape[1]] = coords
        self.rank, self.count, self.tol = int(vectors.shape[0]), int(state["count"]), float(state["tol"])
        self.dropped = [Dropped(int(i), float(r)) for i, r in state["dropped"]]


class NotFiniteRows(TwaError):
    """Rows of a block that hold NaN or Inf (indices into the block); nothing was added."""

    def __init__(self, rows: list[int]):
        super().__init__("the weights hold NaN or Inf: they cannot join the basis")
        self.rows = rows


def _chunk(rows: int) -> int:
    return max(4096, CHUNK_BYTES // (8 * max(rows, 1)))


def _project_out(q: torch.Tensor, x: torch.Tensor, coords: torch.Tensor, reduce: Reduce | None = None) -> None:
    """x <- x - q.T (q x.T), twice; the removed components are added to coords (k, b).

    Both passes form their inner products in fp64 from cache-sized fp64 copies. An fp32 first pass would be
    as orthogonal, but its rounding moves the residual of a nearly dependent checkpoint by ~1e-7 of the
    checkpoint's norm, differently for each summation order, so bases made with different shardings
    (torchrun) or thread counts would differ by that over the residual's size (1e-4 measured on a small MLP's
    checkpoints, tests/test_distributed.py); in fp64 they agree within the 1e-5 that test asserts. The updates
    are fp32 GEMMs in place: their rounding is noise of the size of x's own fp32 rounding, random with respect
    to q. The first update and the second pass's inner products go chunk by chunk in one sweep over q (three
    sweeps in all, not four: on a large basis the sweeps are the cost). Together with `_norms`, this is the only
    place that reduces over D.
    """
    if q.shape[0] == 0:
        return
    first = _inner_products(q, x)
    if reduce is not None:
        reduce(first)
    second = _inner_products(q, x, subtract=first.t().to(device=x.device, dtype=x.dtype))
    if reduce is not None:
        reduce(second)
    x.addmm_(second.t().to(device=x.device, dtype=x.dtype), q, alpha=-1.0)
    coords += first
    coords += second


def _inner_products(q: torch.Tensor, x: torch.Tensor, subtract: torch.Tensor | None = None) -> torch.Tensor:
    """q x.T (k, b) in fp64 on the CPU, multiplied and summed in fp64 chunk by chunk over D. `subtract` (b, k):
    first x <- x - subtract q in fp32, in place, in the same sweep (each chunk of q is read once)."""
    dim = x.shape[1]
    out = torch.zeros(q.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
    step = _chunk(q.shape[0] + x.shape[0])
    q64 = torch.empty(q.shape[0], step, dtype=torch.float64, device=x.device)
    x64 = torch.empty(x.shape[0], step, dtype=torch.float64, device=x.device)
    for s in range(0, dim, step):
        width = min(step, dim - s)
        qs, xs = q[:, s : s + width], x[:, s : s + width]
        if subtract is not None:
            xs.addmm_(subtract, qs, alpha=-1.0)
        qc, xc = q64[:, :width], x64[:, :width]
        qc.copy_(qs)
        xc.copy_(xs)
        out.addmm_(qc, xc.t())
    return out.cpu()


def _norms(x: torch.Tensor, reduce: Reduce | None = None) -> torch.Tensor:
    """Euclidean norm of each row of x, accumulated in fp64 chunk by chunk over D."""
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    step = _chunk(x.shape[0])
    x64 = torch.empty(x.shape[0], step, dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[1], step):
        width = min(step, x.shape[1] - s)
        xc = x64[:, :width]
        xc.copy_(x[:, s : s + width])
        out += (xc * xc).sum(dim=1)
    out = out.cpu()
    if reduce is not None:
        reduce(out)
    return out.sqrt()


def inner_products(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """q x.T in fp64, chunk by chunk over D (no fp64 copy of either)."""
    return _inner_products(q, x)


def orthogonality_error(vectors: torch.Tensor, reduce: Reduce | None = None) -> float:
    """max |P P^T - I|, with fp64 accumulation."""
    k = vectors.shape[0]
    gram = _inner_products(vectors, vectors)
    if reduce is not None:
        reduce(gram)
    return float((gram - torch.eye(k, dtype=torch.float64)).abs().max()) if k else 0.0


def combine(vectors: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """vectors.T @ coefficients in fp64 on the CPU, chunk by chunk over D (no fp64 copy of the basis)."""
    k, dim = vectors.shape
    coefficients = coefficients.to(torch.float64).cpu()
    out = torch.empty(dim, dtype=torch.float64)
    step = _chunk(k)
    scratch = torch.empty(k, step, dtype=torch.float64)
    for s in range(0, dim, step):
        width = min(step, dim - s)
        chunk = scratch[:, :width]
        chunk.copy_(vectors[:, s : s + width])
        torch.mv(chunk.t(), coefficients, out=out[s : s + width])
    return out
