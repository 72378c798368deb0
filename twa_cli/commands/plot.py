"""`twa plot`: find out what each input is, and draw every picture the inputs allow.

Inputs (any number, combined):
- a `train-subspace` output folder (coefficients.json, metrics.jsonl, twa.safetensors, maybe basis.safetensors);
- a `sample` folder (ckpt-*.safetensors, metrics.jsonl);
- a basis file from `twa orthogonalize`;
- `twa eval --json` output, or a benchmark JSON (below), for the accuracy against epochs of checkpoints used.

The PCA of the trajectory needs the checkpoints' coordinates: from a basis file given, the output folder's
basis, a basis file beside the output folder made from the same checkpoints, or else the checkpoints
themselves, orthogonalized here (TWA's sources when known, else the sample folder's selection).

Benchmark JSON (one row per method, epochs and repeat; repeats become mean and standard deviation):
    {"figure3": {"reference": {"label": "SGD final (40 epochs)", "accuracy": 68.7},
                 "points": [{"method": "TWA", "epochs": 20, "accuracy": 67.1}, ...]}}
(the "figure3" wrapper is optional).
"""

from __future__ import annotations

import math
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twa_cli.commands import figures
from twa_cli.commands.common import (
    compatible,
    data_paths,
    pick,
    resolve_device,
    subspace_names,
)
from twa_cli.core.basis import Basis, orthogonalize
from twa_cli.core.basis_files import is_basis_file, load_basis
from twa_cli.core.coefficients import CoefficientReport
from twa_cli.core.pca import Pca, coordinates_of, pca_of_basis
from twa_cli.core.selection import Selection
from twa_cli.errors import TwaError
from twa_cli.io.atomic import parents_made, place, temp_name
from twa_cli.io.checkpoints import load_tensors, read_checkpoint, sources_of
from twa_cli.io.outputs import check_not_an_input, check_output
from twa_cli.io.readers import ReadOptions
from twa_cli.io.runfiles import (
    BASIS_FILE,
    COEFFICIENTS_FILE,
    HF_RESULT_FILE,
    METRICS_FILE,
    RESULT_FILE,
    read_json,
    read_jsonl,
)
from twa_cli.tasks.resolve import Recorded, TaskRequest, resolve_task

# The loss surface grid, per side: at least a square, at most a million points (each a pass over the data).
MIN_RESOLUTION, MAX_RESOLUTION = 2, 1000
OFF_SPAN = 1e-2  # relative distance from the span above which the TWA point is called a projection


@dataclass
class PlotOptions:
    fmt: str = "png"
    surface: bool = False
    resolution: int = 11
    surface_batches: int = 4
    batch_size: int = 128
    selection: Selection = field(default_factory=Selection)  # of a sample folder's checkpoints
    read: ReadOptions = field(default_factory=ReadOptions)
    task: TaskRequest = field(default_factory=TaskRequest)
    device: str = "auto"
    force: bool = False


@dataclass
class Drawn:
    name: str
    path: Path
    what: str


@dataclass
class PlotResult:
    drawn: list[Drawn] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # what could not be drawn, and why


@dataclass
class Inputs:
    twa_dir: Path | None = None
    sample_dir: Path | None = None
    basis_file: Path | None = None
    evals: list[Path] = field(default_factory=list)
    benchmarks: list[Path] = field(default_factory=list)


def classify(srcs: list[Path]) -> Inputs:
    """Say what each input is; a TwaError for anything `twa plot` cannot read."""
    found = Inputs()
    for src in srcs:
        if not src.exists():
            raise TwaError(f"{src}: no such file or folder")
        if src.is_dir():
            if (src / COEFFICIENTS_FILE).exists():
                _set_once(found, "twa_dir", src)
            elif list(src.glob("*.safetensors")) or (src / METRICS_FILE).exists():
                _set_once(found, "sample_dir", src)
            else:
                raise TwaError(f"{src}: neither a train-subspace output (no {COEFFICIENTS_FILE}) "
                               "nor a checkpoint folder")
        elif src.suffix == ".json":
            obj = read_json(src)
            if isinstance(obj, dict) and isinstance(obj.get("results"), list):
                found.evals.append(src)
            elif isinstance(obj, dict) and ("figure3" in obj or "points" in obj):
                found.benchmarks.append(src)
            else:
                raise TwaError(f"{src}: neither `twa eval --json` output nor a benchmark JSON with \"points\"")
        elif src.suffix == ".safetensors":
            kind = read_checkpoint(src).kind
            if kind == "basis":
                _set_once(found, "basis_file", src)
            elif kind == "twa" and (src.parent / COEFFICIENTS_FILE).exists():
                _set_once(found, "twa_dir", src.parent)
            else:
                raise TwaError(f"{src}: a single '{kind}' file; pass its folder, a basis file "
                               "or a train-subspace output")
        else:
            raise TwaError(f"{src}: not a folder, .safetensors or .json file that twa plot reads")
    return found


def _data_read(inputs: Inputs, opts: PlotOptions) -> list[Path]:
    """The data the inputs' checkpoints record (or the flags name): inputs too, which no picture may be written
    into (an image folder's class folders, a text file)."""
    ckpts = []
    if inputs.sample_dir is not None:
        ckpts.append(pick(inputs.sample_dir)[0])
    if inputs.twa_dir is not None:
        ckpts += [read_checkpoint(p) for p in sorted(inputs.twa_dir.glob("*.safetensors"))[:1]]
    if inputs.basis_file is not None:
        ckpts.append(read_checkpoint(inputs.basis_file))
    return [path for ckpt in ckpts or [None] for path in data_paths(opts.task, ckpt)]


def _set_once(found: Inputs, name: str, value: Path) -> None:
    if getattr(found, name) is not None:
        raise TwaError(f"{value}: a second {name.replace('_', ' ')} (already have {getattr(found, name)})")
    setattr(found, name, value)


def plot(srcs: list[str | Path], out: str | Path, opts: PlotOptions | None = None,
         progress: Callable[[int, int], None] | None = None) -> PlotResult:
    """Draw every picture the inputs allow into `out`; returns what was drawn and what was not, and why."""
    opts = opts or PlotOptions()
    figures.require_matplotlib()
    if opts.fmt not in figures.FORMATS:
        raise TwaError(f"--format must be one of {', '.join(figures.FORMATS)} (got '{opts.fmt}')")
    if not MIN_RESOLUTION <= opts.resolution <= MAX_RESOLUTION:
        raise TwaError(f"--resolution must be between {MIN_RESOLUTION} and {MAX_RESOLUTION} (got {opts.resolution}); "
                       "the loss surface is evaluated at resolution^2 points")
    paths = [Path(s) for s in srcs]
    out = Path(out)
    check_not_an_input(out, paths, folder=True)
    inputs = classify(paths)
    check_not_an_input(out, _data_read(inputs, opts), folder=True)
    result = PlotResult()
    plans = _plans(inputs, opts, result, progress)
    if not plans:
        raise TwaError("nothing to draw from these inputs: " + "; ".join(result.skipped))
    targets = {name: out / f"{name}.{opts.fmt}" for name, _ in plans}
    for target in targets.values():
        check_output(target, opts.force, inputs=paths)
    # Every picture is drawn first, then all are moved into place: a failure leaves none of them (and no folder).
    with parents_made(out / "picture"):
        staging = temp_name(out / "pictures")
        staging.mkdir()
        try:
            described = {name: draw(staging / targets[name].name) for name, draw in plans}
            for name, target in targets.items():
                place(staging / target.name, target, exclusive=not opts.force)
                result.drawn.append(Drawn(name, target, described[name]))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return result


Plan = tuple[str, Callable[[Path], str]]


def _plans(inputs: Inputs, opts: PlotOptions, result: PlotResult,
           progress: Callable[[int, int], None] | None) -> list[Plan]:
    """What can be drawn, as (name, draw) pairs; reasons for the rest go to `result.skipped`."""
    plans: list[Plan] = []
    coefficients = None
    if inputs.twa_dir:
        path = inputs.twa_dir / COEFFICIENTS_FILE
        coefficients = CoefficientReport.from_json(read_json(path), path)
    if coefficients is not None:
        plans.append(("coefficients", lambda p: _draw_coefficients(coefficients, p, opts.fmt)))
    else:
        result.skipped.append("coefficients: needs a train-subspace output folder")

    basis, origin = _find_basis(inputs, coefficients, opts)
    pca, why = None, "needs a basis file, or readable checkpoints"
    if basis is not None:
        try:
            pca = pca_of_basis(basis)
        except TwaError as exc:  # too few checkpoints, or all on a line: the other pictures still come
            why = str(exc)
    if basis is not None and pca is not None:
        task = resolve_task(opts.task, Recorded.of(origin, basis.recorded)) if opts.surface else None
        plans.append(("trajectory", lambda p: _draw_trajectory(basis, pca, origin, inputs, opts, p, progress, task)))
        plans.append(("spectrum", lambda p: _draw_spectrum(pca, basis, origin, p, opts.fmt)))
    else:
        result.skipped.append(f"trajectory and spectrum: {why}")
        if opts.surface:
            result.skipped.append("--surface: no trajectory plane to draw it on")

    sgd_rows, twa_rows, sgd_source = _metrics(inputs, coefficients)
    if sgd_rows or twa_rows:
        start = _last_source_epoch(coefficients)
        plans.append(("accuracy", lambda p: _draw_accuracy(sgd_rows, twa_rows, start, sgd_source, p, opts.fmt)))
    else:
        result.skipped.append(f"accuracy: no {METRICS_FILE} found")

    if inputs.evals or inputs.benchmarks:
        plans.append(("epochs-used", lambda p: _draw_epochs_used(inputs, p, opts.fmt)))
    else:
        result.skipped.append("epochs-used: needs `twa eval --json` output or a benchmark JSON")
    return plans


# ---------------------------------------------------------------------------------------------- reading


def _result_file(folder: Path | None) -> Path | None:
    """TWA's weights in a train-subspace folder (twa.safetensors, or model.safetensors for a Hugging Face model)."""
    if folder is None:
        return None
    return next((folder / n for n in (RESULT_FILE, HF_RESULT_FILE) if (folder / n).exists()), None)


def _source_paths(report: CoefficientReport) -> list[str]:
    return [s.path for s in report.sources]


def _find_basis(inputs: Inputs, coefficients: CoefficientReport | None, opts: PlotOptions) -> tuple[Basis | None, str]:
    if inputs.basis_file is not None:
        return load_basis(inputs.basis_file), str(inputs.basis_file)
    if inputs.twa_dir is not None and (inputs.twa_dir / BASIS_FILE).exists():
        return load_basis(inputs.twa_dir / BASIS_FILE), str(inputs.twa_dir / BASIS_FILE)
    if coefficients is not None and inputs.twa_dir is not None:
        sources = _source_paths(coefficients)
        for candidate in sorted(inputs.twa_dir.resolve().parent.glob("*.safetensors")):
            if is_basis_file(candidate) and [s.path for s in sources_of(read_checkpoint(candidate))] == sources:
                return load_basis(candidate), str(candidate)
        if all(Path(s).exists() for s in sources):
            ckpts = [read_checkpoint(s, opts.read) for s in sources]
            return _orthogonalized(ckpts, opts), f"the {len(ckpts)} checkpoints TWA averaged"
    if inputs.sample_dir is not None and any(inputs.sample_dir.glob("*.safetensors")):
        ckpts = pick(inputs.sample_dir, opts.selection, opts.read)
        return _orthogonalized(ckpts, opts), f"{len(ckpts)} checkpoints of {inputs.sample_dir}"
    return None, ""


def _orthogonalized(ckpts: list[Any], opts: PlotOptions) -> Basis:
    compatible(ckpts)
    names, ckpts = subspace_names(opts.task, ckpts)
    return orthogonalize(ckpts, names=names, hashes=False)


def _metrics(inputs: Inputs, coefficients: dict[str, Any] | None) -> tuple[list, list, Path | None]:
    """Per-epoch rows of the SGD run (the sample folder, or the folder TWA's checkpoints came from) and of TWA."""
    twa_rows = []
    if inputs.twa_dir is not None and (inputs.twa_dir / METRICS_FILE).exists():
        twa_rows = read_jsonl(inputs.twa_dir / METRICS_FILE)
    sgd_file = None
    if inputs.sample_dir is not None and (inputs.sample_dir / METRICS_FILE).exists():
        sgd_file = inputs.sample_dir / METRICS_FILE
    elif coefficients is not None and coefficients.sources:
        candidate = Path(coefficients.sources[0].path).parent / METRICS_FILE
        sgd_file = candidate if candidate.exists() else None
    return (read_jsonl(sgd_file) if sgd_file else []), twa_rows, sgd_file


def _last_source_epoch(coefficients: CoefficientReport | None) -> float | None:
    if coefficients is None:
        return None
    epochs = [s.epoch for s in coefficients.sources]
    return max(epochs) if epochs and all(e is not None for e in epochs) else None


# ---------------------------------------------------------------------------------------------- drawing


def _draw_coefficients(report: CoefficientReport, path: Path, fmt: str) -> str:
    steps = [s.step for s in report.sources]
    if report.groups is not None:
        names = [g.tensors[0] if len(g.tensors) == 1 else f"{g.tensors[0]} (+{len(g.tensors) - 1})"
                 for g in report.groups]
        figures.layer_coefficients_figure(names, [g.alpha for g in report.groups], steps, path, fmt)
        return (f"layer-wise coefficients of {len(report.sources)} checkpoints in {len(report.groups)} groups of "
                "tensors, against SWA's 1/n")
    alpha = report.alpha or []
    figures.coefficients_figure(alpha, steps, [s.epoch for s in report.sources], path, fmt)
    top = max(range(len(alpha)), key=lambda i: alpha[i])
    where = f"step {steps[top]}" if steps[top] is not None else f"position {top}"
    return (f"learned coefficients of {len(alpha)} checkpoints against SWA's 1/n "
            f"(largest {alpha[top]:.3f}, at {where})")


def _draw_trajectory(basis: Basis, pca: Pca, origin: str, inputs: Inputs, opts: PlotOptions, path: Path,
                     progress: Callable[[int, int], None] | None, task: Any) -> str:
    import torch

    twa_point, label, note = None, "TWA", ""
    result = _result_file(inputs.twa_dir)
    if result is not None:
        coords, residual = coordinates_of(basis, load_tensors(result))
        twa_point = pca.project(coords)
        in_plane = pca.plane_fraction(coords)
        label = f"TWA ({100 * in_plane:.0f}% of its distance from SWA lies in this plane)"
        note = f" ({100 * in_plane:.0f}% of its distance from SWA in the plane)"
        if residual > OFF_SPAN:
            label = f"TWA, projected: {100 * residual:.1f}% of it lies off the span"
            note = f"; TWA lies {100 * residual:.1f}% off the span of these checkpoints, its projection is shown"
    epochs = [s.epoch for s in basis.sources]
    traj = figures.Trajectory(
        points=pca.points[:, :2].numpy(), epochs=epochs if all(e is not None for e in epochs) else None,
        shares=(float(pca.shares[0]), float(pca.shares[1])),
        twa=None if twa_point is None else twa_point.numpy(), twa_label=label,
    )
    surface = None
    if opts.surface:
        from twa_cli.commands.surface import grid_extent, loss_surface

        marks = [pca.points[:, :2], torch.zeros(1, 2, dtype=torch.float64)]
        if twa_point is not None:
            marks.append(twa_point.reshape(1, 2))
        surface = loss_surface(basis, pca, grid_extent(torch.cat(marks)), task, resolution=opts.resolution,
                               num_batches=opts.surface_batches, batch_size=opts.batch_size,
                               device=resolve_device(opts.device), progress=progress)
    figures.trajectory_figure(traj, path, opts.fmt, surface)
    what = (f"{len(pca.points)} checkpoints ({origin}) on their first two principal directions, "
            f"{100 * pca.plane_share:.1f}% of the variance; SWA at the origin")
    if twa_point is not None:
        what += ", TWA marked" + note
    if surface is not None:
        what += (f"; training loss and test error on a {opts.resolution}x{opts.resolution} grid, "
                 f"{surface.batches} batches per point")
    return what


def _draw_spectrum(pca: Pca, basis: Basis, origin: str, path: Path, fmt: str) -> str:
    figures.spectrum_figure(pca.shares.tolist(), basis.coords.shape[1], path, fmt)
    return (f"explained variance of {basis.coords.shape[1]} checkpoints ({origin}): {pca.directions_for(0.99)} of "
            f"{len(pca.shares)} directions hold 99%")


def _draw_accuracy(sgd: list, twa: list, start: float | None, sgd_source: Path | None, path: Path, fmt: str) -> str:
    figures.accuracy_figure(sgd, twa, start, path, fmt)
    parts = []
    if sgd:
        parts.append(f"SGD, {len(sgd)} epochs ({sgd_source})")
    if twa:
        parts.append(f"TWA, {len(twa)} epochs" + (f" after epoch {start:g}" if start is not None else ""))
    return "per-epoch train/test accuracy of " + " and ".join(parts)


def _draw_epochs_used(inputs: Inputs, path: Path, fmt: str) -> str:
    rows: list[tuple[str, float, float]] = []
    reference, reference_epochs = None, None
    for src in inputs.benchmarks:
        bench_rows, bench_ref = _benchmark_rows(src)
        rows += bench_rows
        reference = bench_ref or reference
    for src in inputs.evals:
        rows += _eval_rows(src)
    series = _series(rows)
    if reference is None and "SGD" in series:
        final = max(series["SGD"], key=lambda p: p.epochs)
        reference, reference_epochs = (f"SGD final (epoch {final.epochs:g})", final.accuracy), final.epochs
        if len(series["SGD"]) == 1:
            del series["SGD"]  # one SGD result: it is the reference line, not a curve
    figures.epochs_used_figure(series, reference, path, fmt, reference_epochs)
    counts = ", ".join(f"{name} at {len(pts)} point{'s' if len(pts) > 1 else ''}" for name, pts in series.items())
    line = f"; {reference[0]} as a line" if reference else ""
    return f"test accuracy against epochs of checkpoints used: {counts}{line}"


def _series(rows: list[tuple[str, float, float]]) -> dict[str, list[figures.SeriesPoint]]:
    grouped: dict[str, dict[float, list[float]]] = {}
    for method, epochs, accuracy in rows:
        grouped.setdefault(method, {}).setdefault(epochs, []).append(accuracy)
    return {
        method: [figures.SeriesPoint(e, statistics.fmean(a), statistics.pstdev(a) if len(a) > 1 else 0.0, len(a))
                 for e, a in sorted(by_epochs.items())]
        for method, by_epochs in grouped.items()
    }


def _benchmark_rows(src: Path) -> tuple[list[tuple[str, float, float]], tuple[str, float] | None]:
    obj = read_json(src)
    obj = obj.get("figure3", obj)
    try:
        rows = [(str(p["method"]), float(p["epochs"]), float(p["accuracy"])) for p in obj["points"]]
        ref = obj.get("reference")
        reference = (str(ref.get("label", "SGD final")), float(ref["accuracy"])) if ref else None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TwaError(f"{src}: each point needs method, epochs and accuracy; "
                       f"the reference needs an accuracy ({exc})") from exc
    numbers = [n for _, epochs, accuracy in rows for n in (epochs, accuracy)] + ([reference[1]] if reference else [])
    if not all(math.isfinite(n) for n in numbers):
        raise TwaError(f"{src}: epochs and accuracies must be finite numbers")
    return rows, reference


def _eval_rows(src: Path) -> list[tuple[str, float, float]]:
    """(method, epochs of checkpoints used, test accuracy) of each result of `twa eval --json`."""
    rows = []
    results = read_json(src).get("results")
    if not isinstance(results, list) or not all(isinstance(r, dict) and "path" in r for r in results):
        raise TwaError(f"{src}: not `twa eval --json` output (no list of results with a path)")
    for result in results:
        if not isinstance(result.get("test"), dict):
            raise TwaError(f"{src}: {result.get('path')} has no test score (run twa eval with --split test or both)")
        accuracy = _finite(result["test"].get("accuracy"))
        if accuracy is None:
            raise TwaError(f"{src}: {result['path']} has no finite test accuracy (a language model's eval reports "
                           "loss and perplexity; this picture plots accuracy)")
        path = _locate(Path(str(result["path"])), src)
        ckpt = read_checkpoint(path)
        if ckpt.kind == "checkpoint":
            method, epochs = "SGD", ckpt.epoch
        else:
            method = "TWA" if ckpt.kind == "twa" else "SWA"
            epochs = _sources_epoch(ckpt)
        if epochs is None:
            raise TwaError(f"{path}: cannot tell which epochs of checkpoints it used (no epoch in its metadata)")
        rows.append((method, float(epochs), accuracy))
    return rows


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _locate(path: Path, json_file: Path) -> Path:
    """A path from `twa eval --json`: as written (relative to where eval ran), else beside the JSON file."""
    for candidate in (path, json_file.parent / path, json_file.parent / path.name):
        if candidate.exists():
            return candidate
    raise TwaError(f"{json_file}: the scored file {path} is not found (run twa plot where twa eval ran)")


def _sources_epoch(ckpt: Any) -> float | None:
    """The last epoch among the checkpoints an average was made of."""
    epochs = []
    for src in sources_of(ckpt):
        if src.epoch is not None:
            epochs.append(src.epoch)
        elif Path(src.path).exists():
            epochs.append(read_checkpoint(src.path).epoch)
        else:
            return None
    return max(epochs) if epochs and all(e is not None for e in epochs) else None
