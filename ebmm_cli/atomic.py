"""Safe file output: one writer per output, and atomic writes.

`exclusive` keeps a second ebmm process off an output (a file or a run folder) while
the first works on it. `atomic_path` writes to a temporary name in the same folder, then
renames: a rename within one file system is atomic, so a reader (or a process killed
half-way) sees either the old file or the complete new one, never a partial file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

from ebmm_cli.errors import EbmmError

# Errors of the storage itself: full, over a size or quota limit, read-only, refused.
_STORAGE_ERRORS = {
    errno.ENOSPC,
    errno.EFBIG,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EIO,
}


def _make_folder(folder: Path, subject: Path) -> None:
    """Make `folder` (and its parents); failing, an `EbmmError` naming `subject`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where a folder of the path should be
        raise EbmmError(subject, f"cannot write here ({os.strerror(errno.ENOTDIR)})") from None
    except OSError as e:
        raise EbmmError(subject, f"cannot write here ({e.strerror or e})") from None


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold `path` (an output file or folder) for this process while the block runs.

    An advisory lock (flock) on `.NAME.lock` beside `path`, holding the holder's pid. A
    second process asking for the same path fails at once instead of waiting or silently
    replacing the first one's output. The kernel drops the lock when its process dies,
    however it dies, so a lock file left by a killed process is simply taken over.

    The lock is named after the resolved path, so two writers that spell one output
    differently (through a symbolic link, `./x`, `x/../x`) still exclude each other.

    Raises:
        EbmmError: naming `path`, when another process holds it (exit 2), or when its
            folder cannot be made.
    """
    _make_folder(path.parent, path)
    target = Path(os.path.realpath(path))
    lock = target.parent / f".{target.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise EbmmError(path.parent, f"cannot write here ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 20, 0).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise EbmmError(path, f"in use by another ebmm process{pid}") from None
        try:  # the last holder may have removed the file between our open and our lock
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _remove_stale(target)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


_STALE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


def _remove_stale(target: Path) -> None:
    """Remove the temporaries (`.NAME.XXXXXXXX.tmp`) a killed writer of `target` left:
    beside a file output, anywhere in a folder output. Only the holder of `target`'s lock
    calls it, so no living writer of it owns one."""
    if target.is_dir():
        found = (Path(d) / f for d, _, files in os.walk(target) for f in files)
    else:
        prefix = f".{target.name}."
        found = (target.parent / f for f in _names(target.parent) if f.startswith(prefix))
    for path in found:
        if _STALE.match(path.name):
            path.unlink(missing_ok=True)


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`.

    The caller writes the whole file to the yielded path. If the block raises, the
    temporary file is removed and `path` is left as it was. A folder that cannot be made
    or written to is an `EbmmError` (exit 2); an OS error while writing (a full disk, a
    file-size limit, a read-only or refusing file system) is one with exit code 1, naming
    the file; other errors pass through unchanged.

    Example:
        >>> with atomic_path(Path("out.png")) as tmp:
        ...     image.save(tmp, format="PNG")
    """
    _make_folder(path.parent, path.parent)
    tmp = None
    try:
        # Named before it exists: Ctrl-C or SIGTERM raise wherever the program is (a signal
        # that arrived just before this point included), and whatever they interrupt, the
        # cleanup below knows the name. Made with the mode a plain open() would give it.
        while tmp is None:
            tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                tmp = None  # another writer's temporary by the same name: not ours to remove
            except OSError as e:
                tmp = None
                raise EbmmError(path.parent, f"cannot write here ({e.strerror or e})") from None
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if e.errno not in _STORAGE_ERRORS:
            raise  # not the storage's fault (say, a download that broke off): the caller's
        raise EbmmError(path, f"write failed ({e.strerror}); nothing written", 1) from None
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
