"""Model and memory files: bit-exact round trips and clean refusal of bad files."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ebmm_cli.energy import EnergyConfig
from ebmm_cli.errors import EbmmError
from ebmm_cli.memory import RuleConfig
from ebmm_cli.model import Model, ModelConfig, write_memory
from ebmm_cli.store import (
    load_memory,
    load_model,
    model_parting,
    read_header,
    save_memory,
    save_model,
)


def _model(read: str = "gd") -> Model:
    torch.manual_seed(0)
    return Model(
        ModelConfig(EnergyConfig("conv", (1, 28, 28)), RuleConfig(read=read), invert_files=True)
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Model]:
    root = tmp_path_factory.mktemp("store")
    model = _model()
    save_model(model, root / "model.safetensors", step=7)
    memory = write_memory(model, torch.rand(3, 1, 28, 28)).detach()
    save_memory(model, memory, root / "memory.safetensors")
    return root / "model.safetensors", root / "memory.safetensors", model


def test_model_round_trip_is_bit_exact(files, tmp_path: Path) -> None:
    path, _, model = files
    loaded = load_model(path)
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b)
    save_model(loaded, tmp_path / "again.safetensors", step=7)
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("read", ["gd", "decoder"])
def test_memory_round_trip_is_bit_exact_and_self_contained(read: str, tmp_path: Path) -> None:
    model = _model(read)
    memory = write_memory(model, torch.rand(4, 1, 28, 28)).detach()
    save_memory(model, memory, tmp_path / "m.safetensors")
    loaded_model, loaded = load_memory(tmp_path / "m.safetensors")
    assert loaded.patterns == 4
    assert all(torch.equal(memory.params[k], loaded.params[k]) for k in memory.params)
    if read == "decoder":
        assert all(torch.equal(memory.decoder[k], loaded.decoder[k]) for k in memory.decoder)
    header = json.loads(
        (tmp_path / "m.safetensors").read_bytes()[8:][
            : struct.unpack("<Q", (tmp_path / "m.safetensors").read_bytes()[:8])[0]
        ]
    )
    meta = header["__metadata__"]
    assert meta["format"] == "ebmm.memory" and meta["format_version"] == "1"
    assert json.loads(meta["memory_floats"]) == model.memory_floats()
    assert json.loads(meta["shape"]) == [1, 28, 28]
    save_memory(loaded_model, loaded, tmp_path / "m2.safetensors")
    assert (tmp_path / "m2.safetensors").read_bytes() == (tmp_path / "m.safetensors").read_bytes()


def _rewrite_header(src: Path, dst: Path, edit) -> None:
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _set_meta(key: str, value: str):
    def edit(header: dict) -> None:
        header["__metadata__"][key] = value

    return edit


def test_model_given_as_memory_and_reverse(files) -> None:
    model_path, memory_path, _ = files
    with pytest.raises(EbmmError, match="is a model") as err:
        load_memory(model_path)
    assert err.value.subject == str(model_path)
    with pytest.raises(EbmmError, match="is a memory"):
        load_model(memory_path)


@pytest.mark.parametrize(
    "case,match",
    [
        ("truncated", "not a readable safetensors"),
        ("not safetensors", "not a readable safetensors"),
        ("version", "format version '99' is not supported"),
        ("no format", "not an ebmm file"),
        ("bad config", "bad model config"),
        ("wrong shape", "has shape"),
        ("nan", "NaN or infinite"),
        ("inf", "NaN or infinite"),
        ("missing", "no such file"),
    ],
)
def test_bad_files_are_refused_with_the_reason(
    files, tmp_path: Path, case: str, match: str
) -> None:
    model_path, _, model = files
    bad = tmp_path / "bad.safetensors"
    if case == "truncated":
        bad.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 2])
    elif case == "not safetensors":
        bad.write_text("hello")
    elif case == "version":
        _rewrite_header(model_path, bad, _set_meta("format_version", "99"))
    elif case == "no format":
        _rewrite_header(model_path, bad, lambda h: h["__metadata__"].pop("format"))
    elif case == "bad config":
        _rewrite_header(model_path, bad, _set_meta("config", '{"energy": 3}'))
    elif case in ("wrong shape", "nan", "inf"):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if case == "wrong shape":
            state["energy.head.out.bias"] = torch.zeros(2)
        else:
            state["energy.head.out.bias"][0] = float(case)
        header = json.loads(
            model_path.read_bytes()[8:][: struct.unpack("<Q", model_path.read_bytes()[:8])[0]]
        )["__metadata__"]
        save_file(state, str(bad), metadata=header)
    with pytest.raises(EbmmError, match=match) as err:
        load_model(bad)
    assert err.value.subject == str(bad)


# Swaps two files onto one name as fast as renames go (hard links: no copying), until
# killed, so that a reader opening the name twice almost always gets two different files.
_REPLACER = """
import os, sys
target, sources, i = sys.argv[1], sys.argv[2:4], 0
while True:
    os.link(sources[i % 2], target + ".tmp")
    os.replace(target + ".tmp", target)
    i += 1
"""


def test_a_file_replaced_while_it_is_read_is_read_whole(tmp_path: Path) -> None:
    """`ebmm write --model RUN/model.safetensors` while the run replaces that file (at
    every evaluation): each load sees the old file or the new one. safetensors'
    `safe_open` opens the path twice: it paired one file's header with the other's
    tensors (refused as damaged, by the checksum) or mapped one file by the other's size
    (refused as not readable), in every run of this test before the fix."""
    a = _model()
    save_model(a, tmp_path / "a.safetensors", step=1)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    save_model(a, tmp_path / "b.safetensors", step=10**9)  # another header length
    target = tmp_path / "model.safetensors"
    save_model(a, target, step=1)
    replacer = subprocess.Popen(
        [sys.executable, "-c", _REPLACER, str(target), str(tmp_path / "a.safetensors"),
         str(tmp_path / "b.safetensors")]
    )  # fmt: skip
    steps = {"1": 0, str(10**9): 0}
    try:
        for _ in range(20):
            load_model(target)  # raises EbmmError on a mixed read
            for _ in range(20):
                steps[read_header(target)["step"]] += 1
    finally:
        replacer.kill()
        replacer.wait()
    assert all(count > 3 for count in steps.values()), steps  # both files were seen


def test_model_parting_forgives_the_last_bits_and_nothing_more(tmp_path: Path) -> None:
    """Resume checks compare model files with it: identical bytes agree, weights a
    rounding apart (within 1e-5 of their scale) agree, a step's worth apart part, and
    another step parts by its header."""
    from ebmm_cli.runconfig import train_config

    model = Model(train_config(dataset="binary", batch_size=4, steps=1, device="cpu").model)
    a, b, c, d, e = (tmp_path / f"{name}.safetensors" for name in "abcde")
    save_model(model, a, step=3)
    save_model(model, b, step=3)
    assert a.read_bytes() == b.read_bytes() and model_parting(a, b) is None
    weight = next(model.parameters())
    with torch.no_grad():
        weight.mul_(1 + 1e-7)
    save_model(model, c, step=3)
    assert a.read_bytes() != c.read_bytes() and model_parting(a, c) is None
    with torch.no_grad():
        weight.add_(1e-3 * weight.abs().max())  # what one lost Adam step does
    save_model(model, d, step=3)
    assert model_parting(a, d)["weights"] > 1e-4
    save_model(model, e, step=4)
    assert model_parting(a, e) == {"header": ["step"]}
