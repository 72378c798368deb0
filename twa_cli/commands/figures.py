"""The pictures of `twa plot`, each drawn from plain numbers into one image file.

matplotlib is an optional dependency (`pip install twa-cli[plot]`), imported only when a picture is drawn,
and used through `matplotlib.figure.Figure` alone: no pyplot, no GUI backend, no global state, so drawing
works on a headless machine and in threads. Every picture has a fixed size in pixels (its `SIZE` in inches
times `DPI`), so a caller knows what it gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twa_cli.errors import TwaError
from twa_cli.io.atomic import atomic_path

FORMATS = ("png", "svg", "pdf")
DPI = 110
SIZE = (7.5, 4.5)  # inches
WIDE = (12.5, 4.8)  # two panels side by side

SGD_COLOR, SWA_COLOR, TWA_COLOR = "#1f77b4", "#2ca02c", "#d62728"


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise TwaError("twa plot needs matplotlib: pip install 'twa-cli[plot]'") from exc


def _figure(size: tuple[float, float] = SIZE) -> Any:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=DPI, layout="constrained")


def pixel_size(size: tuple[float, float] = SIZE) -> tuple[int, int]:
    """Width and height in pixels of a PNG drawn at `size` inches."""
    return round(size[0] * DPI), round(size[1] * DPI)


def _save(fig: Any, path: Path, fmt: str) -> Path:
    if fmt not in FORMATS:
        raise TwaError(f"--format must be one of {', '.join(FORMATS)} (got '{fmt}')")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=DPI)
    return path


# ------------------------------------------------------------------------------------------ coefficients


def coefficients_figure(alphas: Sequence[float], steps: Sequence[int | None], epochs: Sequence[float | None],
                        path: Path, fmt: str = "png") -> Path:
    """TWA's learned coefficient of each checkpoint against its step, with SWA's uniform 1/n for comparison."""
    fig = _figure()
    ax = fig.add_subplot()
    n = len(alphas)
    by_step = all(s is not None for s in steps)
    xs = [float(s) for s in steps] if by_step else list(range(n))  # type: ignore[arg-type]
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.vlines(xs, 0.0, alphas, color=TWA_COLOR, lw=1.2, alpha=0.6)
    ax.plot(xs, alphas, "o", color=TWA_COLOR, ms=6, label="TWA: learned coefficient $\\alpha_i$")
    ax.axhline(1.0 / n, color=SWA_COLOR, ls="--", lw=1.5, label=f"SWA: uniform 1/n = {1.0 / n:.3g}")
    ax.set_xlabel("checkpoint step (training iterations)" if by_step else "checkpoint position in the folder")
    ax.set_ylabel("averaging coefficient (weight of the checkpoint)")
    ax.set_title(f"Weights of {n} checkpoints in the TWA average (they sum to {sum(alphas):.3f})")
    per_epoch = _steps_per_epoch(steps, epochs) if by_step else None
    if per_epoch:
        top = ax.secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
        top.set_xlabel("epoch")
    _legend_below(fig, ax)
    ax.grid(alpha=0.25)
    return _save(fig, path, fmt)


def layer_coefficients_figure(groups: Sequence[str], alphas: Sequence[Sequence[float]], steps: Sequence[int | None],
                              path: Path, fmt: str = "png") -> Path:
    """Layer-wise TWA: the learned coefficient of each checkpoint (columns) in each group of tensors (rows), as a
    heat map centred on SWA's uniform 1/n (white), with the groups' row sums on the right."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    table = np.asarray(alphas, dtype=float)
    rows, n = table.shape
    fig = _figure((SIZE[0], max(SIZE[1], 1.2 + 0.28 * rows)))
    ax = fig.add_subplot()
    uniform = 1.0 / n
    spread = max(float(np.abs(table - uniform).max()), 1e-12)
    norm = TwoSlopeNorm(vcenter=uniform, vmin=uniform - spread, vmax=uniform + spread)
    image = ax.imshow(table, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    labels = [str(s) if s is not None else str(i) for i, s in enumerate(steps)]
    tick = max(1, n // 12)
    ax.set_xticks(range(0, n, tick), labels[::tick])
    ax.set_yticks(range(rows), [g if len(g) <= 40 else "..." + g[-37:] for g in groups], fontsize=7)
    ax.set_xlabel("checkpoint step" if all(s is not None for s in steps) else "checkpoint position")
    ax.set_title(f"Layer-wise TWA: coefficients of {n} checkpoints in {rows} groups of tensors (white = 1/n)")
    fig.colorbar(image, ax=ax, label="averaging coefficient")
    return _save(fig, path, fmt)


def _steps_per_epoch(steps: Sequence[int | None], epochs: Sequence[float | None]) -> float | None:
    """The run's steps per epoch when every checkpoint agrees on it (a step axis with epochs on top)."""
    ratios = [s / e for s, e in zip(steps, epochs, strict=True) if s is not None and e]
    if not ratios or max(ratios) - min(ratios) > 1e-4 * max(ratios):  # epochs are stored to 6 digits
        return None
    return ratios[0]


# ------------------------------------------------------------------------------------------- trajectory


@dataclass
class Trajectory:
    points: Any  # (n, 2) the checkpoints on the plane
    epochs: Sequence[float] | None  # of each checkpoint, for the colour scale
    shares: tuple[float, float]  # of the variance, along each axis
    twa: Any | None = None  # (2,) or None
    twa_label: str = "TWA"


def trajectory_figure(traj: Trajectory, path: Path, fmt: str = "png", surface: Any | None = None) -> Path:
    """The checkpoints on their first two principal directions (mean = SWA = origin), TWA marked; with a
    `surface.Surface`, over the training loss and the test error of the plane (two panels)."""
    if surface is None:
        fig = _figure()
        ax = fig.add_subplot()
        _draw_trajectory(fig, ax, traj)
        _legend_below(fig, ax)
        fig.suptitle(_trajectory_title(traj))
        return _save(fig, path, fmt)
    import numpy as np
    from matplotlib.colors import LogNorm

    fig = _figure(WIDE)
    left, right = fig.subplots(1, 2)
    xs, ys = surface.xs.numpy(), surface.ys.numpy()
    for ax, values, label, cmap in (
        (left, surface.train_loss.numpy(), "training loss (log scale)", "viridis"),
        (right, surface.test_error.numpy(), f"{surface.test_label} (log scale)", "magma"),
    ):
        # Log-spaced levels: the interesting part of both surfaces is near their minimum.
        positive = values[values > 0]
        floor = positive.min() / 2 if positive.size else 1e-3
        values = np.clip(values, floor, None)
        levels = np.geomspace(values.min(), values.max() * 1.0001, 15)
        filled = ax.contourf(xs, ys, values, levels=levels, norm=LogNorm(), cmap=cmap)
        ax.contour(xs, ys, values, levels=levels, colors="white", linewidths=0.3, alpha=0.5)
        bar = fig.colorbar(filled, ax=ax, label=label)
        ticks = levels[::2]  # labelled at the contour levels: a log axis may hold no power of ten
        bar.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks])
        bar.minorticks_off()
        _draw_trajectory(fig, ax, traj, colorbar=False, on_surface=True)
    left.set_title("training loss")
    right.set_title(surface.test_label.removesuffix(" (%)"))
    _legend_below(fig, left)
    bn = "BatchNorm recomputed at each point" if surface.bn_recomputed else "no BatchNorm"
    fig.suptitle(f"{_trajectory_title(traj)}\n{len(xs)}x{len(ys)} grid, {surface.batches} batches per point, {bn}",
                 fontsize="medium")
    return _save(fig, path, fmt)


def _legend_below(fig: Any, ax: Any) -> None:
    """The legend under the axes, where it cannot cover a point; in two rows when one would not fit."""
    handles, labels = ax.get_legend_handles_labels()
    width_chars = fig.get_figwidth() * 13  # characters of the small font a row holds, about
    one_row = sum(len(label) + 6 for label in labels) <= width_chars
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels) if one_row else (len(labels) + 1) // 2,
               frameon=False, fontsize="small")


def _trajectory_title(traj: Trajectory) -> str:
    return (f"{len(traj.points)} checkpoints on their first two principal directions "
            f"({100 * sum(traj.shares):.1f}% of the variance)")


def _draw_trajectory(fig: Any, ax: Any, traj: Trajectory, *, colorbar: bool = True, on_surface: bool = False) -> None:
    from matplotlib import patheffects

    pts = traj.points
    line = "white" if on_surface else "0.55"
    ax.plot(pts[:, 0], pts[:, 1], "-", color=line, lw=1.0, zorder=2)
    colors = traj.epochs if traj.epochs is not None else list(range(len(pts)))
    dots = ax.scatter(pts[:, 0], pts[:, 1], c=colors, cmap="cool", s=28, edgecolors="black", linewidths=0.4,
                      zorder=3, label="checkpoints (SGD trajectory)")
    if colorbar:
        fig.colorbar(dots, ax=ax, label="epoch of the checkpoint" if traj.epochs is not None else "checkpoint")
    halo = [patheffects.withStroke(linewidth=2.5, foreground="white")]  # readable on any background
    ax.annotate("first", pts[0], xytext=(6, -12), textcoords="offset points", fontsize="small", path_effects=halo)
    ax.annotate("last", pts[-1], xytext=(6, 4), textcoords="offset points", fontsize="small", path_effects=halo)
    ax.scatter([0.0], [0.0], marker="X", s=140, color=SWA_COLOR, edgecolors="black", linewidths=0.8, zorder=4,
               label="SWA (mean of the checkpoints)")
    if traj.twa is not None:
        ax.scatter([traj.twa[0]], [traj.twa[1]], marker="*", s=300, color=TWA_COLOR, edgecolors="black",
                   linewidths=0.8, zorder=5, label=traj.twa_label)
    ax.set_xlabel(f"direction 1 ({100 * traj.shares[0]:.1f}% of variance), weight-space distance")
    ax.set_ylabel(f"direction 2 ({100 * traj.shares[1]:.1f}%), distance")
    if not on_surface:
        ax.margins(0.06)  # room for the markers at the edges
        ax.grid(alpha=0.25)


# ------------------------------------------------------------------------------------------ accuracies


def accuracy_figure(sgd: list[dict[str, Any]], twa: list[dict[str, Any]], twa_start: float | None, path: Path,
                    fmt: str = "png") -> Path:
    """Per-epoch train/test accuracy of `sample` (SGD) and of `train-subspace` (TWA); TWA's epochs are counted
    after the last checkpoint it averages (`twa_start`), as the paper counts "20 + 4 epochs"."""
    fig = _figure()
    ax = fig.add_subplot()
    offset = twa_start or 0.0
    for rows, name, color, shift in ((sgd, "SGD", SGD_COLOR, 0.0), (twa, "TWA", TWA_COLOR, offset)):
        if not rows:
            continue
        epochs = [shift + r["epoch"] for r in rows]
        if any("test_acc" in r for r in rows):
            ax.plot(epochs, [r.get("test_acc") for r in rows], "-o", color=color, ms=4, label=f"{name} test")
        ax.plot(epochs, [r["train_acc"] for r in rows], "--", color=color, lw=1.2, label=f"{name} train")
    if twa and twa_start is not None:
        ax.axvline(twa_start, color="0.5", ls=":", lw=1)
        ax.annotate(f"TWA starts: last checkpoint\naveraged (epoch {twa_start:g})", (twa_start, 0.03),
                    xycoords=("data", "axes fraction"), xytext=(5, 0), textcoords="offset points",
                    fontsize="small", color="0.3")
    ax.set_xlabel("epoch" + (" (TWA's epochs counted after the last checkpoint it averages)" if twa else ""))
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy per epoch (train: running average during the epoch; test: at its end)",
                 fontsize="medium")
    _legend_below(fig, ax)
    ax.grid(alpha=0.25)
    return _save(fig, path, fmt)


# -------------------------------------------------------------------------------------------- spectrum


def spectrum_figure(shares: Sequence[float], count: int, path: Path, fmt: str = "png",
                    fraction: float = 0.99) -> Path:
    """The share of variance along each principal direction (log scale) and its running total (Figure 2)."""
    import numpy as np

    fig = _figure(WIDE)
    left, right = fig.subplots(1, 2)
    shares_pct = 100.0 * np.asarray(shares)
    ks = np.arange(1, len(shares_pct) + 1)
    needed = int(np.searchsorted(np.cumsum(shares_pct), 100.0 * fraction - 1e-10) + 1)
    left.bar(ks, shares_pct, color=[SGD_COLOR if k <= needed else "0.7" for k in ks])
    left.set_yscale("log")
    left.set_xlabel("principal direction")
    left.set_ylabel("share of the variance (%)")
    left.set_title("variance along each direction")
    right.plot(ks, np.cumsum(shares_pct), "-o", color=SGD_COLOR, ms=4)
    right.axhline(100.0 * fraction, color="0.4", ls="--", lw=1)
    right.axvline(needed, color="0.4", ls=":", lw=1)
    right.annotate(f"{needed} direction{'s' if needed > 1 else ''} hold {100 * fraction:g}%", (needed, 100 * fraction),
                   xytext=(8, -24), textcoords="offset points", fontsize="small")
    right.set_xlabel("number of leading directions")
    right.set_ylabel("variance kept (%)")
    right.set_title("cumulative")
    for ax in (left, right):
        ax.grid(alpha=0.25)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"PCA of {count} checkpoints: {needed} of {len(shares_pct)} directions hold "
                 f"{100 * fraction:g}% of the variance", fontsize="medium")
    return _save(fig, path, fmt)


# ------------------------------------------------------------------------------------ epochs of checkpoints


@dataclass
class SeriesPoint:
    epochs: float
    accuracy: float  # mean over repeats
    std: float
    count: int


def epochs_used_figure(series: dict[str, list[SeriesPoint]], reference: tuple[str, float] | None, path: Path,
                       fmt: str = "png", reference_epochs: float | None = None) -> Path:
    """Figure 3: test accuracy against the epochs of checkpoints used, SGD's final accuracy as a line."""
    fig = _figure()
    ax = fig.add_subplot()
    colors = {"SGD": SGD_COLOR, "SWA": SWA_COLOR, "TWA": TWA_COLOR}
    markers = {"SGD": "s", "SWA": "X", "TWA": "o"}
    for name, points in series.items():
        points = sorted(points, key=lambda p: p.epochs)
        ax.errorbar([p.epochs for p in points], [p.accuracy for p in points],
                    yerr=[p.std for p in points] if any(p.count > 1 for p in points) else None,
                    fmt="-" + markers.get(name, "o"), color=colors.get(name), ms=6, capsize=3, label=name)
    if reference is not None:
        ax.axhline(reference[1], color="black", ls="--", lw=1.2, label=f"{reference[0]}: {reference[1]:.2f}%")
    right = max([p.epochs for pts in series.values() for p in pts] + [reference_epochs or 0.0])
    ax.set_xlim(0, right * 1.08 + 0.5)  # from zero epochs, so the savings read off the axis
    ax.set_xlabel("epochs of checkpoints used")
    ax.set_ylabel("test accuracy (%)")
    repeats = max((p.count for pts in series.values() for p in pts), default=1)
    extra = f" (mean ± std over {repeats} runs)" if repeats > 1 else ""
    ax.set_title(f"Accuracy against epochs of checkpoints used{extra}", fontsize="medium")
    _legend_below(fig, ax)
    ax.grid(alpha=0.25)
    return _save(fig, path, fmt)
