"""`ebmm distort --model`: queries as a model was trained on them, from a user's files.

Why a test of its own: a block of 0 in a file's values is ink on Omniglot's dark-on-light
PNGs, the opposite of the paper's blank, so only distortion in the model's own space (its
size, polarity and thresholding) gives the queries its read expects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ebmm_cli.cli import app
from ebmm_cli.imageio import collect_images, load_batch

runner = CliRunner()


def _chars(omniglot_dir: Path) -> list[Path]:
    return sorted((omniglot_dir / "Latin" / "character01").glob("*.png"))[:4]


def test_distort_as_the_paper_model_was_trained(omniglot_dir: Path, tmp_path: Path) -> None:
    """omniglot-32: 32x32, thresholded, a 16x16 block blanked; light background kept, so
    `ebmm read` maps the file back to exactly that query."""
    chars = _chars(omniglot_dir)
    out = tmp_path / "q"
    result = runner.invoke(app, ["distort", "--model", "omniglot-32", *map(str, chars),
                                 "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    queries = sorted(out.glob("*.png"))
    assert len(queries) == len(chars)
    originals = load_batch(collect_images(list(map(str, chars)), None), 1, 32, True,
                           binarize=True).images  # fmt: skip
    for query, original in zip(queries, originals, strict=True):
        pixels = np.asarray(Image.open(query).convert("L"))
        assert pixels.shape == (32, 32)
        assert set(np.unique(pixels)) <= {0, 255}  # thresholded as trained
        ink = pixels < 128  # the file's own polarity: dark strokes on light
        assert ink.mean() < 0.5
        was = original[0].numpy() > 0.5
        assert not (ink & ~was).any()  # the block only removes ink, never paints it
        lost = was & ~ink
        if lost.any():  # what was removed lies within one 16x16 block
            rows, cols = np.nonzero(lost)
            assert rows.max() - rows.min() < 16 and cols.max() - cols.min() < 16


def test_distort_as_the_report_model_was_trained(omniglot_dir: Path, tmp_path: Path) -> None:
    """omniglot-28: 28x28, grey (not thresholded), a 7x7 noise block; reproducible."""
    chars = list(map(str, _chars(omniglot_dir)))
    for out in (tmp_path / "a", tmp_path / "b"):
        result = runner.invoke(app, ["distort", "--model", "omniglot-28", *chars, "-o", str(out)])
        assert result.exit_code == 0, result.output
    first = sorted((tmp_path / "a").glob("*.png"))
    assert [p.read_bytes() for p in first] == [
        p.read_bytes() for p in sorted((tmp_path / "b").glob("*.png"))
    ]
    assert Image.open(first[0]).size == (28, 28)


@pytest.mark.parametrize("option", [["--block", "8"], ["--size", "28"], ["--kind", "flip"]])
def test_distort_model_refuses_options_it_sets(
    option: list[str], omniglot_dir: Path, tmp_path: Path
) -> None:
    chars = list(map(str, _chars(omniglot_dir)))
    out = tmp_path / "q"
    result = runner.invoke(app, ["distort", "--model", "omniglot-32", *option, *chars,
                                 "-o", str(out)])  # fmt: skip
    assert result.exit_code == 2
    assert option[0] in result.output and "--model" in result.output
    assert not out.exists()


def test_distort_model_refuses_a_model_of_bit_strings(omniglot_dir: Path, tmp_path: Path) -> None:
    chars = list(map(str, _chars(omniglot_dir)))
    result = runner.invoke(app, ["distort", "--model", "binary-128", *chars,
                                 "-o", str(tmp_path / "q")])  # fmt: skip
    assert result.exit_code == 2 and "binary-128" in result.output


def test_compare_shows_the_unwritten_control_by_default(data_root: Path) -> None:
    """Every model's unwritten row comes without asking; `--no-unwritten` drops it."""
    common = ["compare", "--model", "omniglot-28", "--data-root", str(data_root), "--episodes",
              "1", "--patterns", "2", "--baselines", "identity", "--json"]  # fmt: skip
    rows = [r["method"] for r in json.loads(runner.invoke(app, common).stdout)["rows"]]
    assert rows == ["identity", "ebmm:omniglot-28", "ebmm:omniglot-28 unwritten"]
    rows = [r["method"] for r in json.loads(runner.invoke(app, [*common, "--no-unwritten"])
                                            .stdout)["rows"]]  # fmt: skip
    assert rows == ["identity", "ebmm:omniglot-28"]
