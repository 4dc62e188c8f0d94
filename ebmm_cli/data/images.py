"""Labelled image datasets, decoded lazily from files, zip members or arrays.

Every dataset here is a `torch.utils.data.Dataset` of `(image, label)` pairs with images
(C, H, W) float32 in [0, 1], resized to `size` x `size`, plus the bookkeeping that
learn2learn's `MetaDataset` would otherwise build by decoding every image once:
`labels` (one per item) and `classes` (a name per label).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ebmm_cli.errors import EbmmError
from ebmm_cli.imageio import IMAGE_SUFFIXES, MAX_FILE_BYTES, decode_image, resize, to_tensor
from ebmm_cli.safety import read_regular, regular

# An item's source: a file path, or (zip archive, member name).
Source = Path | tuple[Path, str]


class LabelledImages(Dataset):
    """Base class: labels, class names and the lookup MetaDataset needs."""

    labels: list[int]
    classes: list[str]

    def labels_to_indices(self) -> dict[int, list[int]]:
        """{label: [indices of its items]}, in item order."""
        table: dict[int, list[int]] = {}
        for i, label in enumerate(self.labels):
            table.setdefault(label, []).append(i)
        return table

    def __len__(self) -> int:
        return len(self.labels)


class Binarized(LabelledImages):
    """Another image dataset with every pixel thresholded at 0.5 (after its resizing):
    Omniglot as the binary images the paper's Hamming error is defined on."""

    def __init__(self, images: LabelledImages) -> None:
        self.images = images
        self.labels = images.labels
        self.classes = images.classes

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, label = self.images[index]
        return (x > 0.5).float(), label


class ImageFiles(LabelledImages):
    """Images decoded on access from files or from members of zip archives.

    Args:
        sources: one per item, a path or (zip path, member name).
        labels: one int per item.
        classes: a name per label.
        size: side of the square output; None keeps the native size.
        invert: map v to 1 - v (Omniglot: black ink on white becomes ink = 1).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        labels: Sequence[int],
        classes: Sequence[str],
        size: int | None,
        invert: bool = False,
    ) -> None:
        self.sources = list(sources)
        self.labels = list(labels)
        self.classes = list(classes)
        self.size = size
        self.invert = invert
        self._zips: dict[Path, zipfile.ZipFile] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        # Open zip handles do not survive pickling (DataLoader workers); reopen lazily.
        state = dict(self.__dict__)
        state["_zips"] = {}
        return state

    def _read(self, source: Source) -> tuple[bytes, str]:
        """An item's bytes: a regular file, or a zip member, each at most
        `MAX_FILE_BYTES` (a member's declared size checked first, then what it inflates
        to, streamed, so a zip bomb stops at the bound)."""
        if isinstance(source, Path):
            return read_regular(source, MAX_FILE_BYTES), str(source)
        archive, member = source
        name = f"{archive}:{member}"
        if self._pid != os.getpid():  # a forked worker must not share the parent's handles
            self._zips, self._pid = {}, os.getpid()
        if archive not in self._zips:
            regular(archive, "zip archive")
            self._zips[archive] = zipfile.ZipFile(archive)
        try:
            z = self._zips[archive]
            declared = z.getinfo(member).file_size
            if declared > MAX_FILE_BYTES:
                raise EbmmError(name, f"zip member too large ({declared:,} bytes) for an image")
            with z.open(member) as f:
                data = f.read(MAX_FILE_BYTES + 1)
            if len(data) > MAX_FILE_BYTES:
                raise EbmmError(name, "zip member inflates beyond the image size limit")
            return data, name
        except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:  # a CRC error, damage
            raise EbmmError(name, f"damaged zip member ({e})") from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        data, name = self._read(self.sources[index])
        x = to_tensor(decode_image(data, name))
        # Invert before resizing, so that a background of exactly 0 stays exactly 0.
        return resize(1.0 - x if self.invert else x, self.size), self.labels[index]


class ImageArray(LabelledImages):
    """Images held in memory as a (N, H, W, C) uint8 array (the CIFAR pickles)."""

    def __init__(
        self, images: np.ndarray, labels: Sequence[int], classes: Sequence[str], size: int | None
    ) -> None:
        self.images = images
        self.labels = [int(v) for v in labels]
        self.classes = list(classes)
        self.size = size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.images[index]).permute(2, 0, 1).float().div_(255.0)
        return resize(x, self.size), self.labels[index]


def _by_class(entries: Sequence[tuple[str, Source]]) -> tuple[list[Source], list[int], list[str]]:
    """Sort (class name, source) pairs into sources, labels and sorted class names."""
    classes = sorted({name for name, _ in entries})
    index = {name: i for i, name in enumerate(classes)}
    ordered = sorted(entries, key=lambda e: (index[e[0]], str(e[1])))
    return [s for _, s in ordered], [index[n] for n, _ in ordered], classes


def zip_members(archive: Path, top: str, depth: int) -> list[tuple[str, Source]]:
    """(class, source) for each image under `top/` in a zip; the class is the first `depth`
    folders below `top` (Omniglot: Alphabet/characterNN, depth 2; CIFAR folders: depth 1).
    """
    regular(archive, "zip archive")
    try:
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise EbmmError(archive, f"not a readable zip archive ({e})") from None
    entries = []
    prefix = top.rstrip("/") + "/"
    for name in names:
        if not name.startswith(prefix) or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        parts = name[len(prefix) :].split("/")
        if len(parts) == depth + 1:
            entries.append(("/".join(parts[:depth]), (archive, name)))
    return entries


def folder_files(folder: Path, depth: int) -> list[tuple[str, Source]]:
    """(class, path) for each image `depth` folders below `folder`; depth 0 = one class."""
    entries = []
    pattern = "/".join(["*"] * (depth + 1))
    for path in folder.glob(pattern):
        if (
            path.is_file()
            and path.suffix.lower() in IMAGE_SUFFIXES
            and not path.name.startswith(".")
        ):
            rel = path.relative_to(folder).parts
            entries.append(("/".join(rel[:depth]) or folder.name, path))
    return entries


def image_files(
    entries: Sequence[tuple[str, Source]], size: int | None, where: Path, invert: bool = False
) -> ImageFiles:
    """An `ImageFiles` dataset from (class, source) pairs; refuses an empty one."""
    if not entries:
        raise EbmmError(where, "no images found")
    sources, labels, classes = _by_class(entries)
    return ImageFiles(sources, labels, classes, size, invert=invert)


def image_folder(path: Path, split: str, size: int | None, invert: bool = False) -> ImageFiles:
    """Any folder of images: class = sub-folder, or one class when images lie directly in it.

    A folder with `train/` and `test/` (or `val/`) sub-folders is read per split; otherwise
    every split is the whole folder. `invert`: dark strokes on light become ink = 1.
    """
    if not path.is_dir():
        raise EbmmError(path, "no such folder")
    if (path / split).is_dir() and split in ("train", "val", "test"):
        path = path / split
    entries = folder_files(path, 1)
    if not entries:
        entries = folder_files(path, 0)
    return image_files(entries, size, path, invert)
