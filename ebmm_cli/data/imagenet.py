"""Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017), from the official release.

The release ships `train_data_batch_1.npz` ... `train_data_batch_10.npz` (about 128,000
images each) and `val_data.npz` (50,000): `data` is (N, 12288) uint8 rows, each a
channel-first 3 x 64 x 64 RGB image, and `labels` are classes 1..1000. They come in
`Imagenet64_train_part1_npz.zip` (batches 1-5), `Imagenet64_train_part2_npz.zip`
(6-10) and `Imagenet64_val_npz.zip`. Under `<root>/imagenet64/` ebmm reads the zips as
they are, or the batches extracted anywhere one folder deep (the zips' own folders), and
uses every training batch it finds. `train` is the training batches, `test` the
validation set.

The training set is 15.7 GB of pixels, so nothing loads it whole: each batch's `data`
is memory-mapped from its `.npz` where the file stores it uncompressed, as `np.savez`
does. A batch inside a zip (or compressed) is unpacked once, one batch at a time, to
`<root>/imagenet64/unpacked/` and mapped from there. Memory use is then one batch at
most while unpacking and the labels (1.28 million) after, whatever the number of
batches. Arrays are read with `allow_pickle=False`.

ImageNet is not downloaded: image-net.org serves the release only to signed-in users
who accepted its terms, so a missing file is an error that says where to put it.
"""

from __future__ import annotations

import bisect
import zipfile
from pathlib import Path
from typing import IO

import numpy as np
import torch

from ebmm_cli.atomic import atomic_path
from ebmm_cli.data.images import LabelledImages
from ebmm_cli.errors import EbmmError
from ebmm_cli.imageio import resize
from ebmm_cli.safety import regular

SIDE = 64
ROW = 3 * SIDE * SIDE
CLASSES = 1000
BATCHES = {
    "train": [f"train_data_batch_{i}.npz" for i in range(1, 11)],
    "test": ["val_data.npz"],
}
ZIPS = (
    "Imagenet64_train_part1_npz.zip",
    "Imagenet64_train_part2_npz.zip",
    "Imagenet64_val_npz.zip",
)
URL = "https://image-net.org/download-images.php"


class ImageNet64(LabelledImages):
    """Images from several memory-mapped (N, 12288) uint8 batches, decoded on access.

    Args:
        batches: one array per batch file, in order (memory maps, or small arrays).
        labels: a class 0..999 per image, over all batches in order.
        size: side of the square output; None or 64 keeps 64.
    """

    def __init__(self, batches: list[np.ndarray], labels: list[int], size: int | None) -> None:
        self.batches = batches
        self.starts = list(np.cumsum([0] + [len(b) for b in batches[:-1]]))
        self.labels = labels
        self.classes = [str(c + 1) for c in range(CLASSES)]  # the release's own numbering
        self.size = size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        b = bisect.bisect_right(self.starts, index) - 1
        row = np.asarray(self.batches[b][index - self.starts[b]])
        x = torch.from_numpy(row.copy()).view(3, SIDE, SIDE).float().div_(255.0)
        return resize(x, self.size), self.labels[index]


def imagenet64(root: Path, split: str = "train", size: int | None = 64) -> ImageNet64:
    """Downsampled ImageNet's `train` (batches found of the ten) or `test` (validation)."""
    if split not in BATCHES:
        raise EbmmError("--split", f"imagenet64 has splits train, test, not {split!r}")
    base = root / "imagenet64"
    found = [(name, where) for name in BATCHES[split] if (where := _locate(base, name))]
    if not found:
        wanted = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
        raise EbmmError(
            base,
            f"no {wanted} here, extracted or in the release's zips ({', '.join(ZIPS)}); "
            f"ImageNet is not downloaded automatically: get it from {URL}",
        )
    arrays, labels = [], []
    for name, where in found:
        data, batch_labels = _open_batch(base, name, where)
        arrays.append(data)
        labels.extend(int(v) - 1 for v in batch_labels)
    return ImageNet64(arrays, labels, size)


# Where a batch is: a file on disk, or (zip archive, member name).
_Where = Path | tuple[Path, str]


def _locate(base: Path, name: str) -> _Where | None:
    """`name` directly under `base`, one folder down (an extracted zip), or in a zip."""
    for candidate in (base / name, *sorted(base.glob(f"*/{name}"))):
        if candidate.is_file():
            return candidate
    for archive in sorted(base.glob("*.zip")):
        regular(archive, "zip archive")
        try:
            with zipfile.ZipFile(archive) as z:
                members = [m for m in z.namelist() if m.rsplit("/", 1)[-1] == name]
        except (OSError, zipfile.BadZipFile) as e:
            raise EbmmError(archive, f"not a readable zip archive ({e})") from None
        if members:
            return archive, members[0]
    return None


def _open_batch(base: Path, name: str, where: _Where) -> tuple[np.ndarray, np.ndarray]:
    """A batch's `data`, memory-mapped, and its labels 1..1000, both checked."""
    label = f"{where[0]}:{where[1]}" if isinstance(where, tuple) else str(where)
    mapped = _map_stored(where) if isinstance(where, Path) else None
    if mapped is not None:
        data, labels = mapped
    else:
        data, labels = _unpacked(base, name, where, label)
    _check(data, labels, label)
    return data, labels


def _check(data: np.ndarray, labels: np.ndarray, where: str) -> None:
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW:
        raise EbmmError(
            where, f"not an ImageNet64 batch: data is {data.dtype} {data.shape}, not (N, {ROW})"
        )
    if labels.ndim != 1 or len(labels) != len(data):
        raise EbmmError(
            where, f"not an ImageNet64 batch: {len(labels)} labels for {len(data)} rows"
        )
    if len(labels) and (labels.min() < 1 or labels.max() > CLASSES):
        raise EbmmError(where, f"not an ImageNet64 batch: labels outside 1..{CLASSES}")


def _load_npz(source: Path | IO[bytes], where: str, keys: tuple[str, ...]) -> list[np.ndarray]:
    """The arrays `keys` of an npz, with pickles refused."""
    try:
        with np.load(source, allow_pickle=False) as npz:
            return [np.asarray(npz[k]) for k in keys]
    except KeyError as e:
        raise EbmmError(where, f"not an ImageNet64 batch (no {e} array)") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise EbmmError(where, f"not a readable npz file ({e})") from None


def _map_stored(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """`data` memory-mapped in place, if the npz stores it uncompressed; else None."""
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("data.npy")
    except KeyError:
        raise EbmmError(path, "not an ImageNet64 batch (no 'data' array)") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise EbmmError(path, f"not a readable npz file ({e})") from None
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    (labels,) = _load_npz(path, str(path), ("labels",))
    with open(path, "rb") as f:
        # The member's bytes follow its local header: 30 bytes, then its name and extra
        # field, whose lengths the local header itself gives.
        f.seek(info.header_offset)
        local = f.read(30)
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little")
        start += int.from_bytes(local[28:30], "little")
        f.seek(start)
        try:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
        except ValueError as e:
            raise EbmmError(path, f"not a readable npz file ({e})") from None
        offset = f.tell()
    if fortran or dtype.hasobject or len(shape) != 2:
        raise EbmmError(path, f"not an ImageNet64 batch: data is {dtype} {shape}, not (N, {ROW})")
    if offset + int(np.prod(shape)) * dtype.itemsize > path.stat().st_size:
        raise EbmmError(path, "not a readable npz file (data is cut short)")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape), labels


def _unpacked(base: Path, name: str, where: _Where, label: str) -> tuple[np.ndarray, np.ndarray]:
    """A batch unpacked once to `base/unpacked/` (data and labels as .npy), then mapped."""
    folder = base / "unpacked"
    stem = name.removesuffix(".npz")
    data_path, labels_path = folder / f"{stem}.data.npy", folder / f"{stem}.labels.npy"
    if not (data_path.exists() and labels_path.exists()):
        if isinstance(where, tuple):
            archive, member = where
            try:  # streamed from the archive: one batch in memory, not two
                with zipfile.ZipFile(archive) as z, z.open(member) as f:
                    data, labels = _load_npz(f, label, ("data", "labels"))
            except (OSError, zipfile.BadZipFile, EOFError) as e:
                raise EbmmError(label, f"damaged zip member ({e})") from None
        else:
            data, labels = _load_npz(where, label, ("data", "labels"))
        _check(data, labels, label)
        folder.mkdir(parents=True, exist_ok=True)
        for path, array in ((data_path, data), (labels_path, labels)):
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
        del data
    try:
        data = np.load(data_path, mmap_mode="r", allow_pickle=False)
        labels = np.load(labels_path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise EbmmError(
            data_path, f"damaged unpacked batch; delete it to unpack again ({e})"
        ) from None
    return data, labels
