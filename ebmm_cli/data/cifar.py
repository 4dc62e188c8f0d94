"""CIFAR-10 and FC100 (CIFAR-100 split by superclass), from the official archives.

CIFAR-10 is read from `<root>/cifar10/` (or `<root>/`): the official
`cifar-10-python.tar.gz` or its extracted `cifar-10-batches-py/`, else a folder of class
sub-folders per split (`train/<class>/*.jpg`), extracted or inside a zip.
FC100 (Oreshkin et al. 2018) is read from the official `cifar-100-python.tar.gz` (or
`cifar-100-python/`) under `<root>/cifar100/` (or `<root>/`): all 600 images of each
fine class, split 60/20/20 classes by superclass.

The official archives are Python pickles; they are read with an unpickler that only
builds numpy arrays and plain containers, so a tampered archive cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ebmm_cli.data.download import fetch
from ebmm_cli.data.images import (
    ImageArray,
    LabelledImages,
    folder_files,
    image_files,
    zip_members,
)
from ebmm_cli.errors import EbmmError
from ebmm_cli.safety import regular

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"

# FC100's superclass indices (into CIFAR-100's coarse_label_names), per split.
FC100_SUPERCLASSES = {
    "train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19),
    "val": (8, 11, 13, 16),
    "test": (0, 7, 12, 14),
}

_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, strings and numbers, and nothing else."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(read: Callable[[], bytes], where: str) -> dict:
    """Load one CIFAR pickle (its keys are bytes, as written by Python 2)."""
    try:
        obj = _ArrayUnpickler(io.BytesIO(read()), encoding="bytes").load()
    except Exception as e:  # any malformed pickle: many exception types
        raise EbmmError(where, f"not a CIFAR batch file ({e})") from None
    if not isinstance(obj, dict):
        raise EbmmError(where, "not a CIFAR batch file (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _find_archive(base: Path, folder: str, tarball: str) -> Path | None:
    """The extracted `folder` or the `tarball` under `base`, whichever is there."""
    if (base / folder).exists():
        return base / folder
    if os.path.lexists(base / tarball):
        regular(base / tarball, "archive")
        return base / tarball
    return None


def _load_batches(source: Path, folder: str, names: list[str]) -> list[dict]:
    """Read the pickles `names` from an extracted folder or, in one pass, from the tarball."""
    if source.is_dir():
        return [_unpickle((source / n).read_bytes, str(source / n)) for n in names]
    try:
        with tarfile.open(source) as tar:
            found = {}
            for n in names:
                member = tar.extractfile(f"{folder}/{n}")
                if member is None:
                    raise KeyError(n)
                found[n] = _unpickle(member.read, f"{source}:{folder}/{n}")
    except (tarfile.TarError, KeyError, OSError) as e:
        raise EbmmError(source, f"cannot read {folder} from the archive ({e})") from None
    return [found[n] for n in names]


def _images(batch: dict, where: str) -> np.ndarray:
    """(N, 32, 32, 3) uint8 from a batch's (N, 3072) `data` row-major planes."""
    data = np.asarray(batch.get("data"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise EbmmError(where, f"expected uint8 data of shape (N, 3072), got {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _decode_names(names: list) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def cifar10(
    root: Path, split: str = "train", size: int | None = 32, download: bool = True
) -> LabelledImages:
    """CIFAR-10's `train` (50,000) or `test` (10,000) images, 10 classes."""
    if split not in ("train", "test"):
        raise EbmmError("--split", f"cifar10 has splits train, test, not {split!r}")
    for base in (root / "cifar10", root):
        source = _find_archive(base, "cifar-10-batches-py", "cifar-10-python.tar.gz")
        if source is not None:
            return _cifar10_batches(source, split, size)
        if (base / split).is_dir():
            return image_files(folder_files(base / split, 1), size, base / split)
        for archive in sorted(base.glob("*.zip")):
            entries = zip_members(archive, split, 1)
            if entries:
                return image_files(entries, size, archive)
    tarball = root / "cifar10" / "cifar-10-python.tar.gz"
    if not download:
        raise EbmmError(tarball, f"CIFAR-10 {split} split not found")
    return _cifar10_batches(fetch(CIFAR10_URL, tarball, CIFAR10_MD5), split, size)


def _cifar10_batches(source: Path, split: str, size: int | None) -> ImageArray:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    *batches, meta = _load_batches(source, "cifar-10-batches-py", [*names, "batches.meta"])
    images = np.concatenate(
        [_images(b, f"{source}:{n}") for n, b in zip(names, batches, strict=True)]
    )
    labels = [label for b in batches for label in b["labels"]]
    return ImageArray(images, labels, _decode_names(meta["label_names"]), size)


def fc100(
    root: Path, split: str = "train", size: int | None = 32, download: bool = True
) -> ImageArray:
    """FC100: CIFAR-100 classes split by superclass, 60 (`train`), 20 (`val`), 20 (`test`)."""
    if split not in FC100_SUPERCLASSES:
        raise EbmmError("--split", f"fc100 has splits train, val, test, not {split!r}")
    source = None
    for base in (root / "cifar100", root):
        source = _find_archive(base, "cifar-100-python", "cifar-100-python.tar.gz")
        if source is not None:
            break
    if source is None:
        tarball = root / "cifar100" / "cifar-100-python.tar.gz"
        if not download:
            raise EbmmError(tarball, "CIFAR-100 not found (needed for fc100)")
        source = fetch(CIFAR100_URL, tarball, CIFAR100_MD5)
    meta, *batches = _load_batches(source, "cifar-100-python", ["meta", "train", "test"])
    fine_names = _decode_names(meta["fine_label_names"])
    keep = list(FC100_SUPERCLASSES[split])
    images, fine = [], []
    for name, batch in zip(("train", "test"), batches, strict=True):
        mask = np.isin(np.asarray(batch["coarse_labels"]), keep)
        images.append(_images(batch, f"{source}:{name}")[mask])
        fine.append(np.asarray(batch["fine_labels"])[mask])
    labels = np.concatenate(fine)
    order = np.argsort(labels, kind="stable")
    # Labels are renumbered 0..C-1 within the split; class names keep the CIFAR-100 names.
    kept = sorted(set(labels.tolist()))
    index = {c: i for i, c in enumerate(kept)}
    return ImageArray(
        np.concatenate(images)[order],
        [index[int(v)] for v in labels[order]],
        [fine_names[c] for c in kept],
        size,
    )
