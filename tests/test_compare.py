"""The comparison harness and `ebmm compare` on real data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ebmm_cli.baselines import Identity, make
from ebmm_cli.cli import app
from ebmm_cli.compare import METRICS, CompareConfig, make_episodes, plot, run

runner = CliRunner()


@dataclass
class Recording:
    """A real method (the identity) that also keeps every query it was asked to read."""

    name: str
    seen: list[torch.Tensor] = field(default_factory=list)

    def memory_floats(self, n: int, d: int) -> int:
        return 0

    def write(self, patterns: torch.Tensor) -> None:
        return None

    def read(self, memory: None, queries: torch.Tensor) -> torch.Tensor:
        self.seen.append(queries.clone())
        return queries.clone()


def test_every_method_sees_identical_queries() -> None:
    config = CompareConfig(
        dataset="binary", patterns=(16, 32), distortion="eraseblock:64", episodes=3
    )
    a, b = Recording("a"), Recording("b")
    rows = run([a, make("hopfield-pinv"), b], make_episodes(config))
    assert len(a.seen) == 6 and all(torch.equal(x, y) for x, y in zip(a.seen, b.seen, strict=True))
    again = make_episodes(config)
    assert torch.equal(again[32][2].queries, a.seen[5])
    assert [r["method"] for r in rows] == ["a", "hopfield-pinv", "b"] * 2
    # per-episode values come in episode order, so two methods' values pair up
    erased = [
        float(((e.queries > 0.5) != (e.patterns > 0.5)).sum(1).double().mean()) for e in again[32]
    ]
    assert rows[3]["hamming"]["episodes"] == pytest.approx(erased)
    assert rows[5]["hamming"]["episodes"] == rows[3]["hamming"]["episodes"]


def test_identity_error_is_the_queries_error() -> None:
    config = CompareConfig(dataset="binary", patterns=(20,), distortion="flip:10", episodes=4)
    episodes = make_episodes(config)
    (row,) = run([Identity()], episodes)
    assert row["hamming"]["mean"] == pytest.approx(10.0)
    assert row["hamming"]["episodes"] == pytest.approx([10.0] * 4)
    assert row["sq_error"]["mean"] == pytest.approx(10.0)
    assert row["memory_floats"] == 0 and row["ssim"] is None


def test_compare_json_is_complete(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "compare",
            "--dataset",
            "binary",
            "--patterns",
            "16,32",
            "--distortion",
            "erase:64",
            "--baselines",
            "identity,hopfield-hebb,hopfield-storkey,hopfield-pinv,modern-hopfield,nearest",
            "--episodes",
            "3",
            "--json",
            "--markdown",
            str(tmp_path / "t.md"),
            "--plot",
            str(tmp_path / "p.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["config"]["patterns"] == [16, 32] and doc["config"]["distortion"] == "erase:64"
    assert len(doc["rows"]) == 12
    for row in doc["rows"]:
        assert {"method", "patterns", "memory_floats", *METRICS} <= set(row)
        for metric in METRICS:
            if metric == "ssim":
                assert row[metric] is None
            else:
                assert set(row[metric]) == {"mean", "se", "p5", "p95", "episodes"}
                assert row[metric]["p5"] <= row[metric]["p95"]
                values = row[metric]["episodes"]
                assert len(values) == 3
                mean = sum(values) / 3
                assert row[metric]["mean"] == pytest.approx(mean)
                spread = sum((v - mean) ** 2 for v in values) / 2  # the sample variance
                assert row[metric]["se"] == pytest.approx((spread / 3) ** 0.5, abs=1e-12)
    pinv16 = next(r for r in doc["rows"] if r["method"] == "hopfield-pinv" and r["patterns"] == 16)
    assert pinv16["memory_floats"] == 8_256 and pinv16["hamming"]["mean"] == 0
    assert (tmp_path / "t.md").read_text().count("\n") == 14
    assert Image.open(tmp_path / "p.png").size[0] > 100


def test_plot_takes_means_outside_their_percentile_interval(tmp_path: Path) -> None:
    # 50 equal errors: the float mean can exceed p95 by an ulp (this once broke the plot);
    # a skewed metric (96% zeros) has its mean above p95 for real.
    equal = {"mean": 2.7000000000000006, "p5": 2.7, "p95": 2.7}
    skewed = {"mean": 1.5, "p5": 0.0, "p95": 0.0}
    rows = [
        {"method": "a", "patterns": n, "memory_floats": 10, "hamming": m}
        for n, m in ((16, equal), (32, skewed))
    ]
    plot(rows, tmp_path / "p.png", "hamming")
    assert Image.open(tmp_path / "p.png").size[0] > 100


@pytest.mark.slow
def test_compare_model_and_baselines_on_omniglot(data_root: Path, tmp_path: Path) -> None:
    trained = runner.invoke(
        app,
        [
            "train",
            "--data-root",
            str(data_root),
            "--out",
            str(tmp_path / "run"),
            "--image-size",
            "32",
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--eval-episodes",
            "1",
            "--write-steps",
            "1",
            "--read-steps",
            "1",
            "--device",
            "cpu",
        ],
    )
    assert trained.exit_code == 0, trained.output
    model = tmp_path / "run" / "model.safetensors"
    args = [
        "compare",
        "--model",
        str(model),
        "--data-root",
        str(data_root),
        "--batch-size",
        "8",
        "--episodes",
        "2",
        "--baselines",
        "identity,nearest,hopfield-pinv",
        "--grid",
        str(tmp_path / "g.png"),
        "--json",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["method"] for r in rows] == [
        "identity", "nearest", "hopfield-pinv", "ebmm:run", "ebmm:run unwritten"
    ]  # fmt: skip
    assert rows[3]["memory_floats"] == 4_616 and rows[1]["memory_floats"] == 8 * 1024
    assert rows[0]["ssim"]["mean"] < 1
    assert rows[1]["sq_error"]["mean"] < rows[0]["sq_error"]["mean"]  # nearest beats the query
    # rows: original, query, then the 5 methods; 32 px tiles magnified 3x
    assert Image.open(tmp_path / "g.png").size == ((8 * 34 + 2) * 3, (7 * 34 + 2) * 3)

    wrong = runner.invoke(app, [*args[:-2], "--image-size", "28", "--force"])  # g.png exists
    assert wrong.exit_code == 2 and "was trained on patterns of shape" in wrong.stderr

    # A run's model goes by its folder, any other file by its own name (not the folder's:
    # `exports/best.safetensors` is `best`); clashing labels by folder and file name, the
    # same file given twice by its place
    other = tmp_path / "run" / "other.safetensors"
    other.write_bytes(model.read_bytes())
    (tmp_path / "exports").mkdir()
    best = tmp_path / "exports" / "best.safetensors"
    best.write_bytes(model.read_bytes())
    both = [*args[:3], "--model", str(other), "--model", str(model), "--model", str(best)]
    both += args[3:]
    both[both.index("identity,nearest,hopfield-pinv")] = "identity"
    result = runner.invoke(
        app, [*both[: both.index("--grid")], "--json", "--device", "cpu", "--no-unwritten"]
    )
    assert result.exit_code == 0, result.output
    labels = [r["method"] for r in json.loads(result.stdout)["rows"]]
    assert labels == [
        "identity", "ebmm:run/model #1", "ebmm:other", "ebmm:run/model #2", "ebmm:best",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "args,named",
    [
        (["--baselines", "identity,lstm"], "--baselines"),
        (["--patterns", "16,x"], "--patterns"),
        (["--distortion", "blur:3"], "--distortion"),
    ],
)
def test_bad_compare_options(args: list[str], named: str) -> None:
    result = runner.invoke(app, ["compare", "--dataset", "binary", *args])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and named in result.stderr


def test_more_patterns_than_the_data_supplies(omniglot_dir: Path) -> None:
    result = runner.invoke(
        app,
        [
            "compare",
            "--dataset",
            str(omniglot_dir / "Latin"),
            "--split",
            "train",
            "--patterns",
            "5",
            "--image-size",
            "28",
        ],
    )
    assert result.exit_code == 2
    assert "--patterns" in result.stderr and "distinct classes" in result.stderr


def test_compare_takes_the_datasets_default_corruption() -> None:
    result = runner.invoke(
        app,
        ["compare", "--dataset", "binary", "--patterns", "16", "--episodes", "2",
         "--baselines", "identity", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["config"]["distortion"] == "eraseblock:64"
    assert doc["rows"][0]["hamming"]["mean"] == pytest.approx(32, abs=8)  # half of 64 erased
    wrong = runner.invoke(app, ["compare", "--dataset", "binary", "--distortion", "occlude:16"])
    assert wrong.exit_code == 2 and wrong.stderr.startswith("ebmm compare: --distortion: ")
    assert len(wrong.stderr.strip().splitlines()) == 1
