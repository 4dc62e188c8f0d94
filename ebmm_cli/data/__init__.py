"""Datasets by name, and the episodes drawn from them.

`load_dataset(name, split, root, size)` gives one of:

- `omniglot`  background set = `train`, evaluation set = `test`;
- `cifar10`   official archive, or class folders (`train/<class>/`), extracted or zipped;
- `fc100`     CIFAR-100 by superclass: `train` / `val` / `test` (60 / 20 / 20 classes);
- `imagenet64` downsampled ImageNet 64x64, the official npz batches (memory-mapped);
- `binary`    random 128-bit strings, generated;
- any other name is a folder of images (class = sub-folder, or a single class).
"""

from __future__ import annotations

from pathlib import Path

from ebmm_cli.choices import DATASETS, dataset_defaults
from ebmm_cli.data.binary import BinaryStrings
from ebmm_cli.data.cifar import cifar10, fc100
from ebmm_cli.data.download import default_root, resolve_root
from ebmm_cli.data.episodes import Episodes
from ebmm_cli.data.imagenet import imagenet64
from ebmm_cli.data.images import Binarized, LabelledImages, image_folder
from ebmm_cli.data.omniglot import omniglot
from ebmm_cli.errors import EbmmError

__all__ = [
    "BinaryStrings",
    "Episodes",
    "LabelledImages",
    "check_dataset",
    "default_root",
    "load_dataset",
    "resolve_root",
]


def check_dataset(name: str) -> None:
    """Refuse a `--dataset` that is neither a dataset's name nor a folder."""
    if name not in DATASETS and not Path(name).is_dir():
        raise EbmmError(
            "--dataset", f"{name!r} is neither a dataset ({', '.join(DATASETS)}) nor a folder"
        )


def load_dataset(
    name: str,
    split: str = "train",
    root: Path | str | None = None,
    size: int | None = None,
    download: bool = True,
    invert: bool = False,
    binarize: bool = False,
) -> LabelledImages | BinaryStrings:
    """A dataset by name (see the module docstring), or a folder of images by path.

    `size` is the side of the square images (None: a named dataset's usual size, from
    `choices.DEFAULTS`: Omniglot 28, CIFAR 32; a folder's native size). `invert` maps a
    folder's images v to 1 - v (dark strokes on light scans); Omniglot is always inverted.
    `binarize` thresholds the resized images' pixels at 0.5 (`Binarized`).
    """
    if name == "binary":
        return BinaryStrings()
    images = _images(name, split, root, size, download, invert)
    return Binarized(images) if binarize else images


def _images(
    name: str, split: str, root: Path | str | None, size: int | None, download: bool, invert: bool
) -> LabelledImages:
    check_dataset(name)
    if name not in DATASETS:
        return image_folder(Path(name), split, size, invert)
    data_root = resolve_root(root)
    size = size or dataset_defaults(name).image_size
    if name == "omniglot":
        return omniglot(data_root, split, size, download)
    if name == "cifar10":
        return cifar10(data_root, split, size, download)
    if name == "imagenet64":
        return imagenet64(data_root, split, size)
    return fc100(data_root, split, size, download)


_ARCHIVES = (".zip", ".tar", ".gz", ".tgz", ".npz", ".bz2", ".xz")
"""Suffixes of the archives a loader may read at the data root's top."""


def dataset_sources(dataset: str, root: Path | str | None) -> list[Path]:
    """What loading `dataset` may read: a folder dataset's folder; for a named one, its
    folder in the data root and every folder and archive at the data root's top (the
    loaders look there too). Outputs may not replace or lie inside any of them."""
    if dataset == "binary":
        return []
    if dataset not in DATASETS:
        return [Path(dataset)]
    base = resolve_root(root)
    found = [base / dataset]
    try:
        entries = list(base.iterdir())
    except OSError:
        return found
    return found + [p for p in entries if p.name.lower().endswith(_ARCHIVES) or p.is_dir()]
