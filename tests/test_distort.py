"""Distortion properties: only the block changes, values stay in range, seeds reproduce."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ebmm_cli.distort import KINDS, Distortion, generator_for
from ebmm_cli.errors import EbmmError

shapes = st.tuples(
    st.integers(1, 4), st.sampled_from([1, 3]), st.integers(4, 40), st.integers(4, 40)
)


def _images(shape: tuple[int, int, int, int], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _changed_box(before: torch.Tensor, after: torch.Tensor) -> tuple[int, int] | None:
    """Height and width of the bounding box of changed pixels in one (C, H, W) image."""
    changed = (before != after).any(0).nonzero()
    if len(changed) == 0:
        return None
    span = changed.max(0).values - changed.min(0).values + 1
    return int(span[0]), int(span[1])


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    n=st.integers(1, 12),
    kind=st.sampled_from(["noise", "occlude"]),
    seed=st.integers(0, 2**31),
)
def test_block_distortions_change_only_one_block(shape, n, kind, seed) -> None:
    x = _images(shape, seed)
    n = min(n, shape[2], shape[3])
    d = Distortion(kind=kind, block=n)
    y = d(x, torch.Generator().manual_seed(seed))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert y.min() >= 0.0 and y.max() <= 1.0
    for before, after in zip(x, y, strict=True):
        box = _changed_box(before, after)
        assert box is None or (box[0] <= n and box[1] <= n)
    if kind == "noise" and shape[1] == 3:
        assert torch.equal(x[:, 1:], y[:, 1:])  # colour: only the first channel is noised


@settings(max_examples=40, deadline=None)
@given(shape=shapes, kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31))
def test_same_seed_same_output_and_input_untouched(shape, kind, seed) -> None:
    x = _images(shape, seed)
    copy = x.clone()
    d = Distortion(kind=kind, block=min(4, shape[2], shape[3]), bits=3, prob=0.2)
    a = d(x, torch.Generator().manual_seed(seed))
    b = d(x, torch.Generator().manual_seed(seed))
    assert torch.equal(a, b)
    assert torch.equal(x, copy)


def test_occlusion_fills_a_whole_block_with_the_value() -> None:
    x = torch.ones(3, 3, 32, 32)
    y = Distortion(kind="occlude", block=16, value=0.25)(x, torch.Generator().manual_seed(0))
    for image in y:
        assert ((image == 0.25).all(0)).sum() == 256
        assert _changed_box(torch.ones(3, 32, 32), image) == (16, 16)


def test_uniform_occlusion_is_random() -> None:
    x = torch.zeros(2, 1, 20, 20)
    y = Distortion(kind="occlude", block=5, value=None)(x, torch.Generator().manual_seed(0))
    inside = y[y != 0]
    assert len(inside) == 50 and len(inside.unique()) == 50


def test_noise_block_has_unit_std_before_clipping() -> None:
    # On a grey image (0.5) the clipped N(0, 1) block has a known mean: E[clip(Z, 0, 1)].
    x = torch.full((400, 1, 28, 28), 0.5)
    y = Distortion(kind="noise", block=7)(x, torch.Generator().manual_seed(0))
    block = y[y != 0.5]
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    expected = (pdf(0) - pdf(1)) + (1 - phi(1))  # E[Z; 0<Z<1] + P(Z>1)
    assert abs(block.mean().item() - expected) < 0.01


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 5), d=st.integers(1, 200), k=st.integers(0, 200), seed=st.integers(0, 99))
def test_flip_inverts_exactly_k_bits(b, d, k, seed) -> None:
    k = min(k, d)
    x = torch.randint(0, 2, (b, d), generator=torch.Generator().manual_seed(seed)).float()
    y = Distortion(kind="flip", bits=k)(x, torch.Generator().manual_seed(seed))
    assert ((x != y).sum(1) == k).all()
    assert set(y.unique().tolist()) <= {0.0, 1.0}


@settings(max_examples=40, deadline=None)
@given(p=st.floats(0, 1), seed=st.integers(0, 99))
def test_salt_and_pepper_sets_hit_pixels_to_0_or_1(p, seed) -> None:
    x = torch.full((2, 3, 16, 16), 0.5)
    y = Distortion(kind="saltpepper", prob=p)(x, torch.Generator().manual_seed(seed))
    hit = (y != 0.5).any(1)
    assert ((y == 0) | (y == 1) | (y == 0.5)).all()
    assert ((y[:, 0] == y[:, 1]) & (y[:, 1] == y[:, 2])).all()  # a pixel, all channels
    if p == 0:
        assert not hit.any()
    if p == 1:
        assert hit.all()


@settings(max_examples=80, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    block=st.integers(-5, 50),
    std=st.floats(allow_nan=True),
    value=st.one_of(st.none(), st.floats(allow_nan=True)),
    prob=st.floats(allow_nan=True),
    bits=st.integers(-5, 5000),
)
def test_any_parameters_either_work_or_are_refused_cleanly(
    kind, block, std, value, prob, bits
) -> None:
    d = Distortion(kind=kind, block=block, std=std, value=value, prob=prob, bits=bits)
    x = _images((2, 1, 28, 28), 0)
    try:
        y = d(x, torch.Generator().manual_seed(0))
    except EbmmError as e:
        assert e.subject.startswith("--")
        return
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1


def test_block_larger_than_image_names_the_option() -> None:
    with pytest.raises(EbmmError) as err:
        Distortion(kind="noise", block=29)(torch.zeros(1, 1, 28, 28), torch.Generator())
    assert err.value.subject == "--block" and "28x28" in err.value.problem


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("noise:7", Distortion(kind="noise", block=7)),
        ("occlude:16", Distortion(kind="occlude", block=16)),
        ("saltpepper:0.3", Distortion(kind="saltpepper", prob=0.3)),
        ("flip:64", Distortion(kind="flip", bits=64)),
    ],
)
def test_parse_and_spec_round_trip(spec: str, expected: Distortion) -> None:
    assert Distortion.parse(spec) == expected
    assert expected.spec() == spec


@pytest.mark.parametrize("spec", ["blur:3", "noise:x", "occlude:-1", "saltpepper:2"])
def test_parse_refuses_bad_specs(spec: str) -> None:
    with pytest.raises(EbmmError):
        Distortion.parse(spec)


def test_generator_for_depends_on_seed_and_key_only() -> None:
    a = torch.rand(3, generator=generator_for(1, "a/b.png"))
    assert torch.equal(a, torch.rand(3, generator=generator_for(1, "a/b.png")))
    assert not torch.equal(a, torch.rand(3, generator=generator_for(2, "a/b.png")))
    assert not torch.equal(a, torch.rand(3, generator=generator_for(1, "a/c.png")))


@pytest.mark.parametrize("kind", ["erase", "eraseblock", "randomize", "randomizeblock"])
def test_binary_corruptions_touch_exactly_k_positions(kind: str) -> None:
    x = torch.randint(0, 2, (50, 128), generator=torch.Generator().manual_seed(0)).float()
    y = Distortion.parse(f"{kind}:64")(x, torch.Generator().manual_seed(1))
    if kind.startswith("erase"):
        hit = y == 0.5
        assert (hit.sum(1) == 64).all() and torch.equal(y[~hit], x[~hit])
    else:
        assert set(y.unique().tolist()) <= {0.0, 1.0}
        flipped = (y != x).sum(1).float()
        assert (flipped <= 64).all() and 26 < flipped.mean() < 38  # about half of 64
        hit = None
    if kind == "eraseblock":
        for row in hit:
            where = row.nonzero().squeeze(1)
            assert where.max() - where.min() == 63  # one contiguous run
    if kind == "randomizeblock":
        for a, b in zip(x, y, strict=True):
            where = (a != b).nonzero().squeeze(1)
            assert len(where) == 0 or where.max() - where.min() < 64
