"""Loaders on the real shared data and on official-format archives built by the tests."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ebmm_cli.data import BinaryStrings, Episodes, load_dataset
from ebmm_cli.data.download import fetch
from ebmm_cli.data.omniglot import omniglot
from ebmm_cli.errors import EbmmError
from tests.conftest import CIFAR10_CLASSES


@pytest.fixture(scope="module")
def background(data_root: Path):
    return omniglot(data_root, "train", size=28, download=False)


def test_omniglot_background_is_complete(background) -> None:
    assert len(background) == 19_280
    assert len(background.classes) == 964
    assert len({c.split("/")[0] for c in background.classes}) == 30
    assert all(len(v) == 20 for v in background.labels_to_indices().values())


def test_omniglot_evaluation_as_present(data_root: Path) -> None:
    test = omniglot(data_root, "test", size=32, download=False)
    alphabets = {c.split("/")[0] for c in test.classes}
    assert alphabets == {
        "Angelic",
        "Atlantean",
        "Avesta",
        "Glagolitic",
        "Kannada",
        "Malayalam",
        "Mongolian",
        "Oriya",
        "Syriac_(Serto)",
        "Tibetan",
    }
    assert len(test) == 6_920
    x, _ = test[0]
    assert x.shape == (1, 32, 32)


@pytest.mark.parametrize("size", [28, 32])
def test_omniglot_images_are_ink_one_in_unit_range(data_root: Path, size: int) -> None:
    data = omniglot(data_root, "train", size=size, download=False)
    for i in (0, 5_000, 19_279):
        x, label = data[i]
        assert x.shape == (1, size, size) and x.dtype == torch.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
        # Ink is 1 on a background of 0: strokes cover a small part of a character.
        assert x.mean() < 0.3 and x.max() > 0.5
        assert x[0, 0, 0] == 0.0 and x[0, -1, -1] == 0.0
        assert label == data.labels[i]


def test_omniglot_extracted_folder_matches_zip(omniglot_dir: Path, background) -> None:
    root = omniglot_dir.parent.parent
    folder = omniglot(root, "train", size=28, download=False)
    assert sorted(folder.classes) == ["Greek/character03", "Latin/character01", "Latin/character02"]
    assert len(folder) == 60
    by_name = {
        str(s[1]).rsplit("/", 1)[-1]: i
        for i, s in enumerate(background.sources)
        if str(s[1]).startswith("images_background/Latin/character01/")
    }
    for i, path in enumerate(folder.sources):
        if path.parent.name == "character01" and path.parent.parent.name == "Latin":
            assert torch.equal(folder[i][0], background[by_name[path.name]][0])


def test_omniglot_absent_without_download_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(EbmmError) as err:
        omniglot(tmp_path, "train", download=False)
    assert err.value.subject == str(tmp_path / "omniglot" / "images_background.zip")


def test_unknown_split_is_refused(data_root: Path) -> None:
    with pytest.raises(EbmmError, match="splits"):
        omniglot(data_root, "val", download=False)


def test_fetch_verifies_checksum_and_leaves_nothing_on_mismatch(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"ebmm" * 1000)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "file.bin"
    with pytest.raises(EbmmError, match="MD5"):
        fetch(src.as_uri(), dest, "0" * 32)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    assert fetch(src.as_uri(), dest, md5) == dest
    assert dest.read_bytes() == src.read_bytes()


def test_fetch_failure_is_a_clean_error(tmp_path: Path) -> None:
    with pytest.raises(EbmmError, match="could not be downloaded"):
        fetch((tmp_path / "missing.zip").as_uri(), tmp_path / "out.zip", "0" * 32)
    assert not (tmp_path / "out.zip").exists()


def test_cifar10_class_folders_from_the_shared_zip(data_root: Path) -> None:
    data = load_dataset("cifar10", "train", data_root, 32, download=False)
    assert len(data) == 50_000
    assert data.classes == CIFAR10_CLASSES
    assert sorted(len(v) for v in data.labels_to_indices().values()) == [5_000] * 10
    x, _ = data[123]
    assert x.shape == (3, 32, 32) and x.min() >= 0 and x.max() <= 1


def test_cifar10_official_archive_is_pixel_exact(cifar10_root) -> None:
    root, images, labels = cifar10_root
    train = load_dataset("cifar10", "train", root, 32, download=False)
    assert len(train) == 20 and train.labels == labels and train.classes[0] == "airplane"
    for i in (0, 7, 19):
        expected = torch.from_numpy(images[i]).permute(2, 0, 1).float() / 255
        assert torch.equal(train[i][0], expected)
    assert len(load_dataset("cifar10", "test", root, 32, download=False)) == 3


def test_cifar10_extracted_folder_equals_archive(cifar10_root, tmp_path: Path) -> None:
    root, _, _ = cifar10_root
    with tarfile.open(root / "cifar10" / "cifar-10-python.tar.gz") as tar:
        tar.extractall(tmp_path / "cifar10", filter="data")
    a = load_dataset("cifar10", "train", root, 16, download=False)
    b = load_dataset("cifar10", "train", tmp_path, 16, download=False)
    assert a.labels == b.labels and torch.equal(a[5][0], b[5][0]) and a[5][0].shape == (3, 16, 16)


@pytest.mark.parametrize("split,count", [("train", 60), ("val", 20), ("test", 20)])
def test_fc100_splits_by_superclass(
    cifar100_root: Path, data_root: Path, split: str, count: int
) -> None:
    expected = json.loads((data_root / "cifar100" / "fc100_split.json").read_text())[split]
    data = load_dataset("fc100", split, cifar100_root, 32, download=False)
    assert len(data.classes) == count
    assert sorted(data.classes) == sorted(expected["fine_classes"])
    # All 600 images of a class in the real archive: here 2 train + 1 test each.
    assert [len(v) for v in data.labels_to_indices().values()] == [3] * count
    names = json.loads((data_root / "cifar100" / "cifar100_fine_to_coarse.json").read_text())
    for i in range(0, len(data), 7):
        x, label = data[i]
        fine = names["fine_label_names"].index(data.classes[label])
        assert round(float(x[0, 0, 0]) * 255) == fine  # the test wrote the fine label in red


def test_fc100_refuses_a_tampered_pickle(tmp_path: Path) -> None:
    (tmp_path / "cifar100" / "cifar-100-python").mkdir(parents=True)
    evil = pickle.dumps(os.system)  # a global that would run code
    for name in ("meta", "train", "test"):
        (tmp_path / "cifar100" / "cifar-100-python" / name).write_bytes(evil)
    with pytest.raises(EbmmError, match="refusing"):
        load_dataset("fc100", "train", tmp_path, 32, download=False)


def test_image_folder_with_class_subfolders(omniglot_dir: Path) -> None:
    data = load_dataset(str(omniglot_dir / "Latin"), size=None)
    assert data.classes == ["character01", "character02"] and len(data) == 40
    x, _ = data[0]
    assert x.shape == (1, 105, 105)  # native size when none is asked for


def test_image_folder_single_class(omniglot_dir: Path) -> None:
    data = load_dataset(str(omniglot_dir / "Latin" / "character01"), size=28)
    assert len(data) == 20 and len(data.classes) == 1 and data[3][0].shape == (1, 28, 28)


def test_binarized_omniglot_is_the_same_characters_thresholded(data_root: Path) -> None:
    """`--binarize`: Omniglot's 32x32 characters (grey at the strokes' edges after
    resizing) become 0/1 at 0.5, item by item, with the same labels and classes."""
    grey = load_dataset("omniglot", "test", data_root, 32, download=False)
    binary = load_dataset("omniglot", "test", data_root, 32, download=False, binarize=True)
    assert binary.labels == grey.labels and binary.classes == grey.classes
    for index in (0, 1000, len(grey) - 1):
        x, label = grey[index]
        b, same = binary[index]
        assert same == label and ((x > 0) & (x < 1)).any()
        assert torch.equal(b, (x > 0.5).float())


def test_image_folder_empty_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EbmmError, match="no images"):
        load_dataset(str(tmp_path), size=28)


def test_unknown_dataset_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EbmmError, match="neither a dataset"):
        load_dataset(str(tmp_path / "omniglott"))


def test_binary_strings_are_seeded_bits() -> None:
    a = BinaryStrings().sample(16, torch.Generator().manual_seed(1))
    b = BinaryStrings().sample(16, torch.Generator().manual_seed(1))
    assert a.shape == (16, 128) and torch.equal(a, b)
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert 0.4 < a.mean() < 0.6


def test_episodes_are_reproducible_and_class_distinct(background) -> None:
    first = [Episodes(background, 64, seed=3).sample() for _ in range(2)]
    assert torch.equal(first[0][0], first[1][0]) and torch.equal(first[0][1], first[1][1])
    images, labels = first[0]
    assert images.shape == (64, 1, 28, 28)
    assert len(set(labels.tolist())) == 64
    for image, label in zip(images[:3], labels[:3], strict=True):
        assert any(
            torch.equal(image, background[i][0]) for i in background.labels_to_indices()[int(label)]
        )
    other = Episodes(background, 64, seed=4).sample()
    assert not torch.equal(other[1], labels)


def test_episodes_do_not_depend_on_or_touch_global_random(background) -> None:
    random.seed(0)
    a = Episodes(background, 5, seed=7)
    a1 = a.sample()
    state = random.getstate()
    a2 = a.sample()
    assert random.getstate() == state
    random.seed(12345)
    b = Episodes(background, 5, seed=7)
    assert torch.equal(b.sample()[1], a1[1]) and torch.equal(b.sample()[1], a2[1])


def test_episodes_state_resumes_the_stream(background) -> None:
    a = Episodes(background, 5, seed=1)
    a.sample()
    saved = a.state()
    expected = a.sample()
    b = Episodes(background, 5, seed=99)
    b.load_state(saved)
    assert torch.equal(b.sample()[1], expected[1])


def test_episodes_with_shots_and_without_classes(background) -> None:
    images, labels = Episodes(background, 10, shots=2, seed=0).sample()
    counts = np.unique(labels.numpy(), return_counts=True)[1]
    assert len(counts) == 5 and set(counts) == {2}
    images, labels = Episodes(background, 8, shots=None, seed=0).sample()
    assert images.shape == (8, 1, 28, 28)


def test_episodes_refuse_more_classes_than_exist(omniglot_dir: Path) -> None:
    data = load_dataset(str(omniglot_dir / "Latin"), size=28)
    with pytest.raises(EbmmError, match="distinct classes"):
        Episodes(data, 5, seed=0)


def test_binary_episodes() -> None:
    patterns, labels = Episodes(BinaryStrings(), 32, seed=0).sample()
    assert patterns.shape == (32, 128) and labels.tolist() == list(range(32))
    assert torch.equal(patterns, Episodes(BinaryStrings(), 32, seed=0).sample()[0])


def test_zip_that_is_not_a_zip(tmp_path: Path) -> None:
    (tmp_path / "omniglot").mkdir()
    (tmp_path / "omniglot" / "images_background.zip").write_text("not a zip")
    with pytest.raises(EbmmError, match="not a readable zip"):
        omniglot(tmp_path, "train", download=False)
