"""Omniglot (Lake et al. 2015): 1,623 handwritten characters from 50 alphabets.

The official release is two zips, `images_background.zip` (training, 30 alphabets) and
`images_evaluation.zip` (testing, 20 alphabets), each holding
`images_<set>/<Alphabet>/characterNN/*.png` (105 x 105, 1-bit, black ink on white).
They are read from `<root>/omniglot/` (or `<root>/` itself), as zips or extracted
folders, and downloaded there only when absent. A class is one character of one
alphabet; images come out with ink = 1, resized to `size` x `size`.
"""

from __future__ import annotations

from pathlib import Path

from ebmm_cli.data.download import fetch
from ebmm_cli.data.images import ImageFiles, folder_files, image_files, zip_members
from ebmm_cli.errors import EbmmError

URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
# MD5 of the official zips (the same values torchvision checks).
MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
SPLITS = {"train": "images_background", "test": "images_evaluation"}


def omniglot(
    root: Path, split: str = "train", size: int | None = 28, download: bool = True
) -> ImageFiles:
    """Omniglot's background (`train`) or evaluation (`test`) set.

    Example:
        >>> chars = omniglot(Path("../shared/data"), "train", size=32)
        >>> image, label = chars[0]  # (1, 32, 32) in [0, 1], ink = 1
    """
    if split not in SPLITS:
        raise EbmmError("--split", f"omniglot has splits {', '.join(SPLITS)}, not {split!r}")
    part = SPLITS[split]
    for base in (root / "omniglot", root):
        if (base / part).is_dir():
            return image_files(folder_files(base / part, 2), size, base / part, invert=True)
        if (base / f"{part}.zip").is_file():
            archive = base / f"{part}.zip"
            return image_files(zip_members(archive, part, 2), size, archive, invert=True)
    archive = root / "omniglot" / f"{part}.zip"
    if not download:
        raise EbmmError(archive, "not found (neither the zip nor its extracted folder)")
    fetch(URL + archive.name, archive, MD5[part])
    return image_files(zip_members(archive, part, 2), size, archive, invert=True)
