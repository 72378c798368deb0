"""The learned averaging coefficients, one typed report for `coefficients.json`, the result object and `plot`.

`kind` says which subspace TWA trained in: "span" (the paper's: one alpha per checkpoint, any sum), "affine"
(the checkpoints' affine hull: the alphas sum to exactly 1) or "layer" (one alpha per checkpoint and group of
tensors: a table, `groups`). Checkpoint i of `sources` gets `alpha[i]`, so sum_i alpha_i w_i is TWA's weights
(on the trainable tensors; plus `offspan_scale` times the start's part outside the span, for a start given as
a file off the span).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twa_cli.errors import TwaError
from twa_cli.io.checkpoints import Source

KINDS = ("span", "affine", "layer")


@dataclass
class LayerGroup:
    tensors: list[str]
    rank: int
    alpha: list[float]


@dataclass
class CoefficientReport:
    kind: str
    sources: list[Source]
    rank: int
    alpha: list[float] | None = None  # per source ("span", "affine")
    groups: list[LayerGroup] | None = None  # per group of tensors and source ("layer")
    dropped: list[dict[str, Any]] = field(default_factory=list)
    offspan_scale: float | None = None

    @property
    def sum(self) -> float | None:
        return sum(self.alpha) if self.alpha is not None else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.alpha is not None:
            out["coefficients"] = [{"path": s.path, "step": s.step, "epoch": s.epoch, "alpha": a}
                                   for s, a in zip(self.sources, self.alpha, strict=True)]
            out["sum"] = self.sum
        if self.groups is not None:
            out["layers"] = [{"tensors": g.tensors, "rank": g.rank, "alpha": g.alpha} for g in self.groups]
        out.update(sources=[s.to_dict() for s in self.sources], rank=self.rank, dropped=self.dropped,
                   offspan_scale=self.offspan_scale)
        return out

    @staticmethod
    def from_json(obj: Any, where: Path | str) -> CoefficientReport:
        """A report as `coefficients.json` holds it (also as version 0.1 of the tool wrote it)."""
        try:
            rows = obj.get("coefficients")
            layers = obj.get("layers")
            if obj.get("sources") is not None:
                sources = [Source.from_json(s) for s in obj["sources"]]
            else:
                sources = [Source.from_json(r) for r in rows]
            groups = None if layers is None else [
                LayerGroup([str(t) for t in g["tensors"]], int(g["rank"]), [float(a) for a in g["alpha"]])
                for g in layers]
            alpha = None if rows is None else [float(r["alpha"]) for r in rows]
            kind = obj.get("kind") or ("layer" if groups is not None else "span")
            if kind not in KINDS or (alpha is None and groups is None):
                raise ValueError(f"kind {kind!r}")
            return CoefficientReport(kind, sources, int(obj.get("rank") or len(sources)), alpha, groups,
                                     list(obj.get("dropped") or []), obj.get("offspan_scale"))
        except (AttributeError, KeyError, TypeError, ValueError, TwaError) as exc:
            raise TwaError(f"{where}: not a coefficients file written by `twa train-subspace` ({exc})") from exc
