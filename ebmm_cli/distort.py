"""Distortion models: how a stored pattern is corrupted into a query.

One set of batched, seeded functions serves meta-training (to make queries) and the
`ebmm distort` command, so a query made on the shell is drawn exactly as in training.
Images are (B, C, H, W) in [0, 1]; binary patterns are (B, D) in {0, 1}. Every
distortion draws from an explicit `torch.Generator` and returns a new tensor, clipped
to [0, 1] (the images' domain, onto which the read projects anyway).

- `noise:n`      an n x n block replaced by Gaussian noise (mean 0, std 1; only the first
                 channel of a colour image, as the report does, so that a query has one
                 block rather than three);
- `occlude:n`    an n x n block set to a constant (default 0) or to uniform noise; the
                 paper's image distortion (16 x 16 at 32 x 32);
- `saltpepper:p` each pixel independently, with probability p, set to 0 or 1;
- `flip:k`       k distinct positions inverted (x -> 1 - x);
- `erase:k`      k distinct positions set to 0.5, "unknown" (0 in a Hopfield net's ±1);
- `randomize:k`  k distinct positions replaced by random bits (about k/2 of them flip);
- `eraseblock:k`, `randomizeblock:k`: the same on a contiguous run of k positions
                 (flattened order) at a random start. These four are the readings of the
                 paper's binary-string corruption, "a random part of the pattern (64
                 bits)"; `ebmm compare` reports each.

Each block lies wholly inside its image, at a position drawn per image.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from ebmm_cli.choices import DISTORTIONS as KINDS
from ebmm_cli.errors import EbmmError

_POSITIONAL = ("flip", "erase", "randomize", "eraseblock", "randomizeblock")


def _block_index(
    x: torch.Tensor, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advanced indices (batch, rows, cols) of one random n x n block per image.

    Shapes (B, 1, 1), (B, n, 1), (B, 1, n): they broadcast to (B, n, n) block positions.
    """
    b, _, h, w = x.shape
    top = torch.randint(0, h - n + 1, (b,), generator=generator)
    left = torch.randint(0, w - n + 1, (b,), generator=generator)
    step = torch.arange(n)
    rows = (top[:, None] + step)[:, :, None]
    cols = (left[:, None] + step)[:, None, :]
    return torch.arange(b)[:, None, None], rows.to(x.device), cols.to(x.device)


def noise_block(
    x: torch.Tensor, n: int, generator: torch.Generator, std: float = 1.0
) -> torch.Tensor:
    """Replace a random n x n block of the first channel with N(0, std²) noise.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> q = noise_block(torch.zeros(5, 1, 28, 28), 7, g)
    """
    bi, rows, cols = _block_index(x, n, generator)
    values = torch.randn(x.shape[0], n, n, generator=generator).mul_(std).to(x)
    out = x.clone()
    out[bi, 0, rows, cols] = values
    return out.clamp_(0.0, 1.0)


def occlude_block(
    x: torch.Tensor, n: int, generator: torch.Generator, value: float | None = 0.0
) -> torch.Tensor:
    """Set a random n x n block (all channels) to `value`, or to U(0, 1) noise when None."""
    bi, rows, cols = _block_index(x, n, generator)
    b, c = x.shape[:2]
    if value is None:
        fill = torch.rand(b, n, n, c, generator=generator).to(x)
    else:
        fill = torch.full((b, n, n, c), float(value)).to(x)
    out = x.clone()
    out.permute(0, 2, 3, 1)[bi, rows, cols] = fill  # a view: writes into out
    return out.clamp_(0.0, 1.0)


def _pixel_shape(x: torch.Tensor) -> tuple[int, ...]:
    """Per-pixel mask shape: (B, 1, H, W) for images (all channels together), else x's."""
    return (x.shape[0], 1, *x.shape[2:]) if x.dim() == 4 else tuple(x.shape)


def salt_pepper(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Set each pixel, with probability p, to 0 or 1 (each with probability 1/2)."""
    shape = _pixel_shape(x)
    hit = torch.rand(shape, generator=generator) < p
    salt = (torch.rand(shape, generator=generator) < 0.5).to(x)
    return torch.where(hit.to(x.device), salt.to(x.device), x).clamp_(0.0, 1.0)


def _positions(
    x: torch.Tensor, k: int, generator: torch.Generator, block: bool = False
) -> torch.Tensor:
    """A mask of k distinct positions per pattern (pixels: all channels together), random
    or a contiguous run in flattened order; shaped like `_pixel_shape(x)`."""
    shape = _pixel_shape(x)
    positions = math.prod(shape[1:])
    if block:
        start = torch.randint(0, positions - k + 1, (shape[0], 1), generator=generator)
        index = torch.arange(positions)[None, :]
        mask = (index >= start) & (index < start + k)
    else:
        order = torch.rand(shape[0], positions, generator=generator).argsort(dim=1)
        mask = torch.zeros(shape[0], positions, dtype=torch.bool)
        mask.scatter_(1, order[:, :k], True)
    return mask.reshape(shape).to(x.device)


def flip_bits(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Invert exactly k distinct positions (pixels, all channels together) of each pattern."""
    return torch.where(_positions(x, k, generator), 1.0 - x, x).clamp_(0.0, 1.0)


def erase_bits(
    x: torch.Tensor, k: int, generator: torch.Generator, block: bool = False
) -> torch.Tensor:
    """Set k positions (random, or a contiguous run) to 0.5: unknown, neither 0 nor 1."""
    return torch.where(_positions(x, k, generator, block), 0.5, x)


def randomize_bits(
    x: torch.Tensor, k: int, generator: torch.Generator, block: bool = False
) -> torch.Tensor:
    """Replace k positions (random, or a contiguous run) with uniform random bits."""
    mask = _positions(x, k, generator, block)
    bits = torch.randint(0, 2, mask.shape, generator=generator).to(x.dtype)
    return torch.where(mask, bits.to(x.device), x)


@dataclass(frozen=True)
class Distortion:
    """A distortion model with its parameters; call it on a batch to make queries.

    Fields map one to one to the CLI options of the same names, so error messages
    name the option to fix.

    Args:
        kind: one of `noise`, `occlude`, `saltpepper`, `flip`.
        block: side n of the square block (`noise`, `occlude`).
        std: standard deviation of the Gaussian noise (`noise`).
        value: fill value in [0, 1] for `occlude`; None fills with uniform noise.
        prob: probability of each pixel being hit (`saltpepper`).
        bits: number of positions inverted (`flip`).

    Example:
        >>> d = Distortion.parse("occlude:16")
        >>> queries = d(images, torch.Generator().manual_seed(0))
    """

    kind: str = "noise"
    block: int = 7
    std: float = 1.0
    value: float | None = 0.0
    prob: float = 0.1
    bits: int = 64

    @classmethod
    def parse(cls, spec: str, shape: tuple[int, ...] | None = None) -> Distortion:
        """Parse `KIND:N` (`noise:7`, `occlude:16`, `saltpepper:0.1`, `flip:64`), and check
        it against one pattern's `shape` when given. Errors name `--distortion`, the option
        that takes this form (`check_shape` alone names `ebmm distort`'s options)."""
        kind, colon, arg = spec.partition(":")
        if kind not in KINDS:
            raise EbmmError("--distortion", f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        if colon and not arg.strip():
            raise EbmmError("--distortion", f"{spec!r}: no parameter after the colon")
        if not arg:
            d = cls(kind=kind)
        else:
            try:
                if kind == "saltpepper":
                    d = cls(kind=kind, prob=float(arg))
                elif kind in _POSITIONAL:
                    d = cls(kind=kind, bits=int(arg))
                else:
                    d = cls(kind=kind, block=int(arg))
            except ValueError:
                raise EbmmError("--distortion", f"bad parameter {arg!r} in {spec!r}") from None
        d.validate()
        if shape is not None:
            try:
                d.check_shape(shape)
            except EbmmError as e:
                raise EbmmError("--distortion", f"{spec}: {e.problem}") from None
        return d

    def validate(self) -> None:
        """Check the parameters on their own (not against an image size)."""
        if self.kind not in KINDS:
            raise EbmmError("--kind", f"unknown kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.kind in ("noise", "occlude") and self.block < 1:
            raise EbmmError("--block", f"must be at least 1, got {self.block}")
        if self.kind == "noise" and not (math.isfinite(self.std) and self.std >= 0):
            raise EbmmError("--std", f"must be a finite number >= 0, got {self.std}")
        if self.kind == "occlude" and self.value is not None and not 0.0 <= self.value <= 1.0:
            raise EbmmError("--value", f"must be in [0, 1] or 'uniform', got {self.value}")
        if self.kind == "saltpepper" and not 0.0 <= self.prob <= 1.0:
            raise EbmmError("--prob", f"must be in [0, 1], got {self.prob}")
        if self.kind in _POSITIONAL and self.bits < 0:
            raise EbmmError("--bits", f"must be at least 0, got {self.bits}")

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Check the parameters against one pattern's shape, (C, H, W) or (D,).

        Raises:
            EbmmError: naming the option, e.g. a block larger than the image.
        """
        self.validate()
        if self.kind in ("noise", "occlude"):
            if len(shape) != 3:
                raise EbmmError(
                    "--kind", f"{self.kind} needs images, not patterns of shape {shape}"
                )
            h, w = shape[1:]
            if self.block > min(h, w):
                raise EbmmError("--block", f"{self.block} is larger than the {h}x{w} image")
        if self.kind in _POSITIONAL:
            positions = math.prod(shape[1:]) if len(shape) == 3 else math.prod(shape)
            if self.bits > positions:
                raise EbmmError("--bits", f"{self.bits} is more than the {positions} positions")

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Distort a batch: (B, C, H, W) images or (B, D) patterns, drawn from `generator`."""
        self.check_shape(tuple(x.shape[1:]))
        if self.kind == "noise":
            return noise_block(x, self.block, generator, self.std)
        if self.kind == "occlude":
            return occlude_block(x, self.block, generator, self.value)
        if self.kind == "saltpepper":
            return salt_pepper(x, self.prob, generator)
        if self.kind == "flip":
            return flip_bits(x, self.bits, generator)
        block = self.kind.endswith("block")
        if self.kind.startswith("erase"):
            return erase_bits(x, self.bits, generator, block)
        return randomize_bits(x, self.bits, generator, block)

    def spec(self) -> str:
        """The short `KIND:N` form, as `parse` reads it."""
        arg = {"noise": self.block, "occlude": self.block, "saltpepper": self.prob}.get(
            self.kind, self.bits
        )
        return f"{self.kind}:{arg}"


@dataclass(frozen=True)
class AsTrained:
    """The queries a model was trained on, made from an image file: `ebmm distort --model`.

    Why: a model reads queries in its own space (ink = 1, thresholded, its size), and a
    distortion means something else in a file's values: `occlude`'s block of 0 is the
    paper's blank in the model's space, but on Omniglot's dark-on-light PNGs a 0 is ink.
    So the image goes to the model's space as `ebmm write` takes it (resized, inverted,
    thresholded), is distorted there as in training, and comes back in the file's own
    polarity, so that `ebmm read` maps it to exactly the query the model was trained on.
    """

    distortion: Distortion
    channels: int
    size: int
    invert: bool
    binarize: bool

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One image (C, size, size) in [0, 1], in its file's values, distorted."""
        if x.shape[0] != self.channels and x.shape[0] != 1:
            raise EbmmError("--model", f"takes {self.channels} channel(s), not {x.shape[0]}")
        x = x.expand(self.channels, -1, -1)
        x = 1.0 - x if self.invert else x
        x = (x > 0.5).float() if self.binarize else x
        query = self.distortion(x[None], generator)[0].clamp(0.0, 1.0)
        return 1.0 - query if self.invert else query


def generator_for(seed: int, key: str) -> torch.Generator:
    """A generator seeded from (seed, key): one image's draw depends on nothing else.

    The CLI keys each image by its relative path, so distorting a file alone or inside
    its folder gives the same query.
    """
    # surrogateescape: a file name that is not UTF-8 hashes as the bytes it is
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8", "surrogateescape")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
