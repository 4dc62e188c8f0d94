"""Atomic file output: write to a temporary name in the same folder, then rename.

A rename within one file system is atomic, so a reader (or a process killed half-way)
sees either the old file or the complete new one, never a partial file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise EbmmError(path.parent, f"cannot write here ({e.strerror or e})") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno not in _STORAGE_ERRORS:
            raise  # not the storage's fault (say, a download that broke off): the caller's
        raise EbmmError(path, f"write failed ({e.strerror}); nothing written", 1) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
