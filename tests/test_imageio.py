"""Image decoding across modes, refusal of bad files, input discovery, atomic PNG output."""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ebmm_cli.atomic import atomic_path
from ebmm_cli.errors import EbmmError
from ebmm_cli.imageio import (
    collect_images,
    load_image,
    output_paths,
    read_image,
    resize,
    save_image,
    to_tensor,
)

GRADIENT = np.arange(0, 256, 16, dtype=np.uint8).reshape(4, 4)  # 16 grey levels


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_grayscale_stays_grayscale_and_exact(tmp_path: Path) -> None:
    x = load_image(_save(Image.fromarray(GRADIENT, "L"), tmp_path / "g.png"))
    assert x.shape == (1, 4, 4)
    assert torch.equal(x[0], torch.from_numpy(GRADIENT).float() / 255)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = GRADIENT.astype(np.uint16) * 257  # 16-bit values spanning the full range
    x = load_image(_save(Image.fromarray(arr), tmp_path / "g16.png"))
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert x.shape == (1, 4, 4)
    assert torch.allclose(x[0], torch.from_numpy(GRADIENT).float() / 255, atol=1 / 255)


def test_one_bit_image(tmp_path: Path) -> None:
    bits = Image.fromarray(GRADIENT > 127).convert("1")
    x = load_image(_save(bits, tmp_path / "b.png"))
    assert x.shape == (1, 4, 4) and torch.equal(x[0], torch.from_numpy(GRADIENT > 127).float())


def test_grey_palette_is_grayscale_colour_palette_is_rgb(tmp_path: Path) -> None:
    grey = Image.fromarray(GRADIENT, "L").convert("P")
    assert load_image(_save(grey, tmp_path / "p.png")).shape == (1, 4, 4)
    rgb = np.stack([GRADIENT, 255 - GRADIENT, GRADIENT // 2], -1)
    colour = Image.fromarray(rgb, "RGB").quantize(16)
    x = load_image(_save(colour, tmp_path / "pc.png"))
    assert x.shape == (3, 4, 4)


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 255)  # opaque black
    rgba[0, 1] = (0, 0, 0, 0)  # transparent: white
    rgba[1, :] = (255, 0, 0, 128)
    x = load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert x.shape == (3, 2, 2)
    assert x[:, 0, 0].tolist() == [0, 0, 0] and x[:, 0, 1].tolist() == [1, 1, 1]
    assert x[0, 1, 0] == 1 and abs(x[1, 1, 0].item() - 127 / 255) < 1e-6


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    x = load_image(_save(cmyk, tmp_path / "c.jpg", quality=95))
    assert x.shape == (3, 8, 8) and x[0].mean() > 0.9 and x[1].mean() < 0.1


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "z.png").write_bytes(b"")
    with pytest.raises(EbmmError, match="empty file"):
        read_image(tmp_path / "z.png")


def test_text_file_named_png(tmp_path: Path) -> None:
    (tmp_path / "t.png").write_text("hello, I am text\n")
    with pytest.raises(EbmmError, match="not an image"):
        read_image(tmp_path / "t.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(tmp_path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(EbmmError, match="truncated or corrupt") as err:
        read_image(path)
    assert err.value.subject == str(path)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (grey, 8-bit) with one empty IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(_png_header_only(20_000, 20_000))
    with pytest.raises(EbmmError, match="too large to decode safely"):
        read_image(tmp_path / "bomb.png")


def test_to_tensor_and_resize_keep_range() -> None:
    img = Image.fromarray(np.full((105, 105), 255, np.uint8), "L")
    x = resize(to_tensor(img), 28)
    assert x.shape == (1, 28, 28) and x.max() <= 1 and x.min() >= 0.999


def test_collect_images_mixes_files_folders_and_stdin(omniglot_dir: Path, tmp_path: Path) -> None:
    latin = omniglot_dir / "Latin"
    one = (
        omniglot_dir
        / "Greek"
        / "character03"
        / sorted(p.name for p in (omniglot_dir / "Greek" / "character03").iterdir())[0]
    )
    found = collect_images([str(latin), "-"], io.StringIO(f"\n{one}\n\n"))
    assert len(found) == 41
    assert (
        found[0].rel
        == Path("character01") / sorted(p.name for p in (latin / "character01").iterdir())[0]
    )
    assert found[-1].path == one and found[-1].rel == Path(one.name)


def test_loose_files_keep_paths_below_their_common_folder(omniglot_dir: Path) -> None:
    a = next((omniglot_dir / "Latin" / "character01").iterdir())
    b = next((omniglot_dir / "Greek" / "character03").iterdir())
    found = collect_images([str(a), str(b)])
    assert [f.rel for f in found] == [
        Path("Latin/character01") / a.name,
        Path("Greek/character03") / b.name,
    ]


def test_collect_skips_the_output_folder_and_hidden_files(tmp_path: Path) -> None:
    save_image(torch.zeros(1, 4, 4), tmp_path / "in" / "a.png")
    save_image(torch.zeros(1, 4, 4), tmp_path / "in" / "out" / "a.png")
    (tmp_path / "in" / ".tmp.png").write_bytes(b"")
    found = collect_images([str(tmp_path / "in")], exclude=tmp_path / "in" / "out")
    assert [f.rel for f in found] == [Path("a.png")]


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda p: None, "no such file or folder"),
        (lambda p: p.mkdir(), "no images in this folder"),
    ],
)
def test_collect_refuses_missing_and_empty(tmp_path: Path, setup, match: str) -> None:
    setup(tmp_path / "x")
    with pytest.raises(EbmmError, match=match) as err:
        collect_images([str(tmp_path / "x")])
    assert err.value.subject == str(tmp_path / "x")


def test_output_paths_refuse_overwrites_and_collisions(tmp_path: Path) -> None:
    save_image(torch.zeros(1, 4, 4), tmp_path / "a" / "x.png")
    save_image(torch.zeros(1, 4, 4), tmp_path / "b" / "x.png")
    images = collect_images([str(tmp_path / "a")])
    with pytest.raises(EbmmError, match="would overwrite an input"):
        output_paths(images, tmp_path / "a", force=True)
    with pytest.raises(EbmmError, match="exists; use --force"):
        output_paths(images, tmp_path / "b", force=False)
    assert output_paths(images, tmp_path / "b", force=True) == [tmp_path / "b" / "x.png"]
    both = collect_images([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(EbmmError, match="two inputs"):
        output_paths(both, tmp_path / "c", force=False)


def test_save_image_round_trips_and_leaves_no_temporary(tmp_path: Path) -> None:
    x = torch.rand(3, 5, 7)
    save_image(x, tmp_path / "deep" / "x.png")
    y = load_image(tmp_path / "deep" / "x.png")
    assert y.shape == (3, 5, 7) and (x - y).abs().max() <= 0.5 / 255 + 1e-6
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["x.png"]
    assert Image.open(tmp_path / "deep" / "x.png").mode == "RGB"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "deep" / "x.png").stat().st_mode & 0o777 == 0o666 & ~umask  # as open()'s


def test_a_write_that_fails_half_way_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "x.png"
    save_image(torch.zeros(1, 4, 4), target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("disk full")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def _write_interrupted_at(target: Path, point: int) -> int:
    """Write `target` through `atomic_path`, raising KeyboardInterrupt at the given point
    (counted from 1; 0: never) of those where Python may run a signal's handler: a
    function's start and the return of a call into C. Return how many the write passed."""
    seen = 0

    def interrupt(frame: object, event: str, arg: object) -> None:
        nonlocal seen
        if event in ("call", "c_return"):
            seen += 1
            if seen == point:
                raise KeyboardInterrupt

    sys.setprofile(interrupt)
    try:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
    finally:
        sys.setprofile(None)
    return seen


def test_an_interrupt_at_any_point_of_a_write_leaves_no_temporary(tmp_path: Path) -> None:
    # A Ctrl-C or SIGTERM raises wherever the program is, including one that arrived just
    # before the write began (its handler runs at the next call, signal mask or not): a
    # temporary made before its name was kept was left behind (CI, 2026-11-28).
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    points = _write_interrupted_at(target, 0)
    for point in range(1, points + 1):
        target.write_bytes(b"old")
        try:
            _write_interrupted_at(target, point)
        except KeyboardInterrupt:
            assert target.read_bytes() in (b"old", b"new"), point
        else:
            assert target.read_bytes() == b"new", point
        assert [p.name for p in tmp_path.iterdir()] == ["x.bin"], point
