"""`twa orthogonalize`: an orthonormal basis of the span of the selected checkpoints (streamed, numerically
robust), in one process or with its columns split over the ranks of a torchrun job."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twa_cli.commands.common import (
    compatible,
    data_paths,
    described,
    pick,
    subspace_names,
)
from twa_cli.commands.estimates import Plan, plan_orthogonalize
from twa_cli.core.basis import check_tol
from twa_cli.core.placement import placement_for
from twa_cli.core.selection import Selection
from twa_cli.errors import TwaError
from twa_cli.io.atomic import through_link
from twa_cli.io.outputs import check_not_an_input, check_output
from twa_cli.io.readers import ReadOptions
from twa_cli.tasks.resolve import TaskRequest
from twa_cli.units import STORAGE_DTYPES


@dataclass
class OrthogonalizeRequest:
    selection: Selection = field(default_factory=Selection)
    read: ReadOptions = field(default_factory=ReadOptions)
    task: TaskRequest = field(default_factory=TaskRequest)
    tol: float = 1e-6  # a checkpoint whose residual is below this fraction of its norm adds no direction
    dtype: str = "float32"  # storage precision of the basis

    def __post_init__(self) -> None:
        check_tol(self.tol)
        if self.dtype not in STORAGE_DTYPES:
            raise TwaError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)} (got '{self.dtype}')")


@dataclass
class OrthogonalizeResult:
    path: Path
    checkpoints: int
    rank: int
    dimension: int
    dropped: list[dict[str, Any]]
    errors: dict[str, float]
    holdings: list[dict[str, Any]]  # under torchrun: what each rank holds of the basis
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.path), "checkpoints": self.checkpoints, "rank": self.rank,
                "dimension": self.dimension, "dropped": self.dropped, "errors": self.errors, "shards": self.holdings}


def orthogonalize(folder: str | Path, output: str | Path, request: OrthogonalizeRequest | None = None, *,
                  force: bool = False, dry_run: bool = False, progress: Callable[[int, int], None] | None = None,
                  invocation: dict[str, Any] | None = None) -> OrthogonalizeResult | Plan:
    """Write the basis of the span of the selected checkpoints of `folder` to `output`; with `dry_run`, the plan.
    Under torchrun every rank calls this, builds its columns, and writes them beside rank 0's index."""
    request = request or OrthogonalizeRequest()
    output = Path(output)
    with placement_for("cpu") as placement:
        check_output(output, force, inputs=[folder])
        ckpts = pick(folder, request.selection, request.read)
        compatible(ckpts)
        check_not_an_input(output, data_paths(request.task, ckpts[0]), folder=False)  # the data is an input too
        names, ckpts = subspace_names(request.task, ckpts)
        if dry_run:
            return plan_orthogonalize(ckpts, dtype=request.dtype, trainable=names)
        basis = placement.orthogonalize(ckpts, names=names, tol=request.tol, dtype=request.dtype,
                                        progress=progress if placement.lead else None,
                                        recorded=described(request.task, ckpts[0]))
        # A link the user named is written through: the file it names is replaced, the link stays.
        placement.save_basis(basis, through_link(output), invocation=invocation, exclusive=not force)
        path = output
        holdings = placement.holdings(basis)
    dim = basis.size
    return OrthogonalizeResult(path, len(ckpts), basis.rank, dim, basis.dropped, basis.errors, holdings,
                               basis.rank * dim * basis.vectors.element_size())
