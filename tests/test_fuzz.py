"""Fuzzing: arbitrary or damaged bytes never crash a reader with anything but `EbmmError`.

Real files are the seeds: an Omniglot PNG, a JPEG, and real model and memory files, each
truncated, overwritten in places or replaced outright by what hypothesis draws.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ebmm_cli.distort import Distortion
from ebmm_cli.energy import EnergyConfig
from ebmm_cli.errors import EbmmError
from ebmm_cli.imageio import decode_image, to_tensor
from ebmm_cli.memory import RuleConfig
from ebmm_cli.model import Model, ModelConfig, write_memory
from ebmm_cli.store import load_memory, load_model, save_memory, save_model

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def seeds(omniglot_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    png = next(omniglot_dir.rglob("*.png")).read_bytes()
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(jpeg, format="JPEG")
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    model = Model(ModelConfig(EnergyConfig("fc", (1, 8, 8), 2), RuleConfig()))
    save_model(model, root / "m.safetensors")
    save_memory(model, write_memory(model, torch.rand(2, 1, 8, 8)).detach(), root / "k.safetensors")
    return {
        "png": png,
        "jpeg": jpeg.getvalue(),
        "model": (root / "m.safetensors").read_bytes(),
        "memory": (root / "k.safetensors").read_bytes(),
    }


def damage(data: bytes, draw: st.DataObject) -> bytes:
    """Truncate, overwrite a few bytes, or replace the whole file, as hypothesis chooses."""
    how = draw.draw(st.sampled_from(["truncate", "overwrite", "replace"]))
    if how == "truncate":
        return data[: draw.draw(st.integers(0, len(data) - 1))]
    if how == "replace":
        return draw.draw(st.binary(max_size=4096))
    out = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 8))):
        # Mostly near the start, where headers and lengths live.
        at = draw.draw(
            st.integers(0, min(len(out) - 1, draw.draw(st.sampled_from([64, 512, 10**9]))))
        )
        out[at] = draw.draw(st.integers(0, 255))
    return bytes(out)


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["png", "jpeg"]))
def test_image_reader_takes_any_bytes(seeds: dict[str, bytes], data, kind: str) -> None:
    raw = damage(seeds[kind], data)
    try:
        img = decode_image(raw, f"fuzz.{kind}")
    except EbmmError as e:
        assert e.subject == f"fuzz.{kind}" and "\n" not in e.problem
        return
    x = to_tensor(img)  # what decodes is a usable image
    assert x.dim() == 3 and 0 <= float(x.min()) <= float(x.max()) <= 1


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["model", "memory"]))
def test_model_and_memory_loaders_take_any_bytes(
    seeds: dict[str, bytes], tmp_path: Path, data, kind: str
) -> None:
    path = tmp_path / f"{kind}.safetensors"
    path.write_bytes(damage(seeds[kind], data))
    load = load_model if kind == "model" else load_memory
    try:
        load(path)
    except EbmmError as e:
        assert e.subject == str(path) and "\n" not in e.problem
    finally:
        path.unlink()


@settings(max_examples=200, deadline=None)
@given(spec=st.one_of(st.text(max_size=30), st.from_regex(r"[a-z]{1,14}:[-0-9.e]{0,8}")))
def test_any_distortion_spec_is_parsed_or_refused(spec: str) -> None:
    try:
        d = Distortion.parse(spec)
    except EbmmError as e:
        assert e.subject.startswith("--") and "\n" not in e.problem
        return
    assert d.spec()
