"""Image files and streams: find inputs, decode them safely, save PNGs atomically.

Inputs are any mix of files and folders (folders are searched recursively), and `-`
reads newline-separated paths from stdin, so commands compose in shell pipelines.
Every decoding failure becomes an `EbmmError` naming the file. Tensors are (C, H, W)
float32 in [0, 1]: C = 1 for grayscale, 3 for colour.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ebmm_cli.atomic import atomic_path
from ebmm_cli.errors import EbmmError
from ebmm_cli.safety import check_path, read_regular, real

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
)
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# Bounds checked before any work: a side beyond MAX_SIDE (a 1 x 89,000,000 PNG is a 173 KB
# file under Pillow's pixel limit) or a file beyond MAX_FILE_BYTES is refused undecoded.
MAX_SIDE = 16_384
MAX_FILE_BYTES = 1 << 30


@dataclass(frozen=True)
class InputImage:
    """One input file and its path relative to the input it came from.

    Outputs keep `rel`, so `ebmm distort data/ -o out/` mirrors `data/`'s tree in `out/`.
    `group` is the folder named on the command line (or a loose file's own folder): the
    unit `ebmm energy` averages over.
    """

    path: Path
    rel: Path
    group: Path


ITERATES_MARK = ".ebmm-iterates"
"""A file in each folder of `ebmm read --save-iterates` strips: a folder holding it is
skipped when a folder above it is searched for inputs (its strips are not queries)."""


def stdin_paths(text: str, null: bool = False) -> list[str]:
    """Paths from standard input: one a line (only the line ending, `\n` or `\r\n`,
    separates: spaces are part of a name), or NUL-separated with `null` (`find -print0`:
    names holding newlines). Empty entries are skipped."""
    if null:
        return [p for p in text.split("\0") if p]
    return [p.removesuffix("\r") for p in text.split("\n") if p.removesuffix("\r")]


def collect_images(
    inputs: Sequence[str],
    stdin: TextIO | None = None,
    exclude: Path | None = None,
    null: bool = False,
) -> list[InputImage]:
    """Expand files, folders and `-` (paths on stdin, see `stdin_paths`) into a list of
    images.

    Folders are searched recursively for image suffixes, in sorted order, skipping hidden
    files (such as our own temporary files), folders of iterate strips (`ITERATES_MARK`)
    and anything under `exclude` (the output folder, so that outputs written inside an
    input folder are never read back). Files named directly are taken whatever their
    suffix, and keep their path relative to the deepest folder common to all of them.

    Raises:
        EbmmError: a path that does not exist, or a folder with no images in it.
    """
    names: list[str] = []
    for item in inputs:
        if item == "-":
            names.extend(stdin_paths(stdin.read() if stdin is not None else "", null))
        else:
            names.append(item)
    if not names:
        raise EbmmError("INPUTS", "no input paths given")
    skip = real(exclude) if exclude is not None else None
    if skip is not None and any(real(Path(n)) == skip for n in names):
        raise EbmmError(exclude, "is an input too; choose another --out")
    found: list[InputImage] = []
    loose: list[Path] = []
    for name in names:
        path = Path(name)
        info = check_path(path)
        if info is not None and stat.S_ISDIR(info.st_mode):
            files = [f for f in _walk(path) if skip is None or not real(f).is_relative_to(skip)]
            if not files:
                raise EbmmError(path, "no images in this folder")
            found.extend(InputImage(f, f.relative_to(path), path) for f in files)
        elif info is not None:
            loose.append(path)
        else:
            raise EbmmError(path, "no such file or folder")
    if loose:
        parents = [os.path.abspath(p.parent) for p in loose]
        common = Path(os.path.commonpath(parents))
        found.extend(
            InputImage(p, Path(os.path.abspath(p)).relative_to(common), p.parent) for p in loose
        )
    return found


def _walk(folder: Path) -> Iterable[Path]:
    """Image files under `folder`, recursively, sorted, hidden names skipped."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and not os.path.lexists(Path(dirpath, d, ITERATES_MARK))
        )
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(dirpath) / name


def output_paths(
    images: Sequence[InputImage],
    out: Path,
    force: bool,
    suffix: str = ".png",
    also: Sequence[Path] = (),
) -> list[Path]:
    """Where each image's output goes: `out / rel` with `suffix`; checked before any write.

    Checking every path first means a refused run writes nothing at all. `also`: other
    files the run reads (a `--memory`), which no output may replace either.

    Raises:
        EbmmError: an output that exists (without `force`), that is an input, or that two
            inputs would both be written to.
    """
    read = [*(img.path for img in images), *also]
    inputs = {real(p) for p in read}
    identities = set()
    for p in read:
        with contextlib.suppress(OSError):  # a loop among inputs is refused when read
            info = os.stat(p)
            identities.add((info.st_dev, info.st_ino))
    seen: dict[Path, Path] = {}
    paths = []
    for img in images:
        path = out / img.rel.with_suffix(suffix)
        key = real(path)
        info = check_path(path)
        if key in inputs or (info is not None and (info.st_dev, info.st_ino) in identities):
            raise EbmmError(path, "would overwrite an input; choose another --out")
        if info is not None and stat.S_ISDIR(info.st_mode):
            raise EbmmError(path, "is a folder; an output file goes here")
        if key in seen:
            raise EbmmError(path, f"two inputs would be written here: {seen[key]} and {img.path}")
        if path.exists() and not force:
            raise EbmmError(path, "exists; use --force to overwrite")
        seen[key] = img.path
        paths.append(path)
    return paths


def iterates_folder(out: Path) -> Path:
    """Where `ebmm read -o OUT --save-iterates` writes its strips: OUT-iterates, beside
    OUT (`-o .` gives ../NAME-iterates, NAME the current folder's).

    Raises:
        EbmmError: for an OUT with no folder beside it (the root).
    """
    whole = Path(os.path.abspath(out))
    if not whole.name:
        raise EbmmError(out, "has no folder beside it for --save-iterates")
    return whole.with_name(whole.name + "-iterates")


def mark_iterates(folder: Path) -> None:
    """Mark `folder` as ebmm's strips (`ITERATES_MARK`), so searches skip it."""
    mark = folder / ITERATES_MARK
    if not mark.exists():
        with atomic_path(mark) as tmp:
            tmp.write_text("ebmm read --save-iterates strips: not queries\n")


def decode_image(data: bytes, name: str | Path) -> Image.Image:
    """Decode image bytes fully into mode 'L' (grayscale) or 'RGB' (colour).

    Grayscale stays grayscale and colour stays colour: 1-bit and 16-bit images become 'L'
    (16-bit scaled, not clipped), CMYK and other colour spaces become 'RGB', palette images
    become 'L' when their colours are all grey, and transparency is composited onto white.
    Decompression-bomb sized images are refused rather than decoded.

    Raises:
        EbmmError: naming `name`, for empty, truncated, corrupt, unreadable or huge files.
    """
    if not data:
        raise EbmmError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # the header only
            if max(img.size) > MAX_SIDE:
                width, height = img.size
                raise EbmmError(
                    name, f"image too large: {width:,} x {height:,} (at most {MAX_SIDE:,} a side)"
                )
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # a photo as its camera meant it
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise EbmmError(
            name, f"image too large to decode safely (limit {Image.MAX_IMAGE_PIXELS:,} pixels)"
        ) from None
    except UnidentifiedImageError:
        raise EbmmError(name, "not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise EbmmError(name, f"truncated or corrupt image ({e})") from None
    return _normalise_mode(img, name)


def _normalise_mode(img: Image.Image, name: str | Path) -> Image.Image:
    """Bring any Pillow mode to 'L' or 'RGB' without losing range or content, by the
    file's declared mode: 16-bit scaled by 65,535 (never guessed from the values), float
    in [0, 1] (NaN, Inf or values outside refused), a grey WebP (decoded as RGB) as 'L'.

    Raises:
        EbmmError: naming `name`, for non-finite or out-of-range float pixels.
    """
    if img.mode == "P":
        img = img.convert("RGBA")
        rgb = np.asarray(img)[..., :3]
        if (rgb == rgb[..., :1]).all():
            img = img.convert("LA")
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        arr = np.asarray(img.convert("LA" if img.mode.startswith("L") else "RGBA"), np.float32)
        alpha = arr[..., -1:] / 255.0
        arr = arr[..., :-1] * alpha + 255.0 * (1.0 - alpha)
        mode = "L" if arr.shape[-1] == 1 else "RGB"
        return Image.fromarray(
            np.round(arr).astype(np.uint8).squeeze(-1)
            if mode == "L"
            else np.round(arr).astype(np.uint8),
            mode,
        )
    if img.mode.startswith("I"):  # 16-bit (I;16*, or I as Pillow opens some): by the mode
        arr = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.round(np.clip(arr, 0, 65535) / 257.0).astype(np.uint8), "L")
    if img.mode == "F":  # floating point: [0, 1] by convention
        arr = np.asarray(img).astype(np.float64)
        if not np.isfinite(arr).all():
            raise EbmmError(name, "holds NaN or infinite pixels")
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise EbmmError(
                name, f"float pixels in [{arr.min():g}, {arr.max():g}]; ebmm reads floats in [0, 1]"
            )
        return Image.fromarray(np.round(arr * 255.0).astype(np.uint8), "L")
    if img.format == "WEBP" and img.mode == "RGB":  # WebP has no grayscale mode
        rgb = np.asarray(img)
        if (rgb == rgb[..., :1]).all():
            return img.convert("L")
    if img.mode in _GRAY_MODES:
        return img.convert("L")
    return img.convert("RGB")


def read_image(path: Path) -> Image.Image:
    """Read and decode one image file (see `decode_image`).

    Only a regular file is read: it is opened without blocking and checked before a byte
    is read, so a FIFO (which would wait forever), a device such as /dev/zero (which never
    ends) or a socket is refused, as is a file over `MAX_FILE_BYTES`.
    """
    data = read_regular(path, MAX_FILE_BYTES, "image")
    return decode_image(data, path)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A decoded 'L' or 'RGB' image as a (C, H, W) float32 tensor in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize (..., C, H, W) images to size x size; None keeps the native size.

    Antialiased bilinear, so downscaling (Omniglot's 105 px to 28 or 32) averages
    strokes instead of aliasing them; the result is clipped back to [0, 1].
    """
    if size is None or x.shape[-2:] == (size, size):
        return x
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])
    out = F.interpolate(
        flat, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return out.clamp_(0.0, 1.0).reshape(*lead, x.shape[-3], size, size)


def load_image(path: Path, size: int | None = None) -> torch.Tensor:
    """Read an image file as a (C, H, W) tensor in [0, 1], resized when `size` is given."""
    return resize(to_tensor(read_image(path)), size)


def save_image(x: torch.Tensor, path: Path) -> None:
    """Write a (C, H, W) tensor in [0, 1] as an 8-bit PNG, atomically.

    C = 1 gives a grayscale PNG, C = 3 an RGB one. The encoding is deterministic, so the
    same tensor always gives the same bytes.
    """
    arr = x.detach().to("cpu", torch.float32).clamp(0, 1).mul(255).round().to(torch.uint8)
    arr = arr.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def _file_channels(path: Path) -> str:
    """The channels as the file has them, for a message: a 4-channel TIFF is decoded to
    RGB (alpha on white), but its user knows it as RGBA."""
    with Image.open(path) as img:  # the header only; the file was decoded once already
        bands = img.getbands()
    return f"{len(bands)} channels ({''.join(bands)})"


@dataclass
class Batch:
    """Images loaded for a model: the (N, C, H, W) tensor, each file's own channel count
    (to write results back in the file's mode), notices about what was adapted, and,
    when bad files are skipped, which inputs made it (`kept`, indices) and why the
    others did not (`skipped`)."""

    images: torch.Tensor
    channels: list[int]
    notes: list[str]
    kept: list[int]
    skipped: list[EbmmError]


def load_batch(
    images: Sequence[InputImage],
    channels: int,
    size: int,
    invert: bool,
    skip_bad: bool = False,
    binarize: bool = False,
) -> Batch:
    """Load images as one (N, channels, size, size) batch for a model.

    Images of another size are resized, grayscale ones given to a colour model are
    repeated over the channels, and `invert` maps v to 1 - v (dark strokes on light, as
    in Omniglot's files, to the model's ink = 1); `binarize` then thresholds at 0.5, as
    a model trained with `--binarize` saw its images. With `skip_bad`, files that would raise
    are left out and their errors listed in `Batch.skipped` instead.

    Raises:
        EbmmError: naming the file, for a colour image given to a grayscale model, and
            for anything `read_image` refuses (unless `skip_bad`).
    """
    batch, own, resized, widened, kept, skipped = [], [], set(), 0, [], []
    for index, image in enumerate(images):
        try:
            x = to_tensor(read_image(image.path))
            if x.shape[0] != channels and x.shape[0] != 1:
                raise EbmmError(
                    image.path,
                    f"has {_file_channels(image.path)}, the model takes {channels} (grayscale)",
                )
        except EbmmError as e:
            if not skip_bad:
                raise
            skipped.append(e)
            continue
        kept.append(index)
        own.append(x.shape[0])
        if x.shape[0] != channels:
            x = x.expand(channels, -1, -1)
            widened += 1
        if x.shape[1:] != (size, size):
            resized.add(f"{x.shape[2]}x{x.shape[1]}")
        x = resize(x, size)
        x = 1.0 - x if invert else x
        batch.append((x > 0.5).float() if binarize else x)
    notes = []
    if resized:
        notes.append(f"resized {', '.join(sorted(resized))} images to the model's {size}x{size}")
    if widened:
        notes.append(f"repeated {widened} grayscale image(s) over the model's {channels} channels")
    if binarize and batch:
        notes.append("thresholded the images at 0.5, as the model was trained (--binarize)")
    stacked = torch.stack(batch) if batch else torch.zeros(0, channels, size, size)
    return Batch(stacked, own, notes, kept, skipped)


def to_file(x: torch.Tensor, invert: bool, channels: int) -> torch.Tensor:
    """`load_batch` undone for one model-space (C, H, W) image: inverted back when the
    model inverts its files, in the input file's own mode (`channels`: a grayscale query
    read by a colour model comes back as its mean)."""
    x = 1.0 - x if invert else x
    if channels == 1 and x.shape[0] != 1:
        x = x.mean(0, keepdim=True)
    return x


def group_table(images: Sequence[InputImage], values: Sequence[float], name: str) -> dict[str, Any]:
    """One value per image, and their mean per input group (the folder named on the
    command line): `{"images": [{"path", name}], "groups": [{"path", "count", "mean"}]}`,
    in input order."""
    groups: dict[str, list[float]] = {}
    for image, value in zip(images, values, strict=True):
        groups.setdefault(str(image.group), []).append(value)
    return {
        "images": [{"path": str(i.path), name: v} for i, v in zip(images, values, strict=True)],
        "groups": [
            {"path": g, "count": len(v), "mean": sum(v) / len(v)} for g, v in groups.items()
        ],
    }
