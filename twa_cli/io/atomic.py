"""Files and folders that appear complete or not at all.

A file being written has no name until it is complete (an O_TMPFILE, linked into the folder at the end), so a
process killed mid-write leaves nothing behind. Where the system cannot do that, a dot-named temporary beside
the target is used, and removed by the next write of the same file. Without --force the final step is
exclusive (a hard link, which fails when the name exists), so of two processes writing the same new output
the second fails instead of silently replacing the first.

A folder result (a Hugging Face model folder) is built in a hidden staging folder beside the target and
swapped into place in one step (renameat2 RENAME_EXCHANGE on Linux), so a reader sees the old folder or the
new one, never a mixture; the old one is removed after. A result the user names (`-o`) that is a symbolic
link, to a file or a folder, is written through the link (`through_link`): what it names is replaced, and the
link stays. A file the tool names itself (in a run folder) replaces whatever is at its name, a link included,
and never writes through one.

Elsewhere (macOS, Windows, a file system without these calls) the same guarantees hold with portable calls:
a new name is taken with a hard link (or a rename that never replaces: Windows' own, Linux's
RENAME_NOREPLACE), a file is replaced with os.replace, and a folder by two renames, the old one set aside
under a hidden name (`.NAME.twa-<pid>-<random>.old`) until the new one is in place. A process killed between
those two renames leaves the old folder set aside; the next write of that name puts it back. Where no way to
take a name exclusively exists, a write that must not replace anything is refused in one line.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from twa_cli.errors import TwaError

_LINUX = sys.platform.startswith("linux")  # O_TMPFILE, linkat and renameat2 (through ctypes)
_WINDOWS = os.name == "nt"  # os.rename never replaces an existing name there
_AT_FDCWD, _AT_SYMLINK_FOLLOW = -100, 0x400
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
# What link(2) says on a file system without hard links (FAT, exFAT, some network and FUSE file systems).
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@contextmanager
def parents_made(path: Path) -> Iterator[None]:
    """Create the folders above `path`; if the block fails, remove those it created (when left empty)."""
    made = []
    folder = path.parent
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def through_link(path: Path) -> Path:
    """Where a result named `path` goes: the file or folder a symbolic link there points to (the new result
    replaces what the link names, and the user's link stays as it is), else `path`. A link to nothing is
    refused: writing through it would create a file or folder the command line never named."""
    path = Path(path)
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if not target.exists():
        raise TwaError(f"{path}: is a symbolic link to {target}, which does not exist; remove the link or create "
                       "the folder it names")
    return target


# The tail of a name only this tool gives a temporary: `.NAME.twa-<pid>-<8 hex digits>.tmp` (or `.old`, a folder
# set aside). Cleaning up touches nothing else, however it is named: `.NAME.backup.tmp` is the user's.
_TEMP_TAIL = re.compile(r"\.twa-(\d{1,10})-[0-9a-f]{8}\.(tmp|old)")


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """A hidden name beside `path` that says this tool writes it, and which process (`.NAME.twa-<pid>-<random>.tmp`)."""
    return path.parent / f".{path.name}.twa-{os.getpid()}-{os.urandom(4).hex()}.{kind}"


def is_temp_name(name: str) -> bool:
    """Whether `name` is one `temp_name` gives (of any process)."""
    match = _TEMP_TAIL.search(name)
    return name.startswith(".") and match is not None and match.end() == len(name)


def remove_stale_temps(path: Path, pattern: str | None = None) -> None:
    """Temporaries that a killed write of `path` (or of any name matching the glob `pattern`) left behind:
    names `temp_name` gives, of processes no longer running; never a live writer's, never a file named otherwise.
    An old folder a killed replacement set aside (`.NAME.twa-<pid>-<random>.old`) is put back when `path` is
    missing, removed when the new one is in place."""
    for stale in path.parent.glob(f".{pattern or glob.escape(path.name)}.twa-*.tmp"):
        if not is_temp_name(stale.name) or _writer_alive(stale.name):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    if pattern is not None:
        return
    for aside in path.parent.glob(f".{glob.escape(path.name)}.twa-*.old"):
        if not is_temp_name(aside.name) or _writer_alive(aside.name):
            continue
        if not path.exists() and not path.is_symlink():
            os.rename(aside, path)
        else:
            shutil.rmtree(aside, ignore_errors=True)


def _writer_alive(name: str) -> bool:
    """Whether the process that named this temporary (`temp_name`) may still be running."""
    match = _TEMP_TAIL.search(name)
    if match is None:
        return True  # not ours: never treated as stale
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    if _WINDOWS:
        return True  # os.kill(pid, 0) would end that process there: never take another's files for stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    """The process's umask, read when needed (not at import: a caller may change it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _open_unnamed(folder: Path) -> int:
    if not (_LINUX and hasattr(os, "O_TMPFILE")):
        return -1
    try:
        return os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o666)
    except OSError:  # a file system without unnamed files
        return -1


def _name_unnamed(fd: int, name: Path) -> None:
    """Give an O_TMPFILE a name (os.link would link the /proc symlink itself, hence linkat). Fails with EEXIST
    when `name` exists, like link(2)."""
    if _libc().linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), _AT_FDCWD, os.fsencode(name), _AT_SYMLINK_FOLLOW):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(name))


@contextmanager
def reported_as(path: Path, temp: Path | None = None) -> Iterator[None]:
    """An error writing an unnamed file, or a temporary (`temp`, or a file inside it), names the file it was to
    become ("No space left on device"), not a hidden name the user never gave."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        name = None if exc.filename is None else str(exc.filename)
        if name is None or (temp is not None and (name == str(temp) or name.startswith(f"{temp}{os.sep}"))):
            final = str(path) if name is None else str(path) + name[len(str(temp)):]
            raise OSError(exc.errno, exc.strerror, final) from exc
        raise


def already_written(path: Path) -> TwaError:
    return TwaError(f"{path}: already exists (written by another process meanwhile?); pass --force to overwrite it")


def place(tmp: Path, path: Path, exclusive: bool) -> None:
    """Move a complete temporary to its final name: exclusively (fail if the name exists) or replacing."""
    if not exclusive:
        os.replace(tmp, path)
        return
    try:
        place_new(tmp, path)
    except FileExistsError as exc:
        raise already_written(path) from exc


def place_new(tmp: Path, path: Path) -> None:
    """Give the complete file `tmp` the name `path` only if that name is free: FileExistsError when it is
    taken (so of two writers one fails, and nothing is replaced)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except (OSError, NotImplementedError) as exc:  # a file system without hard links
        if isinstance(exc, OSError) and exc.errno not in _NO_HARD_LINKS:
            raise
        _rename_new(tmp, path)
        return
    tmp.unlink()


def _rename_new(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` only if `dst` does not exist (FileExistsError otherwise), in one step."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if _WINDOWS:
        os.rename(src, dst)  # never replaces there
        return
    raise TwaError(f"{dst}: this file system can neither link nor rename a file without replacing one written "
                   "meanwhile; pass --force to write it anyway")


@contextmanager
def atomic_file(path: Path, *, exclusive: bool = False) -> Iterator[BinaryIO]:
    """A binary file whose content appears at `path`, complete, only when the block finishes without error.
    `exclusive`: fail if `path` exists by then (a concurrent writer won), else replace it."""
    with parents_made(path):
        remove_stale_temps(path)
        with _atomic_file(path, exclusive) as fh:
            yield fh


@contextmanager
def _atomic_file(path: Path, exclusive: bool) -> Iterator[BinaryIO]:
    named: Path | None = None
    fd = _open_unnamed(path.parent)
    if fd < 0:
        named = temp_name(path)
        fd = os.open(named, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
    try:
        with reported_as(path, named), os.fdopen(fd, "w+b") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
            if named is None:
                if exclusive:
                    try:
                        _name_unnamed(fh.fileno(), path)
                        return
                    except FileExistsError as exc:
                        raise already_written(path) from exc
                    except OSError:  # no /proc: fall through to a named temporary
                        pass
                named = temp_name(path)
                try:
                    _name_unnamed(fh.fileno(), named)
                except OSError:  # no /proc: copy into a named temporary after all
                    fh.seek(0)
                    with open(named, "xb") as copy:
                        shutil.copyfileobj(fh, copy)
                        copy.flush()
                        os.fsync(copy.fileno())
            place(named, path, exclusive)
    finally:
        if named is not None and named.exists():
            named.unlink()


@contextmanager
def atomic_path(path: Path, *, exclusive: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` that is moved onto it only when the block finishes without error
    (for writers that want a path, not a file object)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_name(path)
    try:
        with reported_as(path, tmp):
            yield tmp
            place(tmp, path, exclusive)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: Path, data: bytes, *, exclusive: bool = False) -> Path:
    with atomic_file(path, exclusive=exclusive) as fh:
        fh.write(data)
    return path


# ---------------------------------------------------------------------------------------------- folders


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False where the system lacks it (then the caller falls back to two renames)."""
    if not _LINUX:
        return False
    libc = _libc()
    if not hasattr(libc, "renameat2"):
        return False
    if libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def swap_in_folder(staging: Path, path: Path, *, exclusive: bool) -> None:
    """Put the complete folder `staging` at `path` in one step; an existing `path` is replaced (not exclusive)
    and removed afterwards. `staging` lies beside `path` (a symbolic link at `path`: beside the folder it
    names, which is what is replaced)."""
    path = through_link(path)
    if not path.exists() and not path.is_symlink():
        try:
            if _renameat2(staging, path, _RENAME_NOREPLACE):
                return
            if _WINDOWS:
                os.rename(staging, path)  # never replaces there
                return
        except FileExistsError as exc:
            raise already_written(path) from exc
        try:
            os.mkdir(path)  # claims the name; an empty folder is replaced by the rename below
        except FileExistsError as exc:
            raise already_written(path) from exc
        os.rename(staging, path)
        return
    if exclusive:
        raise already_written(path)
    if _renameat2(staging, path, _RENAME_EXCHANGE):
        shutil.rmtree(staging)  # now the old folder
        return
    # Two renames: between them `path` is missing (never a mixture); a kill there leaves the old folder set
    # aside, which the next write of `path` puts back (remove_stale_temps).
    old = temp_name(path, "old")
    os.rename(path, old)
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old)


@contextmanager
def staged_folder(path: Path, *, exclusive: bool) -> Iterator[Path]:
    """A hidden folder beside `path` to build a folder result in; swapped into place when the block finishes
    without error, removed when it fails."""
    path = through_link(path)
    with parents_made(path):
        remove_stale_temps(path)
        staging = temp_name(path)
        staging.mkdir()
        try:
            with reported_as(path, staging):
                yield staging
                swap_in_folder(staging, path, exclusive=exclusive)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
