"""Built-in trained models: listed by `ebmm models`, usable by name wherever
a model path is, small, in half precision, with their provenance; the demo uses one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ebmm_cli import builtin
from ebmm_cli.cli import _held_out, _unwritten
from ebmm_cli.store import load_model
from tests.conftest import run_ebmm

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"omniglot-28", "omniglot-32", "omniglot-32-conv", "omniglot-32-ebmm", "binary-128"}


def test_the_built_ins_ship_small_in_half_precision_with_provenance() -> None:
    listed = json.loads(run_ebmm("models", "--json").stdout)
    assert {m["name"] for m in listed} == SHIPPED
    # omniglot-32-conv's key head reads the whole image: 2.1 million slow weights
    assert sum(m["size_bytes"] for m in listed) <= 20 * 2**20
    for m in listed:
        assert m["command"].startswith("ebmm train ") and m["steps"] > 0 and m["minutes"] > 0
        assert m["commit"] and m["machine"] and m["memory_floats"] > 0
        held = m["heldout"]
        assert held["mse"] < held["query_mse"], m["name"]  # every one recalls something
        # Half precision costs nothing measurable: the float32 file's metrics, to 1%.
        assert held["mse"] == pytest.approx(m["heldout_float32"]["mse"], rel=0.01)
        path = builtin.FOLDER / f"{m['name']}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "I64"}  # noqa: SIM118
        model = load_model(path)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert model.config.rules.patterns is not None
        if m["refine"]:  # its write refines: the listing shows that write's metrics
            assert held["refined_hamming"] < held["hamming"] < held["query_hamming"]
        # the control beside it, and what a write costs
        assert held["unwritten_mse"] > 0 and held["unwritten_hamming"] > 0, m["name"]
        assert m["write"]["seconds"] > 0 and m["write"]["patterns"] > 0, m["name"]
    refines = {m["name"]: m["refine"] for m in listed}
    assert refines["omniglot-32"] == refines["omniglot-32-conv"] == 200
    conv = next(m for m in listed if m["name"] == "omniglot-32-conv")
    assert (conv["memory"], conv["memory_floats"]) == ("kv-conv", 4608)
    table = run_ebmm("models")
    assert table.returncode == 0 and all(name in table.stdout for name in SHIPPED)
    memory = next(m for m in listed if m["name"] == "omniglot-32")
    refining = memory["heldout"]
    cell = _held_out(refining)  # the table's cell, which the terminal wraps
    assert cell.startswith(f"Hamming {refining['refined_hamming']:.1f} (query")
    assert f"learned steps {refining['hamming']:.1f}" in cell
    assert _unwritten(refining) == f"Hamming {refining['unwritten_hamming']:.1f}"
    # the default model is a memory: with nothing written its read stays broken
    assert memory["name"] == builtin.DEFAULT and memory["read"] == "redraw"
    assert refining["unwritten_hamming"] > refining["refined_hamming"] + 15
    # the paper's mechanism: at most 5 learned write steps, no refinement, a read that
    # descends the energy, within the paper's 4,616 floats; its memory carries its recall
    descent = next(m for m in listed if m["name"] == "omniglot-32-ebmm")
    assert (descent["memory"], descent["read"], descent["refine"]) == ("kv", "gd", 0)
    assert descent["write_steps"] <= 5 and descent["memory_floats"] <= 4616
    assert descent["patterns"] == [16, 64]
    held = descent["heldout"]
    assert held["unwritten_hamming"] > held["hamming"] + 15
    assert held["by_n"]["16"]["hamming"] < held["by_n"]["16"]["query_hamming"] - 10


def test_a_built_in_name_works_where_a_model_path_does(
    omniglot_dir: Path, data_root: Path, tmp_path: Path
) -> None:
    chars = omniglot_dir / "Latin" / "character01"
    five = [str(p) for p in sorted(chars.glob("*.png"))[:5]]
    memory = tmp_path / "m.safetensors"
    wrote = run_ebmm("write", *five, "--refine", "0", "-o", str(memory))  # the default model
    assert wrote.returncode == 0, wrote.stderr
    assert "using the built-in omniglot-32" in wrote.stderr
    queries = tmp_path / "q"
    distorted = run_ebmm("distort", "--model", "omniglot-32", *five, "-o", str(queries))
    assert distorted.returncode == 0, distorted.stderr
    read = run_ebmm("read", str(queries), "--memory", str(memory), "-o", str(tmp_path / "r"))
    assert read.returncode == 0, read.stderr
    named = run_ebmm("write", *five, "--model", "omniglot-32", "--refine", "0",
                     "-o", str(tmp_path / "n.st"))  # fmt: skip
    assert named.returncode == 0 and "using the built-in" not in named.stderr
    assert (tmp_path / "n.st").read_bytes() == memory.read_bytes()
    compared = run_ebmm("compare", "--model", "omniglot-28", "--data-root", str(data_root),
                        "--episodes", "2", "--baselines", "identity", "--json")  # fmt: skip
    assert compared.returncode == 0, compared.stderr
    unknown = run_ebmm("write", *five, "--model", "omniglot-99", "-o", str(tmp_path / "x"))
    assert unknown.returncode == 2
    (line,) = unknown.stderr.strip().splitlines()
    assert "omniglot-99" in line and all(name in line for name in SHIPPED)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model", [None, "omniglot-32-conv", "omniglot-28"], ids=["default", "conv", "omniglot-28"]
)
def test_the_demo_shows_recall_with_the_built_in_model(
    model: str | None, data_root: Path, tmp_path: Path
) -> None:
    """`make demo` (omniglot-32 by default) restores what its 64 queries hide, and the
    unwritten memory's read beside it shows that the memory does it: nothing written,
    the read stays near the query; so does omniglot-32-conv. With omniglot-28 the demo
    shows a denoiser: the unwritten read repairs nearly as much (README, "Built-in
    models")."""
    chosen = [] if model is None else ["--model", model]
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "demo.py"),
            "--data-root",
            str(data_root),
            "--out",
            str(tmp_path / "demo"),
            *chosen,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,  # the refining write: 20-40 s per episode on one loaded CPU thread
    )
    assert result.returncode == 0, result.stderr
    ratio = float(re.search(r"retrieved MSE / query MSE = ([0-9.]+)", result.stdout)[1])
    assert ratio <= 0.5, result.stdout
    ssim = re.search(r"SSIM to original\D+1\D+([0-9.]+)\D+([0-9.]+)", result.stdout)
    assert float(ssim[2]) > float(ssim[1]), result.stdout  # retrieved above the query
    blank = float(re.search(r"nothing written: ([0-9.]+) of the query", result.stdout)[1])
    other = float(re.search(r"other characters' memory = ([0-9.]+)", result.stdout)[1])
    if model != "omniglot-28":  # the memory recalls: the unwritten read stays near the query
        assert ratio <= 0.35 and blank > 0.6, result.stdout
        assert other <= 0.6, result.stdout  # and another memory's read stays broken
        hamming = re.search(r"Hamming error\D+0\D+([0-9.]+)\D+([0-9.]+)", result.stdout)
        assert float(hamming[2]) < float(hamming[1]) / 2, result.stdout
    else:  # a denoiser: the unwritten read repairs as much, within 0.02 (README)
        assert abs(blank - ratio) < 0.02, result.stdout
    assert (tmp_path / "demo" / "grid.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "protocol"),
    [
        ("omniglot-28", ["--batch-size", "5"]),
        ("omniglot-32", ["--batch-size", "64"]),
        ("omniglot-32-conv", ["--batch-size", "64"]),
        ("omniglot-32-ebmm", ["--batch-size", "16"]),  # at 64 it reads near the query
        ("binary-128", ["--dataset", "binary", "--batch-size", "32"]),
    ],
)
def test_every_built_in_recalls_better_than_the_query(
    name: str, protocol: list[str], data_root: Path
) -> None:
    """On real evaluation characters (binary: fresh random strings), through the CLI.
    The omniglot-32 writes refine (200 Adam steps per episode: 2.4 minutes for the three
    beside two trainings on the 2-core machine), hence the longer limit."""
    result = run_ebmm("compare", "--model", name, "--data-root", str(data_root), "--episodes",
                      "3", "--baselines", "identity", "--json", *protocol,
                      timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {r["method"]: r for r in json.loads(result.stdout)["rows"]}
    model, query = rows[f"ebmm:{name}"], rows["identity"]  # labelled by its name
    assert model["sq_error"]["mean"] < query["sq_error"]["mean"]
