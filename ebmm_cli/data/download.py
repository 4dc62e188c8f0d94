"""Data root resolution and checksum-verified downloads.

The data root is `--data-root`, else `$EBMM_DATA` (both handled by the CLI), else a
user cache folder. Files are fetched only when absent, verified by MD5 before they are
put in place, and written atomically, so an interrupted or corrupted download never
leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import stat
import urllib.request
from pathlib import Path

from ebmm_cli.atomic import atomic_path
from ebmm_cli.errors import EbmmError
from ebmm_cli.safety import check_path, regular


def default_root() -> Path:
    """The user cache folder: `$XDG_CACHE_HOME/ebmm`, else `~/.cache/ebmm`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ebmm"


def resolve_root(root: Path | str | None) -> Path:
    """The data root to use: `root` when given (and not empty), else `default_root()`.

    Raises:
        EbmmError: naming `--data-root`, when it is something other than a folder.
    """
    if not root:
        return default_root()
    info = check_path(root, "--data-root")
    if info is not None and not stat.S_ISDIR(info.st_mode):
        raise EbmmError("--data-root", f"{root} is a file, not a folder")
    return Path(root)


def fetch(url: str, dest: Path, md5: str) -> Path:
    """Download `url` to `dest` unless it is there, verifying its MD5 checksum.

    Streams into a temporary file beside `dest` while hashing, and renames it into place
    only when the checksum matches; any URL urllib opens works (https, file).

    Raises:
        EbmmError: naming `dest`, when the download fails or the checksum does not match.
    """
    if os.path.lexists(dest):  # a FIFO or device there is refused, not read forever
        regular(dest, "archive")
        return dest
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(dest) as tmp:
            with open(tmp, "wb") as f:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
            if digest.hexdigest() != md5:
                raise EbmmError(dest, f"downloaded from {url} but its MD5 is not {md5}")
    except (OSError, ValueError) as e:  # URLError, HTTP and socket errors are OSErrors
        raise EbmmError(dest, f"not found and could not be downloaded from {url} ({e})") from None
    return dest
