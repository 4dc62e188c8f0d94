"""Data root resolution and checksum-verified downloads.

The data root is `--data-root`, else `$EBMM_DATA` (both handled by the CLI), else a
user cache folder. Files are fetched only when absent, verified by MD5 before they are
put in place, and written atomically, so an interrupted or corrupted download never
leaves a file that looks complete.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ebmm_cli.errors import EbmmError


def default_root() -> Path:
    """The user cache folder: `$XDG_CACHE_HOME/ebmm`, else `~/.cache/ebmm`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ebmm"


def resolve_root(root: Path | str | None) -> Path:
    """The data root to use: `root` when given (and not empty), else `default_root()`."""
    return Path(root) if root else default_root()


def fetch(url: str, dest: Path, md5: str) -> Path:
    """Download `url` to `dest` unless it is there, verifying its MD5 checksum.

    Uses torchvision's downloader (redirects, progress) into a temporary folder beside
    `dest` and renames the verified file into place.

    Raises:
        EbmmError: naming `dest`, when the download fails or the checksum does not match.
    """
    if dest.exists():
        return dest
    from torchvision.datasets.utils import check_integrity, download_url

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download.") as tmp:
        part = Path(tmp) / dest.name
        try:
            download_url(url, tmp, filename=dest.name)
        except Exception as e:  # urllib, HTTP and socket errors come in many types
            raise EbmmError(
                dest, f"not found and could not be downloaded from {url} ({e})"
            ) from None
        if not check_integrity(str(part), md5):
            raise EbmmError(dest, f"downloaded from {url} but its MD5 is not {md5}")
        os.replace(part, dest)
    return dest
