"""A basis kept in a file mapped into memory rather than in memory: for in-loop TWA whose basis (one copy of the
weights per checkpoint added) is larger than the memory it may take.

`MappedRows(folder)` is the storage `TWA(..., allocate=...)` and the callbacks take: each call makes a new file
`basis-N.f32` of rows x dim fp32 values in `folder` (a folder the user named; made if missing) and maps it; the
operating system keeps in memory only the pages in use and writes the rest back to the file. When the basis grows
(a new, larger file), the previous file is removed at once: its mapping stays readable until the copy into the new
one is done and the old tensor is released (POSIX semantics). The files are scratch space, not a saved basis:
`TWA.state_dict()` is what a checkpoint keeps.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch

from twa_cli.errors import TwaError


class MappedRows:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._count = itertools.count()
        self._current: Path | None = None

    def __call__(self, rows: int, dim: int) -> torch.Tensor:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"basis-{os.getpid()}-{next(self._count)}.f32"
        if path.exists():
            raise TwaError(f"{path}: already exists; give each TWA its own folder for its basis")
        try:
            rows_tensor = torch.from_file(str(path), shared=True, size=rows * dim, dtype=torch.float32)
        except RuntimeError as exc:
            raise TwaError(f"{path}: cannot map a basis of {rows} x {dim} weights there ({exc})") from exc
        if self._current is not None:
            self._current.unlink(missing_ok=True)  # still mapped by the basis being copied from
        self._current = path
        return rows_tensor.view(rows, dim)

    @property
    def path(self) -> Path | None:
        """The file the basis is in now."""
        return self._current
