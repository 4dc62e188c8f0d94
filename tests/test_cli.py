"""The real CLI, through Typer's runner and through subprocesses, on real Omniglot PNGs."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ebmm_cli import __version__
from ebmm_cli.cli import Kind, app
from ebmm_cli.distort import KINDS
from tests.conftest import limit_file_size, mixed_folder, run_ebmm
from tests.test_imageio import _png_header_only

runner = CliRunner()


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_help_lists_commands_and_version() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "distort" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"ebmm {__version__}"


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom ebmm_cli.cli import main\nsys.argv = ['ebmm', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "distort" in done.stdout


def test_cli_kinds_are_the_library_kinds() -> None:
    assert tuple(k.value for k in Kind) == KINDS


def test_distort_changes_one_block_and_leaves_inputs(omniglot_dir: Path, tmp_path: Path) -> None:
    latin = omniglot_dir / "Latin"
    before = _tree_hashes(latin)
    out = tmp_path / "out"
    result = runner.invoke(app, ["distort", str(latin), "--block", "7", "-o", str(out)])
    assert result.exit_code == 0, result.output
    written = result.stdout.splitlines()
    assert len(written) == 40 and all(Path(p).is_file() for p in written)
    assert _tree_hashes(latin) == before
    changed_any = 0
    for src in sorted(latin.rglob("*.png")):
        dst = out / src.relative_to(latin)
        a = np.asarray(Image.open(src).convert("L"), np.int16)
        img = Image.open(dst)
        assert img.mode == "L" and img.size == (105, 105)
        diff = np.argwhere(np.asarray(img, np.int16) != a)
        if len(diff):
            changed_any += 1
            assert (diff.max(0) - diff.min(0) < 7).all()
    assert changed_any >= 35  # a noise block over a white background almost always shows


def test_distort_is_byte_identical_for_a_seed(omniglot_dir: Path, tmp_path: Path) -> None:
    char = omniglot_dir / "Latin" / "character01"
    for name in ("a", "b"):
        assert (
            runner.invoke(
                app, ["distort", str(char), "--seed", "5", "-o", str(tmp_path / name)]
            ).exit_code
            == 0
        )
    assert _tree_hashes(tmp_path / "a") == _tree_hashes(tmp_path / "b")
    runner.invoke(app, ["distort", str(char), "--seed", "6", "-o", str(tmp_path / "c")])
    assert _tree_hashes(tmp_path / "a") != _tree_hashes(tmp_path / "c")


def test_a_file_alone_gets_the_same_query_as_in_its_folder(
    omniglot_dir: Path, tmp_path: Path
) -> None:
    char = omniglot_dir / "Latin" / "character01"
    one = sorted(char.iterdir())[4]
    runner.invoke(app, ["distort", str(char), "-o", str(tmp_path / "all")])
    runner.invoke(app, ["distort", str(one), "-o", str(tmp_path / "one")])
    assert (tmp_path / "all" / one.name).read_bytes() == (tmp_path / "one" / one.name).read_bytes()


def test_refuses_to_overwrite_without_force(omniglot_dir: Path, tmp_path: Path) -> None:
    char = omniglot_dir / "Greek" / "character03"
    args = ["distort", str(char), "-o", str(tmp_path / "o")]
    assert runner.invoke(app, args).exit_code == 0
    first = _tree_hashes(tmp_path / "o")
    refused = runner.invoke(app, [*args, "--seed", "1"])
    assert refused.exit_code == 2 and "--force" in refused.stderr
    assert _tree_hashes(tmp_path / "o") == first
    assert runner.invoke(app, [*args, "--seed", "1", "--force"]).exit_code == 0
    assert _tree_hashes(tmp_path / "o") != first


def test_size_and_other_kinds(omniglot_dir: Path, tmp_path: Path) -> None:
    char = omniglot_dir / "Latin" / "character02"
    for i, extra in enumerate(
        [
            ["--kind", "occlude", "--block", "16", "--value", "uniform"],
            ["--kind", "saltpepper", "--prob", "0.2"],
            ["--kind", "flip", "--bits", "30"],
        ]
    ):
        out = tmp_path / str(i)
        result = runner.invoke(app, ["distort", str(char), "--size", "32", "-o", str(out), *extra])
        assert result.exit_code == 0, result.output
        img = Image.open(sorted(out.iterdir())[0])
        assert img.size == (32, 32) and img.mode == "L"


def test_rgb_stays_rgb_and_noise_hits_only_the_first_channel(
    data_root: Path, tmp_path: Path
) -> None:
    with zipfile.ZipFile(data_root / "cifar10" / "cifar10_train_jpg.zip") as z:
        names = [n for n in z.namelist() if n.startswith("train/cat/") and n.endswith(".jpg")][:3]
        for n in names:
            z.extract(n, tmp_path)
    result = runner.invoke(
        app, ["distort", str(tmp_path / "train"), "--block", "7", "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    for n in names:
        src = np.asarray(Image.open(tmp_path / n).convert("RGB"), np.int16)
        img = Image.open(tmp_path / "out" / Path(n).relative_to("train").with_suffix(".png"))
        assert img.mode == "RGB"
        dst = np.asarray(img, np.int16)
        assert (dst[..., 1:] == src[..., 1:]).all()
        diff = np.argwhere(dst[..., 0] != src[..., 0])
        assert len(diff) and (diff.max(0) - diff.min(0) < 7).all()


def test_output_inside_the_input_folder_is_not_read_back(
    omniglot_dir: Path, tmp_path: Path
) -> None:
    work = tmp_path / "in"
    work.mkdir()
    for src in sorted((omniglot_dir / "Latin" / "character01").iterdir())[:3]:
        (work / src.name).write_bytes(src.read_bytes())
    args = ["distort", str(work), "-o", str(work / "out")]
    assert len(runner.invoke(app, args).stdout.splitlines()) == 3
    again = runner.invoke(app, [*args, "--force"])
    assert again.exit_code == 0 and len(again.stdout.splitlines()) == 3


def test_pipeline_through_stdin_in_real_processes(omniglot_dir: Path, tmp_path: Path) -> None:
    """What one command prints, piped into a real process's stdin (the first command runs
    in-process: its stdout is the same text)."""
    char = omniglot_dir / "Latin" / "character01"
    first = run_ebmm("distort", str(char), "-o", str(tmp_path / "q"))
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    second = run_ebmm(
        "distort",
        "-",
        "--kind",
        "occlude",
        "-o",
        str(tmp_path / "q2"),
        stdin="\n" + first.stdout + "\n",
        fresh=True,
    )
    assert second.returncode == 0, second.stderr
    assert len(second.stdout.splitlines()) == 20
    assert sorted(p.name for p in (tmp_path / "q2").iterdir()) == sorted(
        p.name for p in char.iterdir()
    )


def _bad_inputs(tmp: Path, omniglot_dir: Path) -> dict[str, tuple[list[str], str]]:
    good = sorted((omniglot_dir / "Latin" / "character01").iterdir())[0]
    (tmp / "empty").mkdir()
    (tmp / "text.png").write_text("not an image")
    (tmp / "zero.png").write_bytes(b"")
    (tmp / "cut.png").write_bytes(good.read_bytes()[:60])
    (tmp / "bomb.png").write_bytes(_png_header_only(20_000, 20_000))
    return {
        "missing": ([str(tmp / "nope")], str(tmp / "nope")),
        "empty folder": ([str(tmp / "empty")], str(tmp / "empty")),
        "not an image": ([str(tmp / "text.png")], "text.png"),
        "truncated": ([str(tmp / "cut.png")], "cut.png"),
        "zero bytes": ([str(tmp / "zero.png")], "zero.png"),
        "bomb": ([str(tmp / "bomb.png")], "bomb.png"),
        "block too large": ([str(good), "--block", "200"], "--block"),
        "negative size": ([str(good), "--size", "-3"], "--size"),
        "bad kind": ([str(good), "--kind", "blur"], "--kind"),
        "bad value": ([str(good), "--kind", "occlude", "--value", "2"], "--value"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty folder",
        "not an image",
        "truncated",
        "zero bytes",
        "bomb",
        "block too large",
        "negative size",
        "bad kind",
        "bad value",
    ],
)
def test_bad_input_gives_one_line_and_exit_2(case: str, omniglot_dir: Path, tmp_path: Path) -> None:
    args, named = _bad_inputs(tmp_path, omniglot_dir)[case]
    out = tmp_path / "out"
    done = run_ebmm("distort", *args, "-o", str(out))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ebmm distort: "), done.stderr
    assert named in lines[0] and "Traceback" not in done.stderr
    assert done.stdout == ""
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_skip_bad_skips_with_a_warning_each_and_a_count(omniglot_dir: Path, tmp_path: Path) -> None:
    mixed = mixed_folder(omniglot_dir, tmp_path)
    stopped = run_ebmm("distort", str(mixed), "-o", str(tmp_path / "stop"))
    assert stopped.returncode == 2
    (line,) = stopped.stderr.strip().splitlines()
    assert line.startswith(f"ebmm distort: {mixed / 'b_text.png'}: ")  # the first bad file
    assert [p.name for p in (tmp_path / "stop").iterdir()] == ["a.png"]  # what came before
    done = run_ebmm("distort", str(mixed), "--skip-bad", "-o", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png", "e.png"]
    assert len(done.stdout.splitlines()) == 3
    warnings = done.stderr.strip().splitlines()
    assert [w.endswith("(skipped)") for w in warnings] == [True, True, False]
    assert "b_text.png" in warnings[0] and "d_zero.png" in warnings[1]
    assert warnings[2] == "ebmm distort: skipped 2 bad file(s)"


def test_odd_paths_and_a_missing_path_on_stdin(omniglot_dir: Path, tmp_path: Path) -> None:
    src = sorted((omniglot_dir / "Latin" / "character01").glob("*.png"))[0].read_bytes()
    odd = tmp_path / "my chars" / "ünïcode ñ"
    odd.mkdir(parents=True)
    for name in ("-dash.png", "with space.png", "日本.png"):
        (odd / name).write_bytes(src)
    done = run_ebmm("distort", str(tmp_path / "my chars"), "-o", str(tmp_path / "out 1"))
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in (tmp_path / "out 1" / "ünïcode ñ").iterdir())
    assert written == ["-dash.png", "with space.png", "日本.png"]
    # A file whose name starts with a dash, after `--`, from its own folder.
    alone = run_ebmm("distort", "-o", str(tmp_path / "out 2"), "--", "-dash.png", cwd=odd)
    assert alone.returncode == 0, alone.stderr
    assert [p.name for p in (tmp_path / "out 2").iterdir()] == ["-dash.png"]
    missing = run_ebmm(
        "distort",
        "-",
        "-o",
        str(tmp_path / "out 3"),
        stdin=f"{odd / '日本.png'}\n{odd / 'gone.png'}\n",
    )
    assert missing.returncode == 2
    (line,) = missing.stderr.strip().splitlines()
    assert line.startswith("ebmm distort: ") and "gone.png" in line


def test_full_disk_and_unwritable_folder_leave_nothing(omniglot_dir: Path, tmp_path: Path) -> None:
    char = omniglot_dir / "Latin" / "character01"
    out = tmp_path / "out"
    full = subprocess.run(
        [sys.executable, "-m", "ebmm_cli", "distort", str(char), "-o", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
    )
    assert full.returncode == 1, full.stderr
    (line,) = full.stderr.strip().splitlines()
    assert line.startswith(f"ebmm distort: {out}") and "write failed (File too large)" in line
    assert [p for p in out.rglob("*") if p.is_file()] == []
    (tmp_path / "file").write_text("a file, not a folder")
    blocked = run_ebmm("distort", str(char), "-o", str(tmp_path / "file" / "sub"))
    assert blocked.returncode == 2
    assert blocked.stderr.strip() == (
        f"ebmm distort: {tmp_path / 'file' / 'sub'}: cannot write here (Not a directory)"
    )
