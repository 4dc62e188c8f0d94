"""Nothing a user does loses their files: outputs never replace inputs, SIGTERM is a clean
stop, special files and extreme inputs are refused with one line and exit 2."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from ebmm_cli.meta import metrics_parting, read_metrics
from ebmm_cli.store import load_checkpoint, load_memory, model_parting, read_header
from tests.conftest import run_ebmm, start_ebmm

TINY = ["--batch-size", "2", "--write-steps", "1", "--read-steps", "1", "--eval-episodes", "1",
        "--device", "cpu"]  # fmt: skip


def _one_line(result: subprocess.CompletedProcess, *named: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert all(n in lines[0] for n in named), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rel") / "run"
    result = run_ebmm("train", "--data-root", str(data_root), "-o", str(out), "--steps", "1", *TINY)
    assert result.returncode == 0, result.stderr
    return out / "model.safetensors"


@pytest.fixture()
def chars(omniglot_dir: Path) -> Path:
    return omniglot_dir / "Latin" / "character01"


def test_write_never_replaces_its_model(model: Path, chars: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(model.read_bytes())
    before = copy.read_bytes()
    for force in ([], ["--force"]):
        result = run_ebmm("write", "--model", str(copy), str(chars), "-o", str(copy), *force)
        _one_line(result, str(copy), "--model")
    assert copy.read_bytes() == before


def test_compare_outputs_are_refused_over_inputs_and_existing_files(
    model: Path, data_root: Path, tmp_path: Path
) -> None:
    before = model.read_bytes()
    common = ["compare", "--model", str(model), "--data-root", str(data_root), "--batch-size",
              "2", "--episodes", "1", "--baselines", "identity", "--device", "cpu"]  # fmt: skip
    for option in ("--markdown", "--grid", "--plot"):
        for force in ([], ["--force"]):
            result = run_ebmm(*common, option, str(model), *force)
            _one_line(result, str(model), option)
    assert model.read_bytes() == before
    table = tmp_path / "table.md"
    table.write_text("my notes\n")
    _one_line(run_ebmm(*common, "--markdown", str(table)), str(table), "--force")
    assert table.read_text() == "my notes\n"
    assert run_ebmm(*common, "--markdown", str(table), "--force").returncode == 0
    assert table.read_text().startswith("| method")


def test_train_refuses_a_folder_holding_a_model(model: Path, data_root: Path) -> None:
    """A run folder whose checkpoint is gone still holds a model: not silently replaced."""
    folder = model.parent
    (folder / "checkpoint.safetensors").rename(folder / "kept.safetensors")
    try:
        result = run_ebmm("train", "--data-root", str(data_root), "-o", str(folder),
                          "--steps", "1", *TINY)  # fmt: skip
        _one_line(result, str(folder), "holds a run")
    finally:
        (folder / "kept.safetensors").rename(folder / "checkpoint.safetensors")


def test_sigterm_during_training_saves_the_model_and_a_checkpoint_and_says_how_to_resume(
    data_root: Path, omniglot_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = start_ebmm("train", "--data-root", str(data_root), "-o", str(out), "--steps", "1000",
                  "--eval-every", "1000", *TINY)  # fmt: skip
    deadline = time.monotonic() + 120
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the run folder appears when the loop starts
    time.sleep(3)  # some steps in, no checkpoint yet (every 2 minutes by default)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("ebmm train: terminated at step ") and "--resume" in line
    step = int(line.removeprefix("ebmm train: terminated at step ").split(";")[0])
    assert step > 0 and not list(out.glob(".*.tmp"))
    _, _, state = load_checkpoint(out / "checkpoint.safetensors")
    assert state["step"] == step
    # No evaluation was due, yet the folder holds a model a user can write with, as trained
    assert json.loads(read_header(out / "model.safetensors")["step"]) == step
    chars = omniglot_dir / "Greek" / "character03"
    written = run_ebmm("write", "--model", str(out / "model.safetensors"), str(chars),
                       "-o", str(tmp_path / "m.safetensors"))  # fmt: skip
    assert written.returncode == 0, written.stderr
    resumed = run_ebmm("train", "-o", str(out), "--resume", "--steps", "2")
    assert resumed.returncode == 0, resumed.stderr


def _checkpoint_step(out: Path) -> int:
    if not (out / "checkpoint.safetensors").exists():
        return 0
    return json.loads(read_header(out / "checkpoint.safetensors")["state"])["step"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("steps", "eval_every", "cut_after", "evaluated"),
    [(2, 1, 1, [1]), (3, 2, 3, [2])],
    ids=["in-the-loop", "the-last-step"],
)
def test_sigterm_during_an_evaluation_stops_at_once_and_resumes_as_if_never_stopped(
    steps: int, eval_every: int, cut_after: int, evaluated: list[int], tmp_path: Path
) -> None:
    """An evaluation can take minutes (`docker stop` waits 10 s): SIGTERM stops it at
    once, and the resumed run evaluates that step first, so that its metrics and model
    are the uninterrupted run's; so too for the last step's evaluation, after the loop."""
    args = ["--dataset", "binary", "--memory", "rnn", "--batch-size", "8", "--write-steps",
            "2", "--read-steps", "2", "--eval-every", str(eval_every), "--eval-episodes", "40",
            "--set", "checkpoint_minutes=0", "--device", "cpu", "--steps", str(steps)]  # fmt: skip
    whole = tmp_path / "whole"
    assert run_ebmm("train", "-o", str(whole), *args).returncode == 0
    # The whole run's clock between its last two evaluations spans one evaluation and one
    # step (a fraction of a second, where an evaluation takes seconds): half of it lands
    # inside an evaluation when both runs go at one pace. A loaded machine may run the
    # two at different paces: a cut that came after the run ended, or inside the step
    # before the evaluation, says nothing, and is tried again nearer its edge.
    clock = [m["seconds"] for m in read_metrics(whole)]
    fraction = 0.5
    for attempt in range(4):
        split = tmp_path / f"split{attempt}"
        proc = start_ebmm("train", "-o", str(split), *args)
        deadline = time.monotonic() + 300
        # a checkpoint follows every step (and its evaluation, if any): wait for the one
        # before the evaluation to cut, then into it
        while _checkpoint_step(split) < cut_after and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep((clock[-1] - clock[-2]) * fraction)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
        if proc.returncode == 0:  # the run was over before the signal came
            fraction /= 2
        elif proc.returncode == 143 and _checkpoint_step(split) < steps:  # inside the step
            fraction = (fraction + 1) / 2
        else:
            break
    assert proc.returncode == 143, stderr
    assert _checkpoint_step(split) == steps
    assert [m["step"] for m in read_metrics(split)] == evaluated  # the last one was cut short
    resumed = run_ebmm("train", "-o", str(split), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert metrics_parting(read_metrics(split), read_metrics(whole)) is None
    assert model_parting(split / "model.safetensors", whole / "model.safetensors") is None


@pytest.mark.slow
def test_a_second_ctrl_c_stops_inside_the_step_saves_nothing_and_resumes_as_if_never_stopped(
    tmp_path: Path,
) -> None:
    """A first Ctrl-C lets the step in flight finish (its checkpoint then resumes exactly:
    `test_examples.py`, `kill_resume.py --signal INT`); a second stops at once, inside
    the step, and saves nothing: a model and optimiser half through a step would resume
    another run. The checkpoint of the step before stands, and resuming from it ends as
    the uninterrupted run does."""
    args = ["--dataset", "binary", "--memory", "rnn", "--batch-size", "128", "--write-steps",
            "5", "--read-steps", "5", "--eval-every", "100", "--eval-episodes", "1",
            "--set", "checkpoint_minutes=0", "--device", "cpu", "--steps", "3"]  # fmt: skip
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_ebmm("train", "-o", str(whole), *args).returncode == 0
    proc = start_ebmm("train", "-o", str(split), *args)
    deadline = time.monotonic() + 300
    while _checkpoint_step(split) < 1 and proc.poll() is None:  # step 1 done, 2 begun
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)  # a step takes seconds
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "stopping after this step" in stderr
    assert "interrupted inside step 2; nothing saved; its checkpoint of step 1" in stderr
    assert _checkpoint_step(split) == 1
    resumed = run_ebmm("train", "-o", str(split), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert metrics_parting(read_metrics(split), read_metrics(whole)) is None
    assert model_parting(split / "model.safetensors", whole / "model.safetensors") is None


@pytest.mark.parametrize("attempts", [1, pytest.param(5, marks=pytest.mark.slow)])
def test_sigterm_during_distort_leaves_no_temporaries(
    attempts: int, omniglot_dir: Path, tmp_path: Path
) -> None:
    """Each attempt starts a process (seconds, importing torch): one in `make test`,
    five moments into the writing in `make test-slow`."""
    for attempt in range(attempts):
        out = tmp_path / f"q{attempt}"
        proc = start_ebmm("distort", str(omniglot_dir), "--size", "200", "-o", str(out))
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and any(out.iterdir()):
                break  # into the writing, however slow the imports were
            time.sleep(0.05)
        time.sleep(0.02 * attempt)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        written = sorted(p.name for p in out.rglob("*") if p.is_file())
        assert not [name for name in written if name.endswith(".tmp")]
        if proc.returncode in (0, -signal.SIGTERM):
            # Done before the signal, or Python was shutting down (it restores the default
            # handler then): every output was written.
            assert len(written) == len(list(omniglot_dir.rglob("*.png")))
        else:
            assert proc.returncode == 143, stderr
            assert stderr.strip().endswith("terminated; no output was left half-written")


def test_special_files_are_refused_without_reading_them(
    model: Path, chars: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(next(chars.glob("*.png")).read_bytes())
    fifo = folder / "b.png"
    os.mkfifo(fifo)
    memory = tmp_path / "m.safetensors"
    _one_line(run_ebmm("write", "--model", str(model), str(folder), "-o", str(memory)),
              str(fifo), "not a regular file")  # fmt: skip
    _one_line(run_ebmm("distort", str(fifo), "-o", str(tmp_path / "q")), str(fifo))
    skipped = run_ebmm("write", "--model", str(model), str(folder), "-o", str(memory),
                       "--skip-bad")  # fmt: skip
    assert skipped.returncode == 0 and "skipped 1 bad file" in skipped.stderr
    _one_line(run_ebmm("energy", "--memory", str(memory), "/dev/zero"), "/dev/zero")
    _one_line(run_ebmm("read", "--memory", str(fifo), str(folder)), str(fifo))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, 8-bit grey, with a tiny (wrong) body:
    anything that decodes it before checking its size would allocate width x height."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\0"))


def test_huge_dimensions_and_sizes_are_refused_before_work(model: Path, tmp_path: Path) -> None:
    tall = tmp_path / "tall.png"
    tall.write_bytes(_png_header_only(1, 89_000_000))
    memory = tmp_path / "m.safetensors"
    _one_line(run_ebmm("write", "--model", str(model), str(tall), "-o", str(memory)),
              str(tall), "too large")  # fmt: skip
    _one_line(run_ebmm("distort", str(tall), "-o", str(tmp_path / "q")), str(tall), "too large")
    _one_line(run_ebmm("distort", str(tall), "--size", "100000"), "--size")


def test_links_loops_and_odd_names_are_clean_errors(chars: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(next(chars.glob("*.png")).read_bytes())
    loop = folder / "loop.png"
    loop.symlink_to(loop)
    _one_line(run_ebmm("distort", str(folder), "-o", str(tmp_path / "q")), str(loop))
    skipped = run_ebmm("distort", str(folder), "-o", str(tmp_path / "q1"), "--skip-bad")
    assert skipped.returncode == 0 and "skipped 1 bad file" in skipped.stderr
    _one_line(run_ebmm("distort", str(loop), "-o", str(tmp_path / "q2")), str(loop), "loop")
    odd = os.fsencode(str(tmp_path / "odd")) + b"/\xff\xfe.png"
    os.makedirs(tmp_path / "odd")
    with open(odd, "wb") as f:
        f.write(next(chars.glob("*.png")).read_bytes())
    result = subprocess.run(
        [sys.executable, "-m", "ebmm_cli", "distort", str(tmp_path / "odd"), "-o",
         str(tmp_path / "q3")],
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = os.fsencode(str(tmp_path / "q3")) + b"/\xff\xfe.png"
    assert result.stdout == written + b"\n" and os.path.exists(written)
    long = "x" * 5000 + ".png"
    _one_line(run_ebmm("distort", long), "name too long")


@pytest.mark.parametrize("attempts", [1, pytest.param(5, marks=pytest.mark.slow)])
def test_sigterm_at_random_moments_leaves_whole_outputs_or_none(
    attempts: int, model: Path, omniglot_dir: Path, tmp_path: Path
) -> None:
    """SIGTERMs at random moments into write, read and distort, `attempts` of each (3 in
    `make test`, 15 in `make test-slow`; training's are in test_examples.py): never a
    temporary file, never a half-written output."""
    rng = random.Random(0)
    memory = tmp_path / "m.safetensors"
    chars = omniglot_dir / "Latin"
    assert run_ebmm("write", "--model", str(model), str(chars), "-o", str(memory)).returncode == 0
    commands = {
        "write": lambda out: ["write", "--model", str(model), str(chars), "-o", str(out)],
        "read": lambda out: ["read", "--memory", str(memory), str(chars), "-o", str(out)],
        "distort": lambda out: ["distort", str(omniglot_dir), "--size", "105", "-o", str(out)],
    }
    for name, command in commands.items():
        for attempt in range(attempts):
            out = tmp_path / f"{name}{attempt}" / ("m.safetensors" if name == "write" else "o")
            proc = start_ebmm(*command(out))
            time.sleep(rng.uniform(1.5, 5.0))
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=120)
            folder = out.parent
            # -15: the signal came before ebmm had started, or after it had finished and
            # Python, shutting down, had restored the default handler.
            assert proc.returncode in (0, 143, -signal.SIGTERM), stderr
            assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
            if name == "write":
                if out.exists():
                    load_memory(out)  # whole, or refused with an EbmmError
            else:
                for png in folder.rglob("*.png"):
                    Image.open(png).load()


@pytest.mark.parametrize("attempts", [1, pytest.param(10, marks=pytest.mark.slow)])
def test_two_processes_on_one_output_one_wins_the_other_is_refused(
    attempts: int, model: Path, data_root: Path, chars: Path, tmp_path: Path
) -> None:
    """`attempts` races of two writes (1 in `make test`, 10 in `make test-slow`), then a
    second training refused while the first holds its run folder."""
    for attempt in range(attempts):
        out = tmp_path / f"m{attempt}.safetensors"
        procs = [
            start_ebmm(
                "write", "--model", str(model), str(chars), "-o", str(out), "--device", "cpu"
            )
            for _ in range(2)
        ]
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        assert sorted(code for code, _ in results) == [0, 2], results
        loser = next(err for code, err in results if code == 2)
        assert str(out) in loser
        assert "in use by another ebmm process" in loser or "exists" in loser  # it came late
        load_memory(out)
        assert not list(tmp_path.glob(".*"))
    run = tmp_path / "run"
    first = start_ebmm(
        "train", "--data-root", str(data_root), "-o", str(run), "--steps", "3", *TINY
    )
    while not (tmp_path / ".run.lock").exists() and first.poll() is None:
        time.sleep(0.1)
    second = run_ebmm("train", "--data-root", str(data_root), "-o", str(run), "--steps", "3",
                      *TINY)  # fmt: skip
    _one_line(second, str(run), "in use by another ebmm process")
    assert first.wait(timeout=300) == 0


def test_resume_takes_only_the_stopping_rule_and_minutes_must_be_positive(
    tmp_path: Path,
) -> None:
    out = str(tmp_path / "run")
    _one_line(run_ebmm("train", "-o", out, "--resume", "--steps", "2", "--set", "lr=0.1"),
              "--set", "--resume")  # fmt: skip
    _one_line(run_ebmm("train", "-o", out, "--minutes", "0"), "--minutes", "more than 0")
    _one_line(run_ebmm("distort", out, "--seed", str(2**70)), "--seed")


def test_damaged_checkpoint_bytes_are_refused_not_resumed(model: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for f in model.parent.glob("*.safetensors"):
        (run / f.name).write_bytes(f.read_bytes())
    data = bytearray((run / "checkpoint.safetensors").read_bytes())
    data[-1000] ^= 0x01  # one bit of one weight: still a finite float
    (run / "checkpoint.safetensors").write_bytes(bytes(data))
    line = _one_line(run_ebmm("train", "-o", str(run), "--resume", "--steps", "2"), "checksum")
    assert str(run / "checkpoint.safetensors") in line


def test_minor_cases_name_the_file_or_option(
    model: Path, chars: Path, omniglot_dir: Path, tmp_path: Path
) -> None:
    # --data-root pointing at a file
    afile = tmp_path / "file"
    afile.write_text("x")
    result = run_ebmm("compare", "--data-root", str(afile), "--baselines", "identity",
                      "--patterns", "1", "--episodes", "1")  # fmt: skip
    _one_line(result, "--data-root", "not a folder")
    _one_line(run_ebmm("train", "-o", str(afile), "--steps", "1"), str(afile), "run folder")
    # a 4-channel TIFF for a grayscale model: named as the file has it
    tiff = tmp_path / "rgba.tif"
    Image.new("RGBA", (28, 28), (10, 20, 30, 40)).save(tiff)
    _one_line(run_ebmm("write", "--model", str(model), str(tiff), "-o", str(tmp_path / "m")),
              str(tiff), "4 channels (RGBA)")  # fmt: skip
    # -o equal to the input folder
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(next(chars.glob("*.png")).read_bytes())
    _one_line(run_ebmm("distort", str(folder), "-o", str(folder)), str(folder), "input")
    # a damaged member of a zip archive (CRC error)
    png = next(chars.glob("*.png")).read_bytes()
    root = tmp_path / "root"
    (root / "omniglot").mkdir(parents=True)
    archive = root / "omniglot" / "images_background.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        z.writestr("images_background/Alpha/character01/1_01.png", png)
    raw = bytearray(archive.read_bytes())
    raw[raw.index(png[:16]) + len(png) // 2] ^= 0xFF
    archive.write_bytes(bytes(raw))
    _one_line(run_ebmm("compare", "--data-root", str(root), "--split", "train", "--baselines",
                       "identity", "--patterns", "1", "--episodes", "1", "--image-size", "28"),
              "1_01.png", "damaged zip member")  # fmt: skip
    # more patterns than a split holds: the split is named
    result = run_ebmm("train", "--dataset", str(omniglot_dir / "Latin"), "-o",
                      str(tmp_path / "r"), "--steps", "1", "--batch-size", "5")  # fmt: skip
    _one_line(result, "--batch-size", "split")


def test_metrics_parting_forgives_the_last_bits_and_nothing_more() -> None:
    """Two processes evaluating one model can disagree in the last bits (MKL), so resume
    checks compare runs with `metrics_parting`; it must still catch every real parting:
    a number off by more than rounding, a missing field or row, a changed count."""
    row = {"step": 5, "seconds": 1.0, "train_loss": 0.147,
           "heldout_energy_original": 0.1719968467950821, "skipped": 0,
           "heldout_split": "val", "heldout_mse": math.nan,
           "heldout_by_n": {"8": {"hamming": 30.5}, "96": {"hamming": 21.0}}}  # fmt: skip
    again = {**row, "seconds": 9.0, "heldout_energy_original": 0.1719968169927597}
    assert metrics_parting([row, row], [again, again]) is None  # seen on CI: 3e-8 apart

    def parted(**change: object) -> dict | None:
        return metrics_parting([row], [{**row, **change}])

    assert parted(train_loss=0.14701) == {"step": 5, "fields": {"train_loss": [0.147, 0.14701]}}
    assert parted(skipped=1)["fields"] == {"skipped": [0, 1]}
    assert parted(heldout_mse=0.1)["fields"] == {"heldout_mse": [math.nan, 0.1]}
    assert list(parted(heldout_by_n={"8": {"hamming": 30.5}})["fields"]) == ["heldout_by_n"]
    assert parted(heldout_by_n={"8": {"hamming": 30.5}, "96": {"hamming": 21.5}}) is not None
    assert parted(train_loss=None)["fields"] == {"train_loss": [0.147, None]}
    assert metrics_parting([row], [row, row]) == {"rows": [1, 2]}


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_ebmm_makes_openmp_threads_sleep_unless_told_otherwise(given: str | None) -> None:
    """Spinning OpenMP threads made a refining write 16 times slower beside one other job
    (ebmm_cli's docstring): the package sets OMP_WAIT_POLICY=PASSIVE before torch loads
    (torch is imported here after ebmm_cli, as the `ebmm` command does), and keeps a
    policy the user set."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, ebmm_cli, torch; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (given or "PASSIVE")
