"""The rules that keep a user's files safe, checked before any work.

- An output is never a file (or inside a folder) that the same run reads: checked by
  resolved path and by inode, so a symbolic link, `./x`, `x/../x` or a hard link to an
  input is caught however it is spelled. `--force` replaces an earlier output, never an
  input.
- Every file ebmm reads is a regular file, opened without blocking: a FIFO, a device
  (even through a symbolic link) or a socket is refused before a byte is read.
- A file is never read whole beyond a stated bound.
- A path the system refuses (a link loop, a name too long) is a one-line error, not an
  exception from deep inside.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ebmm_cli.errors import EbmmError


def real(path: Path | str) -> Path:
    """The absolute path with symbolic links resolved as far as they resolve (a link
    loop does not raise here; it is refused where it is opened)."""
    return Path(os.path.realpath(path))


def unreadable(path: Path | str, error: OSError) -> EbmmError:
    """The user's error for a path the system would not stat, open or read."""
    if error.errno == errno.ELOOP:
        return EbmmError(path, "a symbolic link loop")
    if error.errno == errno.ENAMETOOLONG:
        return EbmmError(_short(path), "path too long (File name too long)")
    return EbmmError(path, f"cannot read ({error.strerror or error})")


def _short(path: Path | str) -> str:
    """A path for a one-line message: a 5,000-character one is cut in the middle."""
    text = str(path)
    return text if len(text) <= 200 else f"{text[:90]}...{text[-90:]}"


def check_path(path: Path | str, subject: str | None = None) -> os.stat_result | None:
    """`os.stat` of a path the user named (None when it does not exist); a link loop,
    a name too long or any other refusal is an `EbmmError` naming it (or `subject`)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except OSError as e:
        err = unreadable(path, e)
        if subject is not None:
            raise EbmmError(subject, f"{err.subject}: {err.problem}") from None
        raise err from None


def check_output_path(path: Path, option: str) -> None:
    """An output path the system can use: not a link loop, not too long, and (for a
    file output) not an existing folder. Checked before any work."""
    try:
        os.lstat(path)
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    except OSError as e:
        err = unreadable(path, e)
        raise EbmmError(err.subject, f"{err.problem} ({option})") from None
    if len(os.fsencode(path.name)) > 255:
        raise EbmmError(_short(path), f"path too long (File name too long) ({option})")
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise EbmmError(path, f"is a folder; {option} takes a file")


def _key(path: Path) -> tuple[Path, tuple[int, int] | None]:
    try:
        info = os.stat(path)
        ident = (info.st_dev, info.st_ino)
    except OSError:
        ident = None
    return real(path), ident


def check_not_inputs(outputs: dict[str, Iterable[Path]], inputs: dict[str, Iterable[Path]]) -> None:
    """Refuse an output that is one of the run's inputs (the same resolved path or the
    same inode), or lies inside an input folder, or is a folder holding an input.

    Raises:
        EbmmError: naming the output and the input option, whatever `--force` says.
    """
    taken = [(_key(p), option, p) for option, paths in inputs.items() for p in paths]
    for option, paths in outputs.items():
        for out in paths:
            target, ident = _key(out)
            # Both where a link at `out` leads and the link itself, which an atomic
            # rename replaces: either may be an input's place.
            places = {target, real(out.parent) / out.name}
            for (path, their), their_option, given in taken:
                if path in places or (ident is not None and ident == their):
                    raise EbmmError(
                        out, f"{option} would replace {their_option} {given}; choose another path"
                    )
                if any(place.is_relative_to(path) for place in places) and _is_dir(path):
                    raise EbmmError(
                        out, f"{option} lies inside {their_option} {given}; choose another path"
                    )


def check_new_outputs(outputs: dict[str, Path], force: bool) -> None:
    """Refuse an output file that another output option of the run also names (they
    would overwrite each other: by `check_not_inputs`' rule, a link or hard link to it
    included), or that exists, unless `force`.

    Raises:
        EbmmError: naming the file and the options involved.
    """
    earlier: dict[str, list[Path]] = {}
    for option, path in outputs.items():
        check_not_inputs({option: [path]}, earlier)  # the same place, however spelled
        if path.exists() and not force:
            raise EbmmError(path, f"exists; use --force to overwrite it ({option})")
        earlier[option] = [path]


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def regular(path: Path, what: str = "file") -> os.stat_result:
    """Stat `path` (following links) and refuse anything but a regular file.

    Raises:
        EbmmError: naming `path`: missing, a link loop, a FIFO, device or socket.
    """
    info = check_path(path)
    if info is None:
        raise EbmmError(path, f"no such {what}")
    if stat.S_ISDIR(info.st_mode):
        raise EbmmError(path, f"is a folder, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        raise EbmmError(path, "not a regular file (a FIFO, device or socket)")
    return info


def read_regular(path: Path, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes, read through one
    non-blocking open (a FIFO never blocks it), checked on the open file before a byte
    is read, and read in pieces so that Ctrl-C and SIGTERM act at once.

    Raises:
        EbmmError: naming `path`, for a missing or special file, or one over `limit`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise EbmmError(path, f"no such {what}") from None
    except IsADirectoryError:
        raise EbmmError(path, f"is a folder, not a {what}") from None
    except OSError as e:
        raise unreadable(path, e) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if stat.S_ISDIR(info.st_mode):
            raise EbmmError(path, f"is a folder, not a {what}")
        if not stat.S_ISREG(info.st_mode):
            raise EbmmError(path, "not a regular file (a FIFO, device or socket)")
        if info.st_size > limit:
            raise EbmmError(path, f"file too large ({info.st_size:,} bytes; at most {limit:,})")
        chunks, total = [], 0
        try:
            while chunk := f.read(1 << 22):
                total += len(chunk)
                if total > limit:  # grew while read
                    raise EbmmError(path, f"file too large (over {limit:,} bytes)")
                chunks.append(chunk)
        except OSError as e:
            raise unreadable(path, e) from None
    return b"".join(chunks)


def check_new_run(out: Path, init: Path | None, sources: list[Path]) -> None:
    """`ebmm train -o OUT` without `--resume`: OUT is new or an empty folder (a folder of
    the user's files is never written into), and neither the data (`sources`, from
    `data.dataset_sources`) nor the `--init` model file lies in it or is it.

    Raises:
        EbmmError: naming OUT and what is wrong.
    """
    info = check_path(out)
    if info is not None and stat.S_ISDIR(info.st_mode):
        try:
            with os.scandir(out) as entries:
                held = next(entries, None)
        except OSError as e:
            raise unreadable(out, e) from None
        if held is not None:
            raise EbmmError(
                out,
                f"holds files that are not an ebmm run ({held.name}); "
                "train into a new or empty folder",
            )
    inputs: dict[str, Iterable[Path]] = {"--dataset": sources}
    if init is not None:
        inputs["--init"] = [init]
    check_not_inputs({"--out": [out]}, inputs)
