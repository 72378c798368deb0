"""A basis kept in a file mapped into memory rather than in memory: for in-loop TWA whose basis (one copy of the
weights per checkpoint added) is larger than the memory it may take.

`MappedRows(folder)` is the storage `TWA(..., allocate=...)` and the callbacks take: each call makes a new file of
rows x dim fp32 values in `folder` (a folder the user named; made if missing), reserves its disk space at once (a
full disk is one error now, not a crash of the training process when a page is first written) and maps it; the
operating system keeps in memory only the pages in use and writes the rest back to the file. The file's name is
removed as soon as it is mapped: the mapping stays valid (POSIX), the space is given back when the basis is
released, and no file is left behind however the process ends. It is scratch space, not a saved basis:
`TWA.state_dict()` is what a checkpoint keeps. The basis then lives on the CPU, whatever device the model is on.
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
        self.mapped: list[int] = []  # the bytes of each file mapped so far

    def __call__(self, rows: int, dim: int) -> torch.Tensor:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f".twa-basis-{os.getpid()}-{next(self._count)}-{os.urandom(4).hex()}.f32"
        size = rows * dim * 4
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, size)
                else:
                    os.ftruncate(fd, size)
            finally:
                os.close(fd)
            rows_tensor = torch.from_file(str(path), shared=True, size=rows * dim, dtype=torch.float32)
        except (OSError, RuntimeError) as exc:
            raise TwaError(f"{self.folder}: cannot hold a basis of {rows} x {dim} weights ({size:,} bytes) there: "
                           f"{getattr(exc, 'strerror', None) or exc}") from exc
        finally:
            path.unlink(missing_ok=True)  # mapped (or failed): the name is no longer needed
        self.mapped.append(size)
        return rows_tensor.view(rows, dim)
