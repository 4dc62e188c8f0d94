"""Energy networks: shapes, memory sizes, the slow/memory split."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ebmm_cli.energy import EnergyConfig, build_energy, memory_floats, memory_layers, memory_names
from ebmm_cli.energy.blocks import (
    ConvGatedRecurrence,
    MemoryBottleneck,
    ResBlock,
    he_init,
)
from ebmm_cli.model import ModelConfig


@pytest.mark.parametrize(
    "dynamic,floats", [(2, 2_308), (3, 3_462), (4, 4_616), (8, 9_232), (14, 16_156)]
)
def test_conv_memory_sizes_are_the_papers(dynamic: int, floats: int) -> None:
    net = build_energy(EnergyConfig("conv", (1, 32, 32), dynamic))
    assert memory_floats(net) == floats
    assert list(memory_layers(net)) == ["block1.memory", "block2.memory"]


@pytest.mark.parametrize("dynamic", [12, 16, 64])
def test_fc_memory_is_257_per_unit(dynamic: int) -> None:
    assert memory_floats(build_energy(EnergyConfig("fc", (1, 28, 28), dynamic))) == 257 * dynamic


def test_rnn_memory_is_the_hopfield_budget() -> None:
    net = build_energy(EnergyConfig("rnn", (128,)))
    assert memory_floats(net) == 8_256 == 128 * 127 // 2 + 128
    assert net(torch.rand(4, 128)).shape == (4,)


@pytest.mark.parametrize("kind", ["conv", "fc"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 32, 32), (3, 28, 28), (3, 32, 32)])
def test_image_networks_take_both_sizes_and_channel_counts(kind: str, shape) -> None:
    net = build_energy(EnergyConfig(kind, shape))
    x = torch.rand(3, *shape, requires_grad=True)
    e = net(x)
    assert e.shape == (3,) and torch.isfinite(e).all()
    (g,) = torch.autograd.grad(e.sum(), x)
    assert g.shape == x.shape and g.abs().sum() > 0


def test_energies_of_a_batch_are_independent() -> None:
    net = build_energy(EnergyConfig("conv", (1, 28, 28)))
    x = torch.rand(4, 1, 28, 28)
    alone = torch.stack([net(x[i : i + 1])[0] for i in range(4)])
    assert torch.allclose(net(x), alone, atol=1e-5)


def test_memory_and_slow_parameters_are_disjoint() -> None:
    net = build_energy(EnergyConfig("fc", (1, 28, 28), 16))
    names = set(memory_names(net))
    assert names == {"memory.weight", "memory.bias"}
    slow = {n for n, _ in net.named_parameters()} - names
    assert "static.weight" in slow and len(slow) > 10


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError):
        build_energy(EnergyConfig("conv", (1, 28, 32)))
    with pytest.raises(ValueError):
        build_energy(EnergyConfig("conv", (1, 32, 32), 128))


def test_signed_rnn_is_a_reparametrisation_of_the_papers() -> None:
    torch.manual_seed(0)
    signed = build_energy(EnergyConfig("rnn", (128,), signed=True))
    plain = build_energy(EnergyConfig("rnn", (128,)))
    plain.load_state_dict(signed.state_dict())
    with torch.no_grad():  # W(2x - 1) + b = (2W)x + (b - W·1)
        w, b = signed.memory.weight, signed.memory.bias
        plain.memory.weight.copy_(2 * w)
        plain.memory.bias.copy_(b - w.sum(1))
    x = torch.rand(6, 128)
    assert torch.allclose(signed(x), plain(x), atol=1e-5)
    # ...but its written layer's gradient is δ(2x - 1)ᵀ: it moves for 0-bits too.
    bits = (torch.rand(1, 128) > 0.5).float()
    (g,) = torch.autograd.grad(signed(bits).sum(), signed.memory.weight)
    assert (g[:, bits[0] == 0].abs().sum(0) > 0).all()
    (g,) = torch.autograd.grad(plain(bits).sum(), plain.memory.weight)
    assert (g[:, bits[0] == 0] == 0).all()
    with pytest.raises(ValueError, match="rnn option"):
        build_energy(EnergyConfig("conv", (1, 28, 28), signed=True))


def test_model_files_from_before_signed_load_unsigned() -> None:
    old = '{"energy": {"kind": "rnn", "shape": [128], "dynamic": null}, "rules": {}}'
    assert ModelConfig.from_json(old).energy.signed is False


def test_downscaling_skips_pool_before_projecting_which_equals_the_papers_order() -> None:
    """The skip path pools, then applies the 1x1 projection (4x fewer pixels); the paper's
    order, project then pool, gives the same block output: a 1x1 convolution is affine
    per pixel and a padding-free average is a convex combination."""
    torch.manual_seed(0)
    x = torch.randn(3, 16, 9, 9, dtype=torch.float64)
    res, bottleneck = ResBlock(16, 24).double(), MemoryBottleneck(16, 24, 8, 4, True).double()
    pool = partial(F.avg_pool2d, kernel_size=3, stride=2, padding=1, count_include_pad=False)
    y = res.norm2(res.conv2(F.silu(res.norm1(res.conv1(x)))))
    assert torch.allclose(res(x), F.silu(y + pool(res.skip(x))))
    b = bottleneck
    h = torch.tanh(b.reduce_norm(b.reduce(x)))
    h = torch.tanh(b.norm(torch.cat([b.static(h), b.memory(h)], 1)))
    assert torch.allclose(bottleneck(x), h + pool(b.skip(x)))


def test_conv_recurrence_splits_x_and_state_parts_exactly_as_the_paper_concatenates() -> None:
    """`ConvGatedRecurrence` computes the x part of conv[x, h] once and skips the zero
    state's part on the first hop; outputs and gradients must match the pseudocode."""
    torch.manual_seed(0)
    block = ConvGatedRecurrence(6, 8, hops=3).double()
    he_init(block)
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    h = x.new_zeros(2, 8, 4, 4)
    for _ in range(3):
        z = torch.cat([x, h], 1)
        c = torch.tanh(block.candidate_norm(block.candidate(z)))
        u = torch.sigmoid(block.gate_norm(block.gate(z)))
        h = u * c + (1 - u) * h
    ours = block(x)
    assert torch.allclose(ours, h, atol=1e-12)
    params = [x, *block.parameters()]
    grads = torch.autograd.grad(ours.sum(), params), torch.autograd.grad(h.sum(), params)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize(("key", "value", "named"), [("kind", "conv-ae", "--memory conv-ae"),
                                                     ("loss", "l1", "--loss l1")])  # fmt: skip
def test_a_file_of_a_removed_memory_or_loss_is_refused_by_name(
    key: str, value: str, named: str, tmp_path: Path
) -> None:
    """A model trained with the conv-ae memory or the l1 loss, both removed, is refused
    with one line naming the file and what it used."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from ebmm_cli.errors import EbmmError
    from ebmm_cli.model import Model
    from ebmm_cli.runconfig import model_config
    from ebmm_cli.store import load_model, save_model

    path = tmp_path / "old.safetensors"
    save_model(Model(model_config(image_size=28)), path)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    config = json.loads(meta["config"])
    (config["energy"] if key == "kind" else config)[key] = value
    meta["config"] = json.dumps(config)
    path.write_bytes(save(load_file(path), metadata=meta))
    with pytest.raises(EbmmError, match=rf"old.safetensors: .*{named}, which ebmm no longer has"):
        load_model(path)
