"""Downsampled ImageNet 64x64, on archives generated in the official format:
`train_data_batch_N.npz` and `val_data.npz` with `data` (N, 12288) uint8 channel-first
rows and `labels` 1..1000, extracted in the release's folders or inside its zips."""

from __future__ import annotations

import json
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ebmm_cli.data import Episodes, load_dataset
from ebmm_cli.errors import EbmmError
from tests.conftest import run_ebmm

ROWS = 120  # images per generated batch


def _batch(path: Path, seed: int, rows: int = ROWS, **extra: np.ndarray) -> dict:
    """One batch file as the release writes it (`np.savez`: members stored uncompressed);
    labels cycle through 30 classes so that class episodes have room."""
    rng = np.random.default_rng(seed)
    arrays = {
        "data": rng.integers(0, 256, (rows, 12288), dtype=np.uint8),
        "labels": [int(v) for v in (np.arange(rows) % 30) * 33 + 1],  # 1..958, a list as released
        "mean": np.zeros(12288),
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def _release(root: Path, batches: int, zipped: bool) -> dict[str, dict]:
    """`batches` training batches and the validation file under `root/imagenet64/`,
    extracted into the zips' folders or zipped as the release ships them."""
    base = root / "imagenet64"
    made = {}
    parts = {
        "Imagenet64_train_part1_npz": [f"train_data_batch_{i}.npz" for i in range(1, batches + 1)],
        "Imagenet64_val_npz": ["val_data.npz"],
    }
    for folder, names in parts.items():
        for seed, name in enumerate(names):
            made[name] = _batch(base / folder / name, seed + (100 if "val" in name else 0))
        if zipped:
            with zipfile.ZipFile(base / f"{folder}.zip", "w", zipfile.ZIP_DEFLATED) as z:
                for name in names:
                    z.write(base / folder / name, f"{folder}/{name}")
                    (base / folder / name).unlink()
            (base / folder).rmdir()
    return made


@pytest.mark.parametrize("zipped", [False, True])
def test_images_labels_and_splits_are_the_release_s(zipped: bool, tmp_path: Path) -> None:
    made = _release(tmp_path, batches=2, zipped=zipped)
    train = load_dataset("imagenet64", "train", tmp_path)
    assert len(train) == 2 * ROWS and len(train.classes) == 1000
    for index, (name, row) in ((0, ("train_data_batch_1.npz", 0)),
                               (ROWS + 7, ("train_data_batch_2.npz", 7))):  # fmt: skip
        image, label = train[index]
        source = made[name]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        want = torch.from_numpy(source["data"][row].reshape(3, 64, 64).astype(np.float32)) / 255
        assert torch.equal(image, want)
        assert label == source["labels"][row] - 1  # 1..1000 -> 0..999
    assert min(train.labels) >= 0 and max(train.labels) <= 999
    test = load_dataset("imagenet64", "test", tmp_path, size=32)
    assert len(test) == ROWS and test[3][0].shape == (3, 32, 32)
    assert float(test[3][0].min()) >= 0.0 and float(test[3][0].max()) <= 1.0
    # Unpacked once (zips), or mapped in place: the source files are never changed.
    assert (tmp_path / "imagenet64" / "unpacked").is_dir() == zipped


def test_episodes_of_classes_and_of_random_images(tmp_path: Path) -> None:
    _release(tmp_path, batches=2, zipped=False)
    train = load_dataset("imagenet64", "train", tmp_path)
    classes = Episodes(train, 16, shots=1, seed=0)
    images, labels = classes.sample()
    assert images.shape == (16, 3, 64, 64) and len(set(labels.tolist())) == 16
    random = Episodes(train, 40, shots=None, seed=0)
    images, _ = random.sample()
    assert images.shape == (40, 3, 64, 64)
    assert len({tuple(x.flatten()[:64].tolist()) for x in images}) == 40  # distinct images


@pytest.mark.parametrize("zipped", [False, True])
def test_memory_does_not_grow_with_the_number_of_batches(zipped: bool, tmp_path: Path) -> None:
    peaks = {}
    for batches in (2, 6):
        root = tmp_path / f"{batches}"
        _release(root, batches, zipped)
        tracemalloc.start()
        data = load_dataset("imagenet64", "train", root)
        for index in range(0, len(data), 37):
            data[index]
        peaks[batches] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    one_batch = ROWS * 12288
    assert peaks[6] < peaks[2] + one_batch  # six batches cost what two do, give or take
    # Unpacking holds one batch at a time: its bytes read from the zip, its array and the
    # zip's buffers (~3.2 batches here), nowhere near the six batches' 8.8 MB.
    assert peaks[6] < 4 * one_batch
    if not zipped:
        assert peaks[6] < one_batch  # mapped: no batch is ever read whole


def test_damaged_batches_are_refused_with_their_name(tmp_path: Path) -> None:
    base = tmp_path / "imagenet64"
    cases = {
        "cut": lambda p: p.write_bytes(p.read_bytes()[:5000]),
        "shape": lambda p: _batch(p, 0, data=np.zeros((4, 100), dtype=np.uint8)),
        "labels": lambda p: _batch(p, 0, labels=np.full(ROWS, 1001)),
        "pickle": lambda p: np.savez(p, data=np.array([{"x": 1}], dtype=object), labels=[1]),
        "text": lambda p: p.write_text("not a zip"),
    }
    for case, damage in cases.items():
        path = base / "train_data_batch_1.npz"
        _batch(path, 0)
        damage(path)
        with pytest.raises(EbmmError) as error:
            load_dataset("imagenet64", "train", tmp_path)
        assert str(error.value.subject) == str(path), case
        path.unlink()
    with pytest.raises(EbmmError, match="not downloaded automatically"):
        load_dataset("imagenet64", "train", tmp_path)
    bad_zip = base / "Imagenet64_val_npz.zip"
    with zipfile.ZipFile(bad_zip, "w") as z:
        z.writestr("Imagenet64_val_npz/val_data.npz", b"PK\x03\x04 damaged")
    with pytest.raises(EbmmError, match=r"val_data\.npz") as error:
        load_dataset("imagenet64", "test", tmp_path)
    assert str(bad_zip) in str(error.value.subject)


@pytest.mark.slow
def test_train_and_compare_run_end_to_end(tmp_path: Path) -> None:
    _release(tmp_path, batches=2, zipped=True)
    out = tmp_path / "run"
    trained = run_ebmm("train", "--dataset", "imagenet64", "--data-root", str(tmp_path),
                       "--steps", "3", "--batch-size", "4", "--set", "shots=0", "--write-steps",
                       "1", "--read-steps", "2", "--eval-every", "3", "--eval-episodes", "1",
                       "-o", str(out), "--device", "cpu")  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    config = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert config["step"] == 3 and config["heldout_split"] == "test"
    compared = run_ebmm("compare", "--dataset", "imagenet64", "--data-root", str(tmp_path),
                        "--model", str(out / "model.safetensors"), "--batch-size", "4",
                        "--shots", "0", "--episodes", "2", "--baselines", "identity,nearest",
                        "--device", "cpu", "--json")  # fmt: skip
    assert compared.returncode == 0, compared.stderr
    rows = {r["method"]: r for r in json.loads(compared.stdout)["rows"]}
    (model,) = [r for m, r in rows.items() if m.startswith("ebmm") and "unwritten" not in m]
    assert model["memory_floats"] == 18_448  # the paper's ImageNet network, dynamic 8
