"""Shared fixtures: the real data root, real Omniglot PNGs, official-format CIFAR archives.

The data root is `$EBMM_DATA` (the Makefile sets it) or `../shared/data`; tests that use
it fail, rather than skip, when it is missing: they are the proof that the loaders read
the real files.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import tarfile
import traceback
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import ebmm_cli  # noqa: F401  before any test module loads torch: threads sleep, not spin

REPO = Path(__file__).resolve().parents[1]
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


@pytest.fixture(scope="session")
def data_root() -> Path:
    # absolute: tests change folders and link to its files
    root = Path(os.environ.get("EBMM_DATA") or REPO.parent / "shared" / "data").resolve()
    assert (root / "omniglot" / "images_background.zip").is_file(), f"no Omniglot under {root}"
    return root


@pytest.fixture(scope="session")
def omniglot_dir(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Omniglot PNGs, extracted in the official tree: 3 characters of 2 alphabets,
    20 drawings each, under `<root>/omniglot/images_background/` (so `<root>` is a data root).
    """
    out = tmp_path_factory.mktemp("omniglotroot") / "omniglot"
    wanted = (
        "images_background/Latin/character01/",
        "images_background/Latin/character02/",
        "images_background/Greek/character03/",
    )
    with zipfile.ZipFile(data_root / "omniglot" / "images_background.zip") as z:
        for name in z.namelist():
            if name.startswith(wanted) and name.endswith(".png"):
                z.extract(name, out)
    return out / "images_background"


def _pickle_bytes_keys(obj: dict) -> bytes:
    """Pickle a dict with bytes keys and values, as the official (Python 2) batches load."""

    def enc(v: object) -> object:
        if isinstance(v, str):
            return v.encode()
        if isinstance(v, list):
            return [enc(x) for x in v]
        return v

    return pickle.dumps({k.encode(): enc(v) for k, v in obj.items()}, protocol=2)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _batch(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) uint8 -> the official (N, 3072) row-major R, G, B planes."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, list[int]]:
    """A tiny `cifar10/cifar-10-python.tar.gz` in the official format: 5 train batches of 4
    images, a test batch of 3. Returns (root, all train images, their labels)."""
    root = tmp_path_factory.mktemp("cifar10root")
    (root / "cifar10").mkdir()
    rng = np.random.default_rng(0)
    names = CIFAR10_CLASSES
    images = rng.integers(0, 256, (23, 32, 32, 3), dtype=np.uint8)
    labels = [i % 10 for i in range(23)]
    with tarfile.open(root / "cifar10" / "cifar-10-python.tar.gz", "w:gz") as tar:
        for i in range(5):
            part = slice(4 * i, 4 * i + 4)
            _add(
                tar,
                f"cifar-10-batches-py/data_batch_{i + 1}",
                _pickle_bytes_keys(
                    {
                        "batch_label": f"training batch {i + 1} of 5",
                        "labels": labels[part],
                        "data": _batch(images[part]),
                        "filenames": [f"f{j}.png" for j in range(4)],
                    }
                ),
            )
        _add(
            tar,
            "cifar-10-batches-py/test_batch",
            _pickle_bytes_keys(
                {
                    "batch_label": "testing batch 1 of 1",
                    "labels": labels[20:],
                    "data": _batch(images[20:]),
                    "filenames": ["a", "b", "c"],
                }
            ),
        )
        _add(
            tar,
            "cifar-10-batches-py/batches.meta",
            _pickle_bytes_keys({"num_cases_per_batch": 4, "label_names": names, "num_vis": 3072}),
        )
    return root, images[:20], labels[:20]


@pytest.fixture(scope="session")
def cifar100_root(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small `cifar100/cifar-100-python.tar.gz` in the official format, with all 100 fine
    classes (real names and superclasses from ../shared/data): 2 train and 1 test image
    each. Pixel values encode (fine label, index) so tests can check what came back."""
    table = json.loads((data_root / "cifar100" / "cifar100_fine_to_coarse.json").read_text())
    fine_to_coarse = table["fine_to_coarse_index"]
    root = tmp_path_factory.mktemp("cifar100root")
    (root / "cifar100").mkdir()

    def batch(per_class: int, tag: int) -> dict:
        fine = [c for c in range(100) for _ in range(per_class)]
        images = np.zeros((len(fine), 32, 32, 3), np.uint8)
        images[..., 0] = np.array(fine, np.uint8)[:, None, None]
        images[..., 1] = tag
        return {
            "filenames": [f"{i}.png" for i in range(len(fine))],
            "batch_label": "b",
            "fine_labels": fine,
            "coarse_labels": [fine_to_coarse[c] for c in fine],
            "data": _batch(images),
        }

    with tarfile.open(root / "cifar100" / "cifar-100-python.tar.gz", "w:gz") as tar:
        _add(tar, "cifar-100-python/train", _pickle_bytes_keys(batch(2, 1)))
        _add(tar, "cifar-100-python/test", _pickle_bytes_keys(batch(1, 2)))
        _add(
            tar,
            "cifar-100-python/meta",
            _pickle_bytes_keys(
                {
                    "fine_label_names": table["fine_label_names"],
                    "coarse_label_names": table["coarse_label_names"],
                }
            ),
        )
    return root


def run_ebmm(
    *args: str,
    stdin: str | None = None,
    cwd: Path | None = None,
    env: dict | None = None,
    timeout: float = 300,
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    """Run the CLI as a user's shell would, and return its exit code, stdout and stderr.

    By default in this process, through typer's runner on `ebmm_cli.cli.app` (the app that
    `python -m ebmm_cli` runs), with `stdin` as standard input, `cwd` as the working folder
    and `env`, when given, as the whole environment: a fresh Python importing torch costs
    seconds per call, most of `make test`'s time. `fresh=True` runs `python -m ebmm_cli` in
    a subprocess instead (with `timeout`), for tests where the process is the point: what
    `main` adds (the SIGTERM handler, undecodable names on stdout), what an import does,
    environment read when the interpreter starts."""
    if fresh:
        return subprocess.run(
            [sys.executable, "-m", "ebmm_cli", *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=timeout,
        )
    from ebmm_cli.cli import app

    with _working_folder(cwd), _environment(env):
        result = _RUNNER.invoke(app, list(args), input=stdin)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # escaped `main` (a subprocess would print it and exit 1): show where
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["ebmm", *args], result.exit_code, result.stdout, stderr)


_RUNNER = CliRunner()


@contextlib.contextmanager
def _working_folder(cwd: Path | None) -> Iterator[None]:
    """`cwd` as the working folder for the block, then back."""
    if cwd is None:
        yield
        return
    before = os.getcwd()
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _environment(env: dict | None) -> Iterator[None]:
    """`env` as the whole of `os.environ` for the block (as `subprocess.run(env=...)`
    gives a child), then the environment as it was."""
    if env is None:
        yield
        return
    before = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


def start_ebmm(*args: str) -> subprocess.Popen:
    """The real CLI in a process of its own, running while the test acts on it (signals,
    races): `python -m ebmm_cli ARGS` with its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "ebmm_cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def tiny_binary(episodes: int, **options: object) -> tuple[Any, Any, Any, Any]:
    """A small untrained binary `rnn` (6 patterns of 128 bits per episode, T = K = 2,
    8 written units, seeded) and `episodes` episodes for it: (model, its TrainConfig,
    patterns (E, 6, 128), their queries (E, 6, 128)). `options` go to `train_config`."""
    import torch

    from ebmm_cli.model import Model
    from ebmm_cli.runconfig import train_config

    config = train_config(dataset="binary", batch_size=6, steps=1, write_steps=2, read_steps=2,
                          dynamic=8, device="cpu", **options)  # fmt: skip
    torch.manual_seed(0)
    model = Model(config.model)
    patterns = (torch.rand(episodes, 6, 128) > 0.5).float()
    queries = model.distortion(patterns.flatten(0, 1), torch.Generator().manual_seed(1))
    return model, config, patterns, queries.view_as(patterns)


def limit_file_size() -> None:
    """`preexec_fn` for a child process: no file may grow past 100 bytes, and writing
    past it fails with EFBIG instead of a kill. A full disk, as far as writes can tell."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))


def mixed_folder(omniglot_dir: Path, tmp_path: Path) -> Path:
    """`tmp_path/mixed`: three real characters (a, c, e) and two bad files sorted in
    between them (b_text.png: text; d_zero.png: 0 bytes)."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    good = sorted((omniglot_dir / "Latin" / "character01").glob("*.png"))[:3]
    for name, src in zip(("a.png", "c.png", "e.png"), good, strict=True):
        (mixed / name).write_bytes(src.read_bytes())
    (mixed / "b_text.png").write_text("not an image")
    (mixed / "d_zero.png").write_bytes(b"")
    return mixed
