"""What a run folder that a job is still writing holds, for `twa watch`: which of its entries are checkpoints
of the run (not second copies, not a Trainer's folder before its rename), when one has settled (the size and time
of every file it is made of), and reading one whole, once, into the basis's row and the tensors beside it, or
setting it aside when it does not fit what was taken in before."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from twa_cli.commands.watch_state import Signature, Taken
from twa_cli.core.basis import Whole, read_whole
from twa_cli.errors import TwaError
from twa_cli.io import readers
from twa_cli.io.checkpoints import (
    ALIAS,
    OTHER_KINDS,
    Checkpoint,
    NotFinite,
    is_hf_final_model,
    natural_key,
    tensor_specs,
)
from twa_cli.units import layout_size

log = logging.getLogger("twa")


class SetAside(TwaError):
    """A checkpoint that reads but cannot join the run: NaN or Inf in a tensor, or tensors unlike those taken in."""


def candidates(run: Path) -> list[Path]:
    """The run's checkpoints as the folder lists them now, in natural name order (checkpoint-500 before
    checkpoint-1000): not the second copies tools save (last.ckpt, model_best, a Trainer's final model beside its
    checkpoint-* folders), nor a Trainer's `tmp-checkpoint-*` folder before its rename, nor what is not a regular
    file (a FIFO: left out with a warning, it must not end a watch of days)."""
    try:
        paths = readers.checkpoint_paths(run, regular_only=False)
    except OSError:
        return []
    odd = [p for p in paths if p.exists() and not p.is_file() and not p.is_dir()]
    for path in odd:
        log.warning("%s: left out, it is not a regular file (a FIFO, socket or device named like a checkpoint)", path)
    if any(p.is_dir() for p in paths) and paths != [run]:
        paths = [p for p in paths if p.is_dir() or not is_hf_final_model(p)]
    kept = [p for p in paths if p != run and p not in odd and not ALIAS.match(p.name) and not p.name.startswith("tmp-")]
    return sorted(kept, key=lambda p: natural_key(p.name))


def files_signature(path: Path) -> Signature:
    """(file, size, mtime) of every file of a checkpoint: for a folder, everything in it (a Trainer writes the
    weights first and its state last)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else readers.checkpoint_files(path)
    out = []
    for f in files:
        stat = f.stat()
        out.append([str(f), stat.st_size, stat.st_mtime_ns])
    return out


def not_a_checkpoint(ckpt: Checkpoint) -> str | None:
    if ckpt.kind in OTHER_KINDS:
        return f"it is a {ckpt.kind} file, not a checkpoint"
    if ckpt.kind in ("average", "twa"):
        return f"it is itself an average (written by `twa {ckpt.meta.get('command', ckpt.kind)}`)"
    if ckpt.meta.get("averaged"):
        return f"it is itself an average ({ckpt.meta['averaged']})"
    return None


def misfit(taken: Taken, specs: dict[str, tuple[tuple[int, ...], bool]]) -> str | None:
    """Why a checkpoint whose tensors have these (shape, floating) does not fit the run, or None. Judged on what
    was taken in, not on the run's first checkpoint: that file may be gone (rotated away by the job) or never
    read by this process (a resumed watch)."""
    expected = {name: (shape, True) for name, shape in taken.layout}
    if taken.others.count:  # the tensors averaged beside the subspace are known once a checkpoint was taken in
        expected.update({name: (tuple(t.shape), t.is_floating_point()) for name, t in taken.others.sums.items()})
        extra = sorted(set(specs) - set(expected))
        if extra:
            return f"it has a tensor '{extra[0]}' that the checkpoints taken in before do not"
    for name, (shape, floating) in expected.items():
        if name not in specs:
            return f"it has no tensor '{name}', which the checkpoints taken in before have"
        if specs[name][0] != shape:
            return f"its tensor '{name}' has shape {list(specs[name][0])}, not {list(shape)} as before"
        if specs[name][1] != floating:
            return f"its tensor '{name}' is {'integer' if floating else 'floating-point'}, unlike before"
    return None


def read_once(ckpt: Checkpoint, taken: Taken) -> tuple[torch.Tensor, Whole]:
    """One pass over the file (`read_whole`): the trained tensors in one row, and the rest with the hash of the
    bytes read. NaN or Inf in a tensor not trained sets the file aside here; in a trained one, when the basis
    refuses the row."""
    specs = tensor_specs(ckpt)  # read with the header when the folder was looked at
    why = misfit(taken, {k: (shape, dtype.is_floating_point) for k, (shape, dtype) in specs.items()})
    if why is not None:
        raise SetAside(f"it does not fit the run ({why})")
    row = torch.empty(1, layout_size(taken.layout), dtype=torch.float32)
    try:
        whole = read_whole(ckpt, taken.layout, row[0])
    except NotFinite as exc:  # in SWA's running mean for good else
        raise SetAside(str(exc).removeprefix(f"{ckpt.path}: ")) from exc
    if {name for name, _ in whole.others} - set(specs):
        raise TwaError(f"{ckpt.path}: its tensors changed while it was read")
    return row, whole
