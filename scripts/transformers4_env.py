"""Make the transformers 4.x side environment of the tests: `python scripts/transformers4_env.py FOLDER LOCK`.

FOLDER gets transformers 4.57 and every dependency of its own, pinned by LOCK (pip, --no-deps: the lock is
complete), plus links to torch and what torch itself requires, taken from this (the main) environment: the one
runtime the two share, deliberately. The tests run it as `python -S` with PYTHONPATH=FOLDER, so nothing else
of the main environment can be imported, by accident or by transformers probing for optional packages
(tests/test_environment.py checks where every module comes from). Rebuilt when LOCK or torch changes.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

STAMP = ".twa-env"


def shared_distributions() -> list[metadata.Distribution]:
    """torch and, recursively, the distributions it requires on this platform."""
    found: dict[str, metadata.Distribution] = {}
    todo = ["torch"]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        dist = metadata.distribution(name)
        found[name] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(found.values())


def top_level_entries(dist: metadata.Distribution) -> set[str]:
    """The names a distribution puts in site-packages (packages, modules, its .dist-info folder)."""
    names = {Path(str(f)).parts[0] for f in dist.files or []}
    return {n for n in names if n not in ("..", "bin", "__pycache__")}


def main(folder: Path, lock: Path) -> None:
    shared = shared_distributions()
    stamp = hashlib.sha256(lock.read_bytes() + "".join(f"{d.name}=={d.version};" for d in shared).encode())
    if (folder / STAMP).is_file() and (folder / STAMP).read_text() == stamp.hexdigest():
        return
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(folder), "-r",
                    str(lock)], check=True)
    for dist in shared:
        site = Path(str(dist.locate_file("")))
        for name in sorted(top_level_entries(dist)):
            if not (folder / name).exists() and (site / name).exists():  # the side's own copy wins
                (folder / name).symlink_to(site / name, target_is_directory=(site / name).is_dir())
    (folder / STAMP).write_text(stamp.hexdigest())


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
