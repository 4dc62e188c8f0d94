"""Baselines: recall within capacity, failure beyond it, exact memory sizes."""

from __future__ import annotations

import pytest
import torch

from ebmm_cli.baselines import Hopfield, ModernHopfield, Nearest, make
from ebmm_cli.distort import Distortion
from ebmm_cli.errors import EbmmError


def _patterns(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2, (n, d), generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("rule", ["hebb", "storkey", "pinv"])
def test_hopfield_recalls_a_handful_exactly(rule: str) -> None:
    x = _patterns(4, 128)
    net = Hopfield(rule)
    w = net.write(x)
    assert torch.allclose(w, w.T, atol=1e-5)
    assert torch.equal(net.read(w, x), x)  # stored patterns are fixed points
    q = Distortion.parse("flip:12")(x, torch.Generator().manual_seed(1))
    assert torch.equal(net.read(w, q), x)
    q = Distortion.parse("erase:40")(x, torch.Generator().manual_seed(2))
    assert torch.equal(net.read(w, q), x)


def test_pseudo_inverse_fails_at_as_many_patterns_as_units() -> None:
    """With N >= D the projection is the identity: every state is stable, nothing is
    corrected."""
    x = _patterns(40, 32)
    net = Hopfield("pinv")
    w = net.write(x)
    assert torch.allclose(w, torch.eye(32), atol=1e-4)
    q = Distortion.parse("flip:4")(x, torch.Generator().manual_seed(1))
    assert torch.equal(net.read(w, q), q)


def test_hebb_degrades_beyond_its_capacity() -> None:
    """About 0.14 D patterns: far above it, even clean patterns are no longer fixed points."""
    x = _patterns(60, 128)
    net = Hopfield("hebb")
    errors = (net.read(net.write(x), x) != x).float().sum(1).mean()
    assert errors > 10


def test_modern_hopfield_retrieves_exactly_at_large_beta() -> None:
    x = _patterns(96, 128)
    q = Distortion.parse("erase:64")(x, torch.Generator().manual_seed(3))
    net = ModernHopfield(beta=50.0)
    assert torch.equal(net.read(net.write(x), q), x)


def test_nearest_and_its_pca_code() -> None:
    x = _patterns(10, 64)
    q = Distortion.parse("flip:8")(x, torch.Generator().manual_seed(4))
    assert torch.equal(Nearest().read(Nearest().write(x), q), x)
    full = Nearest(components=10)  # the code spans the batch: exact up to rounding
    assert torch.allclose(full.read(full.write(x), q), x, atol=1e-5)


@pytest.mark.parametrize(
    "name,n,d,floats",
    [
        ("identity", 64, 128, 0),
        ("nearest", 64, 128, 64 * 128),
        ("nearest-pca:16", 64, 1024, 16 * 1024 + 64 * 16 + 1024),
        ("hopfield-hebb", 64, 128, 8_256),
        ("hopfield-storkey", 16, 128, 8_256),
        ("hopfield-pinv", 96, 1024, 1024 * 1023 // 2 + 1024),
        ("modern-hopfield", 32, 128, 32 * 128),
    ],
)
def test_memory_floats_follow_their_formulas(name: str, n: int, d: int, floats: int) -> None:
    assert make(name).memory_floats(n, d) == floats


@pytest.mark.parametrize("name", ["hopfield", "nearest-pca:x", "nearest-pca:0", "lstm"])
def test_unknown_baselines_are_refused(name: str) -> None:
    with pytest.raises(EbmmError) as err:
        make(name)
    assert err.value.subject == "--baselines"
