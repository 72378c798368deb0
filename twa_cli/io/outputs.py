"""Where a command may write: never over an existing result without --force, and never into, over or inside
one of its inputs, with or without --force (paths compared after resolving symbolic links). An output that is
a symbolic link is written through it (twa_cli.io.atomic.through_link)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from twa_cli.errors import TwaError
from twa_cli.io.atomic import through_link


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_not_an_input(path: Path, inputs: Iterable[str | Path], folder: bool) -> None:
    """`path` (a file, or a folder when `folder`) is not an input, inside an input folder, nor (a folder)
    holding an input."""
    target = path.resolve()
    for given in inputs:
        src = Path(given).resolve()
        if target == src:
            raise TwaError(f"{path}: is an input of this command ({given}); choose another output")
        if src.is_dir() and _within(target, src):
            raise TwaError(f"{path}: will not write inside the input folder {given}; choose another output")
        if folder and _within(src, target):
            raise TwaError(f"{path}: holds the input {given}; the output may not contain an input")


def check_named(path: Path, given: str | Path | None = None) -> None:
    """A result needs a name: the file-system root has none to write it (or its temporaries) beside."""
    if not Path(os.path.abspath(path)).name:
        raise TwaError(f"{given or path}: is the file-system root; name a file or folder under it")


def check_output(path: Path, force: bool, inputs: Iterable[str | Path] = (), folder: bool = False) -> None:
    """Refuse a result path that is in the way of an input or of an existing result (without --force).

    `folder`: the output is a folder of files (else a single file).
    """
    path = Path(path)
    check_named(path)
    through_link(path)  # a link is written through: one to nothing is refused here, before any work
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise TwaError(f"{path}: cannot be created, {blocking} is a file")
    if folder and path.is_file():
        raise TwaError(f"{path}: is a file; the output is a folder")
    if not folder and path.is_dir():
        raise TwaError(f"{path}: is a folder; give the output file's name")
    check_not_an_input(path, inputs, folder)
    if path.exists() and not force:
        raise TwaError(f"{path}: already exists (pass --force to overwrite it)")


def check_not_replacing(output: Path, replaced: Iterable[Path], inputs: Iterable[str | Path]) -> None:
    """Writing `output` replaces or removes the files `replaced` (an earlier result's): none may be an input, one of
    an input's shards, or inside an input folder."""
    from twa_cli.io.readers import checkpoint_files

    protected: set[Path] = set()
    folders: list[Path] = []
    for given in inputs:
        src = Path(given).resolve()
        if src.is_dir():
            folders.append(src)
        elif src.exists():
            protected |= {p.resolve() for p in checkpoint_files(src)}
    for path in replaced:
        target = path.resolve()
        if target in protected or any(_within(target, f) for f in folders):
            raise TwaError(f"{output}: writing it would replace {path}, an input of this command; choose another "
                           "output")
