"""End to end through the real CLI on real Omniglot: train, write, distort, read, energy."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ebmm_cli import builtin
from ebmm_cli.cli import app
from ebmm_cli.data.images import ImageFiles
from ebmm_cli.imageio import load_image
from ebmm_cli.memory import RuleConfig
from ebmm_cli.meta import Trainer, metrics_parting, read_metrics
from ebmm_cli.model import retrieve, write_memory
from ebmm_cli.recipes import RECIPES
from ebmm_cli.runconfig import TrainConfig, model_config, train_config
from ebmm_cli.store import load_checkpoint, load_memory, load_model, model_parting, save_model
from tests.conftest import limit_file_size, mixed_folder, run_ebmm

runner = CliRunner()

TINY = [
    "--batch-size",
    "3",
    "--write-steps",
    "2",
    "--read-steps",
    "2",
    "--eval-every",
    "2",
    "--eval-episodes",
    "1",
    "--device",
    "cpu",
]


def _train(data_root: Path, out: Path, *extra: str) -> None:
    result = runner.invoke(
        app, ["train", "--data-root", str(data_root), "--out", str(out), *TINY, *extra]
    )
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def run_dir(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    _train(data_root, out, "--steps", "2", "--loss", "ssim+mse")
    return out


def test_train_writes_its_run_folder(run_dir: Path) -> None:
    assert {p.name for p in run_dir.iterdir()} == {
        "model.safetensors",
        "checkpoint.safetensors",
        "metrics.jsonl",
        "loss.png",
    }
    lines = read_metrics(run_dir)
    assert [m["step"] for m in lines] == [2]
    for key in (
        "train_loss",
        "heldout_loss",
        "heldout_mse",
        "heldout_query_mse",
        "heldout_ssim",
        "heldout_energy_original",
        "heldout_energy_query",
        "heldout_energy_retrieved",
        "seconds",
        "skipped",
    ):
        assert key in lines[0]
    assert lines[0]["heldout_split"] == "test"
    # Hamming error of the thresholded retrieval, and of the query: a run shows when the
    # first falls below the second (the paper's image metric).
    assert 0 < lines[0]["heldout_query_hamming"] < 28 * 28
    assert 0 <= lines[0]["heldout_hamming"] <= 28 * 28
    # The same queries read from a memory that holds nothing: the gap is the write's.
    assert 0 <= lines[0]["heldout_unwritten_hamming"] <= 28 * 28
    assert lines[0]["heldout_unwritten_mse"] > 0
    assert Image.open(run_dir / "loss.png").size[0] > 100


def test_write_read_energy_on_real_characters(
    run_dir: Path, omniglot_dir: Path, tmp_path: Path
) -> None:
    chars = omniglot_dir / "Latin" / "character01"
    memory = tmp_path / "m.safetensors"
    result = runner.invoke(
        app,
        [
            "write",
            "--model",
            str(run_dir / "model.safetensors"),
            str(chars),
            "-o",
            str(memory),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(memory)
    assert "resized 105x105 images to the model's 28x28" in result.stderr

    queries = run_ebmm("distort", str(chars), "--size", "28", "-o", str(tmp_path / "q"))
    assert queries.returncode == 0, queries.stderr
    read = run_ebmm(
        "read",
        "--memory",
        str(memory),
        "-",
        "-o",
        str(tmp_path / "r"),
        "--save-iterates",
        "--device",
        "cpu",
        stdin=queries.stdout,
    )
    assert read.returncode == 0, read.stderr
    written = read.stdout.splitlines()
    assert len(written) == 20
    first = Image.open(written[0])
    assert first.mode == "L" and first.size == (28, 28)
    strip = Image.open(tmp_path / "r-iterates" / Path(written[0]).name)
    assert strip.size == (28 * 3, 28)  # x(0), x(1), x(2)

    result = runner.invoke(
        app,
        [
            "energy",
            "--memory",
            str(memory),
            str(chars),
            str(tmp_path / "q"),
            str(tmp_path / "r"),
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)
    assert len(table["images"]) == 60
    assert [g["path"] for g in table["groups"]] == [
        str(chars),
        str(tmp_path / "q"),
        str(tmp_path / "r"),
    ]
    assert all(g["count"] == 20 for g in table["groups"])
    means = [
        sum(i["energy"] for i in table["images"][k * 20 : (k + 1) * 20]) / 20 for k in range(3)
    ]
    assert [round(g["mean"], 6) for g in table["groups"]] == [round(m, 6) for m in means]


def _evaluation_pngs(data_root: Path, out: Path, count: int) -> list[Path]:
    """The first drawing of `count` characters of the evaluation alphabets, as shipped."""
    out.mkdir()
    with zipfile.ZipFile(data_root / "omniglot" / "images_evaluation.zip") as z:
        names = sorted(n for n in z.namelist() if n.endswith("_01.png"))[:count]
        for name in names:
            (out / Path(name).name).write_bytes(z.read(name))
    return sorted(out.iterdir())


def test_cli_takes_omniglot_files_as_training_saw_them(
    run_dir: Path, data_root: Path, tmp_path: Path
) -> None:
    """Omniglot's PNGs are dark strokes on light, training sees ink = 1: `ebmm write |
    distort | read` on evaluation-alphabet files as they ship retrieves what the library
    retrieves from the same characters loaded as training loads them (to the PNG's 8 bits)."""
    pngs = _evaluation_pngs(data_root, tmp_path / "chars", 6)
    memory, queries, retrieved = tmp_path / "m.safetensors", tmp_path / "q", tmp_path / "r"
    model_file = str(run_dir / "model.safetensors")
    for args in (
        ["write", "--model", model_file, str(tmp_path / "chars"), "-o", str(memory)],
        ["distort", str(tmp_path / "chars"), "--size", "28", "-o", str(queries)],
        ["read", "--memory", str(memory), str(queries), "-o", str(retrieved)],
    ):
        result = run_ebmm(*args, "--device", "cpu") if args[0] != "distort" else run_ebmm(*args)
        assert result.returncode == 0, result.stderr

    model = load_model(run_dir / "model.safetensors")
    assert model.config.invert_files
    images = torch.stack(
        [x for x, _ in ImageFiles(pngs, [0] * len(pngs), ["c"], size=28, invert=True)]
    )  # the training loader's own decoding: inverted, then resized
    query_files = torch.stack([load_image(queries / p.name) for p in pngs])
    library = retrieve(model, write_memory(model, images), 1.0 - query_files)[-1]
    cli = torch.stack([1.0 - load_image(retrieved / p.name) for p in pngs])
    assert (cli - library).abs().max() <= 1 / 255
    assert (library - (1.0 - query_files)).abs().max() > 0.05  # the read did move them


def test_same_seed_same_run(run_dir: Path, data_root: Path, tmp_path: Path) -> None:
    _train(data_root, tmp_path / "again", "--steps", "2", "--loss", "ssim+mse")
    assert metrics_parting(read_metrics(run_dir), read_metrics(tmp_path / "again")) is None
    again = tmp_path / "again" / "model.safetensors"
    assert model_parting(again, run_dir / "model.safetensors") is None


def test_init_starts_from_a_trained_model_and_refuses_one_that_does_not_fit(
    data_root: Path, run_dir: Path, tmp_path: Path
) -> None:
    """`--init` starts a run from a model file or a built-in (at another N and distortion:
    a curriculum's next stage; a model trained at one N starts a run over a range, its κ
    at 0), records where it began, and refuses in one line a model
    whose network is not the run's, before a run folder exists. With both learning
    rates 0 the run's model stays the one it started from, to the bit."""
    frozen = ["--steps", "1", "--set", "lr=0", "--set", "rule_lr=0"]
    model = run_dir / "model.safetensors"
    for name, source, extra in [
        ("model", model, ["--batch-size", "1", "--distortion", "occlude:8"]),
        ("range", model, ["--batch-size", "1-4"]),
        ("omniglot-28", "omniglot-28",
         ["--image-size", "28", "--write-steps", "5", "--read-steps", "5"]),
    ]:  # fmt: skip
        out = tmp_path / f"from-{name}"
        _train(data_root, out, "--init", str(source), *extra, *frozen)
        started = load_model(builtin.resolve(source)).state_dict()
        trained = load_model(out / "model.safetensors").state_dict()
        # a run over a range of N adds κ, the rates' power of N, at 0: a fresh run's start
        added = {k: v for k, v in trained.items() if k not in started}
        assert list(added) == (["rules.rate_exponent"] if name == "range" else [])
        assert all(not v.any() for v in added.values())
        assert all(torch.equal(started[k], trained[k]) for k in started)
        config = json.loads(load_checkpoint(out / "checkpoint.safetensors")[2]["train_config"])
        assert config["init"] == str(builtin.resolve(source).resolve())
    fresh = load_model(run_dir / "model.safetensors").state_dict()
    assert not all(torch.equal(fresh[k], started[k]) for k in fresh)  # the check can fail

    refused = run_ebmm("train", "--data-root", str(data_root), *TINY, "--memory", "fc",
                       "--init", str(run_dir / "model.safetensors"), "--steps", "1",
                       "-o", str(tmp_path / "bad"))  # fmt: skip
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert str(run_dir / "model.safetensors") in line and "do not match this run" in line
    assert not (tmp_path / "bad").exists()
    resumed = run_ebmm("train", "-o", str(tmp_path / "from-model"), "--resume", "--init",
                       "omniglot-28")  # fmt: skip
    assert resumed.returncode == 2 and "--init" in resumed.stderr


def test_interrupted_run_resumes_exactly(data_root: Path, tmp_path: Path) -> None:
    """Ctrl-C after step 2 saves a checkpoint; `--resume`, which keeps the run's budget
    (and so its rate schedule) when given none, then ends where an uninterrupted run
    ends, to the bit."""
    _train(data_root, tmp_path / "whole", "--steps", "4")
    model = model_config(
        dataset="omniglot",
        memory="conv",
        image_size=28,
        rules=RuleConfig(write_steps=2, read_steps=2),
        distortion="noise:7",
        loss="mse",
    )
    config = TrainConfig(
        model,
        data_root=str(data_root),
        batch_size=3,
        steps=4,
        eval_every=2,
        eval_episodes=1,
        device="cpu",
    )
    trainer = Trainer.create(config, tmp_path / "split")

    def interrupt(info: dict) -> None:
        if info["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.run(interrupt)
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "split"), "--resume"])
    assert result.exit_code == 0, result.output
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert metrics_parting(whole, split) is None and [m["step"] for m in whole] == [2, 4]
    whole_model, split_model = (tmp_path / d / "model.safetensors" for d in ("whole", "split"))
    assert model_parting(whole_model, split_model) is None


@pytest.mark.parametrize(
    "mode",
    [
        ["--set", "schedule=fixed"],
        ["--read", "decoder"],
        ["--memory", "fc", "--set", "first_order=true"],
    ],
)
def test_other_modes_run_end_to_end(
    mode: list[str], data_root: Path, omniglot_dir: Path, tmp_path: Path
) -> None:
    _train(data_root, tmp_path / "run", "--steps", "2", *mode)
    chars = omniglot_dir / "Greek" / "character03"
    model = tmp_path / "run" / "model.safetensors"
    assert (
        runner.invoke(
            app, ["write", "--model", str(model), str(chars), "-o", str(tmp_path / "m.safetensors")]
        ).exit_code
        == 0
    )
    result = runner.invoke(
        app,
        [
            "read",
            "--memory",
            str(tmp_path / "m.safetensors"),
            str(chars),
            "-o",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 20


def _one_line(result, *named: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert all(n in lines[0] for n in named), lines[0]
    assert "Traceback" not in result.output


def test_bad_inputs_to_write_read_train(
    run_dir: Path, omniglot_dir: Path, data_root: Path, tmp_path: Path
) -> None:
    chars = str(omniglot_dir / "Latin" / "character02")
    model = run_dir / "model.safetensors"
    memory = tmp_path / "m.safetensors"
    assert (
        runner.invoke(app, ["write", "--model", str(model), chars, "-o", str(memory)]).exit_code
        == 0
    )
    _one_line(
        runner.invoke(
            app, ["write", "--model", str(memory), chars, "-o", str(tmp_path / "x.safetensors")]
        ),
        str(memory),
        "is a memory",
    )
    _one_line(runner.invoke(app, ["read", "--memory", str(model), chars]), str(model), "is a model")
    _one_line(
        runner.invoke(app, ["write", "--model", str(model), chars, "-o", str(memory)]),
        str(memory),
        "--force",
    )
    _one_line(
        runner.invoke(app, ["train", "--out", str(tmp_path / "none"), "--resume", "--steps", "1"]),
        "checkpoint.safetensors",
        "no checkpoint",
    )
    _one_line(
        runner.invoke(
            app, ["train", "--out", str(run_dir), "--steps", "1", "--data-root", str(data_root)]
        ),
        str(run_dir),
        "--resume",
    )
    with zipfile.ZipFile(data_root / "cifar10" / "cifar10_train_jpg.zip") as z:
        z.extract("train/cat/0001.jpg", tmp_path)
    colour = tmp_path / "train" / "cat" / "0001.jpg"
    _one_line(
        runner.invoke(
            app, ["read", "--memory", str(memory), str(colour), "-o", str(tmp_path / "r")]
        ),
        str(colour),
        "3 channels",
    )
    assert not (tmp_path / "r").exists()


def test_binary_strings_train_with_the_rnn(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "train",
            "--dataset",
            "binary",
            "--memory",
            "rnn",
            "--steps",
            "2",
            "--batch-size",
            "16",
            "--set",
            "write_lr=1.5",
            "--set",
            "read_lr=5",
            "--loss",
            "bce",
            "--eval-every",
            "2",
            "--eval-episodes",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["heldout_query_mse"] == 0.125  # eraseblock:64: 64 of 128 bits at 0.5
    config = load_model(tmp_path / "run" / "model.safetensors").config
    assert (config.rules.write_lr, config.rules.read_lr) == (1.5, 5.0)
    assert config.energy.signed
    assert config.loss == "bce"
    assert metrics["heldout_split"] == "fresh random strings"
    # --resume --device moves the run: refused where that device is missing, else taken
    resume = ["train", "--out", str(tmp_path / "run"), "--resume", "--steps", "3", "--device"]
    if not torch.cuda.is_available():
        _one_line(runner.invoke(app, [*resume, "cuda"]), "--device", "no CUDA GPU")
    moved = runner.invoke(app, [*resume, "cpu"])
    assert moved.exit_code == 0, moved.output
    assert (
        json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    )
    wrong = runner.invoke(
        app,
        [
            "train",
            "--dataset",
            "binary",
            "--memory",
            "conv",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert wrong.exit_code == 2 and "--memory" in wrong.stderr


def test_write_that_overflows_names_the_step_and_leaves_nothing(
    run_dir: Path, omniglot_dir: Path, tmp_path: Path
) -> None:
    model = load_model(run_dir / "model.safetensors")
    with torch.no_grad():
        for p in model.energy.parameters():
            p.mul_(1e20)  # finite weights, but energies beyond float32
    save_model(model, tmp_path / "huge.safetensors")
    out = tmp_path / "m.safetensors"
    result = runner.invoke(
        app,
        [
            "write",
            "--model",
            str(tmp_path / "huge.safetensors"),
            str(omniglot_dir / "Latin" / "character02"),
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]  # after the note on resizing
    assert line == (
        f"ebmm write: {tmp_path / 'huge.safetensors'}: write step 1 of 2: the energy holds "
        "NaN or infinite values"
    )
    assert "Traceback" not in result.output and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["huge.safetensors"]


def test_write_read_energy_skip_bad_files(
    run_dir: Path, omniglot_dir: Path, tmp_path: Path
) -> None:
    mixed = mixed_folder(omniglot_dir, tmp_path)
    model, memory = run_dir / "model.safetensors", tmp_path / "m.safetensors"

    stopped = runner.invoke(app, ["write", "--model", str(model), str(mixed), "-o", str(memory)])
    assert stopped.exit_code == 2 and "b_text.png" in stopped.stderr and not memory.exists()
    wrote = runner.invoke(
        app, ["write", "--model", str(model), str(mixed), "-o", str(memory), "--skip-bad"]
    )
    assert wrote.exit_code == 0, wrote.output
    assert load_memory(memory)[1].patterns == 3
    assert "skipped 2 bad file(s)" in wrote.stderr

    out = tmp_path / "r"
    read = runner.invoke(
        app,
        [
            "read",
            "--memory",
            str(memory),
            str(mixed),
            "-o",
            str(out),
            "--skip-bad",
            "--batch-size",
            "2",
        ],
    )
    assert read.exit_code == 0, read.output
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png", "e.png"]
    energies = runner.invoke(
        app, ["energy", "--memory", str(memory), str(mixed), "--skip-bad", "--json"]
    )
    assert energies.exit_code == 0, energies.output
    doc = json.loads(energies.stdout)
    assert [Path(r["path"]).name for r in doc["images"]] == ["a.png", "c.png", "e.png"]
    assert doc["groups"][0]["count"] == 3


def test_write_onto_a_full_disk_leaves_nothing(
    run_dir: Path, omniglot_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "m.safetensors"
    chars = omniglot_dir / "Latin" / "character02"
    command = ["write", "--model", str(run_dir / "model.safetensors"), str(chars), "-o", str(out)]
    full = subprocess.run(
        [sys.executable, "-m", "ebmm_cli", *command],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
    )
    assert full.returncode == 1, full.stderr
    assert full.stderr.strip().splitlines()[-1] == (
        f"ebmm write: {out}: write failed (File too large); nothing written"
    )
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("first_order", [False, True])
def test_training_skips_and_counts_non_finite_steps(first_order: bool, tmp_path: Path) -> None:
    model = model_config(
        dataset="binary", rules=RuleConfig(write_steps=2, read_steps=2), distortion="erase:8"
    )
    config = TrainConfig(
        model, batch_size=4, steps=3, eval_every=3, eval_episodes=2, first_order=first_order,
        device="cpu",
    )  # fmt: skip
    trainer = Trainer.create(config, tmp_path / "run")
    with torch.no_grad():
        trainer.model.rules.write_rate.fill_(float("inf"))  # every write leaves the reals
    trainer.run()
    (last,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert last["step"] == 3 and last["skipped"] == 3 and last["train_loss"] is None
    assert last["heldout_nonfinite"] == 2


@pytest.mark.slow  # five profiled steps: the longest here, and a developer's tool
def test_train_profile_writes_the_operator_table_and_a_trace(
    data_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "prof"
    _train(data_root, out, "--steps", "5", "--profile")
    table = (out / "profile.txt").read_text()
    assert "aten::" in table and "ProfilerStep" in table
    trace = json.loads((out / "profile-trace.json").read_text())
    assert any(e.get("name", "").startswith("aten::conv") for e in trace["traceEvents"])


def test_write_append_continues_the_stored_memory(
    run_dir: Path, data_root: Path, omniglot_dir: Path, tmp_path: Path
) -> None:
    model = str(run_dir / "model.safetensors")
    first, second = omniglot_dir / "Latin" / "character01", omniglot_dir / "Latin" / "character02"
    memory, alone = tmp_path / "m.safetensors", tmp_path / "alone.safetensors"

    def write(*args: str) -> subprocess.CompletedProcess:
        return run_ebmm("write", "--model", model, "--device", "cpu", *args)

    assert write(str(first), "-o", str(memory)).returncode == 0
    before = memory.read_bytes()
    missing = write(str(second), "-o", str(tmp_path / "none.safetensors"), "--append")
    assert missing.returncode == 2 and "no memory file to append to" in missing.stderr
    exists = write(str(second), "-o", str(memory))
    assert exists.returncode == 2 and "--append" in exists.stderr
    assert memory.read_bytes() == before  # refused: untouched

    appended = write(str(second), "-o", str(memory), "--append")
    assert appended.returncode == 0, appended.stderr
    assert write(str(second), "-o", str(alone)).returncode == 0
    _, stored = load_memory(memory)
    _, fresh = load_memory(alone)
    assert stored.patterns == 40  # 20 drawings of each character
    # T more steps from the first memory, not from the meta-learned start
    assert any(not torch.equal(stored.params[k], fresh.params[k]) for k in fresh.params)

    other = tmp_path / "other"
    _train(data_root, other, "--steps", "1", "--seed", "7")
    wrong = run_ebmm(
        "write", "--model", str(other / "model.safetensors"), str(second), "-o", str(memory),
        "--append", "--device", "cpu",
    )  # fmt: skip
    assert wrong.returncode == 2 and "written by another model" in wrong.stderr

    decoder_run, decoder_memory = tmp_path / "decoder", tmp_path / "d.safetensors"
    _train(data_root, decoder_run, "--steps", "1", "--read", "decoder")
    decoder_model = str(decoder_run / "model.safetensors")
    made = run_ebmm("write", "--model", decoder_model, str(first), "-o", str(decoder_memory))
    assert made.returncode == 0, made.stderr
    kept = decoder_memory.read_bytes()
    refused = run_ebmm(
        "write", "--model", decoder_model, str(second), "-o", str(decoder_memory), "--append",
    )  # fmt: skip
    assert refused.returncode == 2 and "cannot be appended to" in refused.stderr
    assert decoder_memory.read_bytes() == kept


def test_train_logs_one_line_per_evaluation_without_a_terminal(
    data_root: Path, tmp_path: Path
) -> None:
    """stderr to a file or pipe (nohup, a batch job): plain newline-terminated lines, one per
    held-out evaluation, then the summary; no carriage-return frames."""
    result = run_ebmm(
        "train", "--data-root", str(data_root), "--out", str(tmp_path / "run"), *TINY,
        "--steps", "4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    assert [line.split(",")[0] for line in lines[:2]] == [
        "ebmm train: step 2",
        "ebmm train: step 4",
    ]
    assert all("held-out" in line and "steps/s" in line for line in lines[:2])
    assert lines[2].startswith("step 4: held-out loss") and len(lines) == 3


def test_train_checks_every_option_before_loading_data(omniglot_dir: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-data-here")
    for option, args in (
        ("--distortion", ["--distortion", "blur:3"]),
        ("--distortion", ["--distortion", "occlude:40"]),
        ("--invert", ["--invert"]),
        ("--loss", ["--dataset", "binary", "--loss", "ssim+mse"]),
        ("--set write_lr", ["--set", "write_lr=0"]),
    ):
        result = runner.invoke(
            app, ["train", "--data-root", missing, "--steps", "1", "-o", str(tmp_path / "r"), *args]
        )
        _one_line(result, option)
        assert not (tmp_path / "r").exists()
    # A folder of dark-on-light images: --invert is recorded, so files are inverted too.
    _train(omniglot_dir.parent, tmp_path / "scans", "--dataset", str(omniglot_dir / "Latin"),
           "--batch-size", "2", "--steps", "1", "--invert")  # fmt: skip
    model = load_model(tmp_path / "scans" / "model.safetensors")
    assert model.config.invert_files and model.config.energy.shape == (1, 28, 28)


def test_binarize_trains_reads_files_and_compares_on_binary_characters(
    data_root: Path, omniglot_dir: Path, tmp_path: Path
) -> None:
    """`--binarize` (the paper's binary Omniglot): the run trains on thresholded
    characters and its model records it; `write`, `read` and `energy` threshold files the
    same way (a file and its thresholded 32x32 copy get the same energy, where their grey
    edges would differ); `compare` defaults to the model's choice, `--no-binarize` undoes
    it; and binary strings refuse it."""
    out = tmp_path / "run"
    _train(data_root, out, "--steps", "1", "--image-size", "32", "--binarize")
    model = out / "model.safetensors"
    assert load_model(model).config.binarize and builtin.describe(model)["binarize"]
    assert not load_model(builtin.resolve("omniglot-28")).config.binarize  # older files

    original = next((omniglot_dir / "Latin" / "character01").glob("*.png"))
    ink = 1.0 - load_image(original, size=32)  # the model's view, before thresholding
    assert ((ink > 0.05) & (ink < 0.95)).any()  # resizing greyed the edges
    copy = tmp_path / "files" / "copy.png"
    copy.parent.mkdir()
    Image.fromarray(((ink[0] <= 0.5).numpy() * 255).astype("uint8"), "L").save(copy)
    memory = tmp_path / "m.safetensors"
    chars = omniglot_dir / "Latin" / "character02"
    written = run_ebmm("write", "--model", str(model), str(chars), "-o", str(memory))
    assert written.returncode == 0, written.stderr
    assert "thresholded the images at 0.5, as the model was trained" in written.stderr
    result = run_ebmm("energy", "--memory", str(memory), str(original), str(copy), "--json")
    assert result.returncode == 0, result.stderr
    first, second = (row["energy"] for row in json.loads(result.stdout)["images"])
    assert first == pytest.approx(second, rel=1e-5)  # equal inputs, batched float sums
    read = run_ebmm("read", "--memory", str(memory), str(original), "-o", str(tmp_path / "r"))
    assert read.returncode == 0 and "thresholded" in read.stderr, read.stderr

    def compare(*extra: str) -> dict:
        result = run_ebmm("compare", "--model", str(model), "--data-root", str(data_root),
                          "--patterns", "2", "--episodes", "1", "--baselines", "identity",
                          "--json", *extra)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    assert compare()["config"]["binarize"] is True
    assert compare("--no-binarize")["config"]["binarize"] is False
    strings = ["--dataset", "binary", "--memory", "rnn", "--binarize", "--steps", "1"]
    refused = runner.invoke(app, ["train", *strings, "-o", str(tmp_path / "b")])
    assert refused.exit_code == 2 and "--binarize" in refused.output


def test_a_recipe_trains_by_its_options_unless_told_otherwise(tmp_path: Path) -> None:
    """`ebmm train --recipe binary-128`: the run is configured as the recipe says, but
    for the options given beside it (here the N range); an unknown recipe, and a recipe
    beside --resume, are one-line errors with exit 2."""
    run = tmp_path / "run"
    common = ["--steps", "1", "--eval-every", "1", "--eval-episodes", "1", "--device", "cpu"]
    result = run_ebmm("train", "--recipe", "binary-128", "--batch-size", "8-16", *common,
                      "--out", str(run))  # fmt: skip
    assert result.returncode == 0, result.stderr
    state = load_checkpoint(run / "checkpoint.safetensors")[2]
    config = TrainConfig.from_json(state["train_config"])
    recipe = RECIPES["binary-128"]["train"]
    expected = train_config(**{**recipe, "batch_size": (8, 16)}, steps=1, eval_every=1,
                            eval_episodes=1, device="cpu")  # fmt: skip
    assert config.model.to_json() == expected.model.to_json()
    assert (config.lr, config.rule_lr, config.contrast) == (2e-3, 0.1, 0.1)
    assert (config.batch_min, config.batch_size) == (8, 16)
    for args, problem in (
        (["--recipe", "paper", *common, "--out", str(tmp_path / "other")], "unknown recipe"),
        (["--recipe", "binary-128", "--resume", "--out", str(run)], "--resume continues"),
    ):
        refused = run_ebmm("train", *args)
        assert refused.returncode == 2 and problem in refused.stderr, refused.stderr
        assert len(refused.stderr.splitlines()) == 1
    assert not (tmp_path / "other").exists()
