"""Datasets by name, and the episodes drawn from them.

`load_dataset(name, split, root, size)` gives one of:

- `omniglot`  background set = `train`, evaluation set = `test`;
- `cifar10`   official archive, or class folders (`train/<class>/`), extracted or zipped;
- `fc100`     CIFAR-100 by superclass: `train` / `val` / `test` (60 / 20 / 20 classes);
- `binary`    random 128-bit strings, generated;
- any other name is a folder of images (class = sub-folder, or a single class).
"""

from __future__ import annotations

from pathlib import Path

from ebmm_cli.data.binary import BinaryStrings
from ebmm_cli.data.cifar import cifar10, fc100
from ebmm_cli.data.download import default_root, resolve_root
from ebmm_cli.data.episodes import Episodes
from ebmm_cli.data.images import LabelledImages, image_folder
from ebmm_cli.data.omniglot import omniglot
from ebmm_cli.errors import EbmmError

NAMES = ("omniglot", "fc100", "cifar10", "binary")

__all__ = [
    "NAMES",
    "BinaryStrings",
    "Episodes",
    "LabelledImages",
    "default_root",
    "load_dataset",
    "resolve_root",
]


def load_dataset(
    name: str,
    split: str = "train",
    root: Path | str | None = None,
    size: int | None = None,
    download: bool = True,
) -> LabelledImages | BinaryStrings:
    """A dataset by name (see the module docstring), or a folder of images by path.

    `size` is the side of the square images (None: each dataset's usual size:
    Omniglot 28, CIFAR 32, folders native).
    """
    if name == "binary":
        return BinaryStrings()
    if name not in NAMES:
        if not Path(name).is_dir():
            raise EbmmError(
                "--dataset", f"{name!r} is neither a dataset ({', '.join(NAMES)}) nor a folder"
            )
        return image_folder(Path(name), split, size)
    data_root = resolve_root(root)
    if name == "omniglot":
        return omniglot(data_root, split, size or 28, download)
    if name == "cifar10":
        return cifar10(data_root, split, size or 32, download)
    return fc100(data_root, split, size or 32, download)
