"""The reproduction script end to end: real training, real `ebmm compare`, resumable."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ebmm_cli.store import load_model

ROOT = Path(__file__).resolve().parents[1]


def reproduce(out: Path, *args: str) -> dict:
    command = [sys.executable, str(ROOT / "examples" / "reproduce.py"), "binary", "--out", str(out)]
    subprocess.run(
        [*command, "--runs", "rnn-64", "--episodes", "2", "--device", "cpu", *args],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_binary_reproduction_trains_compares_and_resumes(tmp_path: Path) -> None:
    summary = reproduce(tmp_path, "--minutes", "0.02")
    (trained,) = summary["training"]
    assert trained["name"] == "rnn-64" and trained["last"]["step"] >= 1
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    ours = [r for r in rows if r["method"] == "ebmm:rnn-64"]
    assert [r["patterns"] for r in ours] == [16, 32, 48, 64, 96]
    assert {r["memory_floats"] for r in ours} == {8_256}
    methods = {r["method"] for r in rows}
    assert {"identity", "hopfield-pinv", "hopfield-storkey", "modern-hopfield"} <= methods
    table = (tmp_path / "compare.md").read_text()  # each N: the model and its unwritten control
    assert table.count("ebmm:rnn-64") == 10 and table.count("ebmm:rnn-64 unwritten") == 5
    assert (tmp_path / "compare.png").stat().st_size > 1000
    # the paired difference from the pseudo-inverse net, on the same two episodes
    pinv = {r["patterns"]: r["hamming"] for r in rows if r["method"] == "hopfield-pinv"}
    assert [p["patterns"] for p in summary["paired"]] == [16, 32, 48, 64, 96]
    for p, row in zip(summary["paired"], ours, strict=True):
        difference = row["hamming"]["mean"] - pinv[p["patterns"]]["mean"]
        assert p["mean_difference"] == pytest.approx(difference)
        low, high = p["bootstrap_95"]
        assert low - 1e-9 <= p["mean_difference"] <= high + 1e-9
        assert p["model_better"] + p["baseline_better"] <= 2

    # A second call resumes the finished run from its checkpoint instead of restarting it.
    again = reproduce(tmp_path, "--minutes", "0.02")
    assert again["training"][0]["last"]["step"] == trained["last"]["step"]
    only = reproduce(tmp_path, "--compare-only")
    assert "training" not in only


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sent", "kills", "steps", "seed"),
    # about four steps pass between kills on CI: enough steps that the last kill lands
    # before the run ends (at 16 steps, SIGTERM's fifth once came too late)
    [("KILL", 2, 12, 0), ("TERM", 5, 30, 3), ("INT", 3, 20, 3)],
)
def test_a_run_stopped_at_random_moments_ends_as_if_never_stopped(
    sent: str, kills: int, steps: int, seed: int, tmp_path: Path
) -> None:
    """`examples/kill_resume.py` stops a run at random moments and resumes it: SIGKILL
    (no chance to clean up: the last checkpoint), SIGTERM (what `timeout` and schedulers
    send: a checkpoint after the step in flight, exit 143) and Ctrl-C's SIGINT (the same,
    exit 130; a checkpoint taken inside the step used not to resume exactly). Each time
    the resumed run ends as an uninterrupted one: bit-identical in nearly every try, and
    never further than MKL's last bits (`store.model_parting`)."""
    script = ROOT / "examples" / "kill_resume.py"
    result = subprocess.run(
        [sys.executable, str(script), "--kills", str(kills), "--steps", str(steps),
         "--signal", sent, "--seed", str(seed), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert len(report["killed_after_checkpoint_steps"]) == kills  # real signals landed
    assert report["same_metrics"] and report["same_model"]
    assert report["temporary_files_left"] == []


@pytest.mark.slow
def test_the_benchmark_in_ci_size_measures_every_part(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    script = ROOT / "examples" / "bench.py"
    subprocess.run(
        [sys.executable, str(script), "--quick", "--data-root", str(data_root), "--json", str(out)],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["protocol"] == "report" and row["images"] == 5 and row["device"] == "cpu"
    for key in ("second_s_per_step", "first_s_per_step", "write_ms", "read_ms", "write_read_ms",
                "peak_mib"):  # fmt: skip
        assert row[key] > 0, key
    assert row["second_images_per_s"] == pytest.approx(5 / row["second_s_per_step"])
    assert set(result["startup"]) == {"help_s", "distort_s"}
    assert "CPUs" in result["machine"]


def builtin_models(*args: str) -> subprocess.CompletedProcess:
    script = ROOT / "examples" / "builtin_models.py"
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, cwd=ROOT
    )


@pytest.mark.slow
def test_a_recipe_run_exports_as_a_builtin_and_another_run_is_refused(tmp_path: Path) -> None:
    """What ships a built-in: the recipe's run, exported in float16 with its provenance
    (the step from the model file, the command with its budget); a run trained otherwise
    is refused, and nothing is written."""
    run, folder = tmp_path / "run", tmp_path / "models"
    trained = builtin_models("train", "binary-128", "--steps", "2", "--out", str(run))
    assert trained.returncode == 0, trained.stderr
    exported = builtin_models("export", "binary-128", "--run", str(run), "--to", str(folder),
                              "--episodes", "1", "--machine", "test")  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    with safe_open(str(folder / "binary-128.safetensors"), "pt") as f:
        header = f.metadata()
    tensors = load_file(folder / "binary-128.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    provenance = json.loads(header["provenance"])
    assert provenance["steps"] == 2 and provenance["machine"] == "test"
    assert provenance["command"].endswith("--contrast 0.1 --steps 2")
    assert provenance["heldout"]["episodes"] == 1
    assert provenance["heldout"]["hamming"] < provenance["heldout"]["query_hamming"] * 2
    model = load_model(folder / "binary-128.safetensors")
    assert model.config.rules.patterns == (8, 96)

    other = tmp_path / "other"
    subprocess.run([sys.executable, "-m", "ebmm_cli", "train", "--out", str(other), "--dataset",
                    "binary", "--memory", "rnn", "--batch-size", "8", "--steps", "1"],
                   check=True, capture_output=True, cwd=ROOT)  # fmt: skip
    refused = builtin_models("export", "binary-128", "--run", str(other), "--to",
                             str(tmp_path / "none"))  # fmt: skip
    assert refused.returncode != 0 and "was not trained by the binary-128 recipe" in refused.stderr
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "memory"), [("omniglot-32", "kv"), ("omniglot-32-conv", "kv-conv")]
)
def test_the_omniglot_32_recipes_run_as_written_and_export(
    name: str, memory: str, data_root: Path, tmp_path: Path
) -> None:
    """The paper-protocol recipes (kv, or kv-conv: its written layer a 3x3 convolution;
    binarized, BCE, one re-keying, a refining write) are commands `ebmm train` accepts as
    written, switches spelled as switches, and their runs export as the recipe's: the
    model is the memory the recipe names, at 4,608 written floats, whose own write
    refines its memory."""
    run, folder = tmp_path / "run", tmp_path / "models"
    trained = builtin_models("train", name, "--steps", "1", "--out", str(run),
                             "--data-root", str(data_root))  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    exported = builtin_models("export", name, "--run", str(run), "--to", str(folder),
                              "--episodes", "1", "--machine", "test",
                              "--data-root", str(data_root))  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    with safe_open(str(folder / f"{name}.safetensors"), "pt") as f:
        provenance = json.loads(f.metadata()["provenance"])
    assert " --binarize --loss bce " in provenance["command"]
    assert "True" not in provenance["command"]
    assert provenance["memory_floats"] == 4608
    model = load_model(folder / f"{name}.safetensors")
    assert model.config.energy.kind == memory and model.config.rules.rekeys == 1
    # its write refines (200 Adam steps at 0.05), and the held-out metrics measure that
    # write beside the learned steps (after one training step it reads worse, not better)
    assert (model.config.rules.refine, model.config.rules.refine_lr) == (200, 0.05)
    assert " --write-refine 200 --set write_refine_lr=0.05" in provenance["command"]
    held = provenance["heldout"]
    assert math.isfinite(held["refined_hamming"]) and held["refined_hamming"] != held["hamming"]
    assert model.config.binarize and model.config.rules.patterns == (64, 64)


@pytest.mark.slow
def test_the_default_model_recalls_through_the_cli(data_root: Path, tmp_path: Path) -> None:
    """`examples/recall.py`: `ebmm distort --model`, `ebmm write` (no --model: the default)
    and `ebmm read` as a user runs them, on 16 evaluation characters. Their own memory
    restores their queries to at most 0.6 of the error that a memory of 16 other
    characters leaves, and better than the query itself: the memory carries the recall."""
    out = tmp_path / "recall"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "recall.py"), "--data-root", str(data_root),
         "--out", str(out), "-n", "16"],
        check=True, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    found = json.loads((out / "recall.json").read_text())
    rows = found["rows"]
    assert found["model"] == "omniglot-32" and found["n"] == 16
    assert found["ratio"] <= 0.6, rows
    assert rows["own memory"]["hamming"] < rows["query"]["hamming"] / 2, rows
