"""Baselines for `ebmm compare`, each with its exact memory size in floats.

Every baseline takes patterns as (N, D) in [0, 1] (images flattened) and returns
retrievals in the same space, so the harness treats them and EBMM models alike.

- `hopfield-hebb`, `hopfield-storkey`, `hopfield-pinv`: classic Hopfield networks
  (Hopfield 1982; Storkey 1997; Personnaz et al. 1985) on ±1 patterns (data thresholded
  at 0.5; an erased value 0.5 maps to 0, "unknown"). Weights are symmetric, so a network
  on D units holds D(D-1)/2 weights plus D thresholds: 8,256 floats at D = 128, the
  paper's budget. Retrieval: asynchronous sign updates in a seeded random order until no
  unit changes (at most `sweeps` sweeps).
- `modern-hopfield`: the continuous Hopfield network of Ramsauer et al. (2020):
  ξ <- X softmax(β Xᵀ ξ), with the N stored patterns X (N·D floats) in ±1 coding.
- `nearest`: the stored pattern nearest the query (L2) — the Memory Networks reference,
  memory = all N·D floats; `nearest-pca:K` does it in a K-dimensional PCA code of the
  batch (memory K·D + N·K + D floats), to compare at equal memory size.
- `identity`: the query itself, the floor any method must beat (0 floats).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ebmm_cli.errors import EbmmError

NAMES = (
    "identity",
    "nearest",
    "nearest-pca:K",
    "hopfield-hebb",
    "hopfield-storkey",
    "hopfield-pinv",
    "modern-hopfield",
)


def to_spins(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> {-1, 0, +1}: above 0.5 is +1, below is -1, exactly 0.5 (erased) is 0."""
    return torch.sign(x - 0.5)


def from_spins(s: torch.Tensor) -> torch.Tensor:
    """{-1, 0, +1} -> {0, 0.5, 1}."""
    return (s + 1) / 2


@dataclass(frozen=True)
class Identity:
    """Returns the query: the error of doing nothing."""

    name: str = "identity"

    def memory_floats(self, n: int, d: int) -> int:
        return 0

    def write(self, patterns: torch.Tensor) -> None:
        return None

    def read(self, memory: None, queries: torch.Tensor) -> torch.Tensor:
        return queries.clone()


@dataclass(frozen=True)
class Nearest:
    """Nearest stored pattern (L2), optionally in a `components`-dimensional PCA code."""

    components: int | None = None

    @property
    def name(self) -> str:
        return "nearest" if self.components is None else f"nearest-pca:{self.components}"

    def memory_floats(self, n: int, d: int) -> int:
        if self.components is None:
            return n * d
        k = min(self.components, n, d)
        return k * d + n * k + d

    def write(self, patterns: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.components is None:
            return (patterns.clone(),)
        mean = patterns.mean(0)
        k = min(self.components, *patterns.shape)
        _, _, v = torch.linalg.svd(patterns - mean, full_matrices=False)
        basis = v[:k]  # (K, D)
        return (mean, basis, (patterns - mean) @ basis.T)

    def read(self, memory: tuple[torch.Tensor, ...], queries: torch.Tensor) -> torch.Tensor:
        if self.components is None:
            (stored,) = memory
            return stored[torch.cdist(queries, stored).argmin(1)]
        mean, basis, codes = memory
        nearest = torch.cdist((queries - mean) @ basis.T, codes).argmin(1)
        return (codes[nearest] @ basis + mean).clamp(0, 1)


@dataclass(frozen=True)
class Hopfield:
    """A classic Hopfield network with the `hebb`, `storkey` or `pinv` learning rule."""

    rule: str = "hebb"
    sweeps: int = 20
    seed: int = 0

    @property
    def name(self) -> str:
        return f"hopfield-{self.rule}"

    def memory_floats(self, n: int, d: int) -> int:
        return d * (d - 1) // 2 + d

    def write(self, patterns: torch.Tensor) -> torch.Tensor:
        """The weight matrix (D, D) for the ±1 patterns; zero diagonal for Hebb/Storkey."""
        xi = to_spins(patterns).double()  # (N, D)
        d = xi.shape[1]
        if self.rule == "hebb":
            w = xi.T @ xi / d
            w.fill_diagonal_(0)
        elif self.rule == "storkey":
            w = torch.zeros(d, d, dtype=xi.dtype)
            for p in xi:
                h = w @ p  # local fields h_i = Σ_k w_ik p_k
                # h_ij = h_i - w_ii p_i - w_ij p_j  (the field at i leaving out i and j)
                h_ij = h[:, None] - (w.diagonal() * p)[:, None] - w * p[None, :]
                w = w + (torch.outer(p, p) - p[:, None] * h_ij.T - h_ij * p[None, :]) / d
            w.fill_diagonal_(0)
        elif self.rule == "pinv":
            w = xi.T @ torch.linalg.pinv(xi @ xi.T) @ xi  # projection onto the patterns' span
        else:
            raise EbmmError("--baselines", f"unknown Hopfield rule {self.rule!r}")
        return w.float()

    def read(self, w: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Asynchronous updates, all queries at once, one unit at a time."""
        s = to_spins(queries).clone()
        d = s.shape[1]
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.sweeps):
            changed = False
            for i in torch.randperm(d, generator=generator).tolist():
                field = s @ w[:, i]
                new = torch.where(field > 0, 1.0, torch.where(field < 0, -1.0, s[:, i]))
                if not torch.equal(new, s[:, i]):
                    changed = True
                    s[:, i] = new
            if not changed:
                break
        return from_spins(s)


@dataclass(frozen=True)
class ModernHopfield:
    """Continuous Hopfield retrieval: ξ <- X softmax(β Xᵀ ξ) in ±1 coding, `steps` times."""

    beta: float = 8.0
    steps: int = 3
    name: str = "modern-hopfield"

    def memory_floats(self, n: int, d: int) -> int:
        return n * d

    def write(self, patterns: torch.Tensor) -> torch.Tensor:
        return 2 * patterns - 1  # (N, D)

    def read(self, stored: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        xi = 2 * queries - 1
        for _ in range(self.steps):
            xi = torch.softmax(self.beta * xi @ stored.T / stored.shape[1] ** 0.5, 1) @ stored
        return ((xi + 1) / 2).clamp(0, 1)


def make(name: str) -> Identity | Nearest | Hopfield | ModernHopfield:
    """A baseline by name (see `NAMES`; `nearest-pca:K` takes its code size K)."""
    if name == "identity":
        return Identity()
    if name == "nearest":
        return Nearest()
    if name.startswith("nearest-pca:"):
        try:
            k = int(name.split(":", 1)[1])
        except ValueError:
            k = 0
        if k < 1:
            raise EbmmError("--baselines", f"{name!r}: K must be a positive integer")
        return Nearest(components=k)
    if name in ("hopfield-hebb", "hopfield-storkey", "hopfield-pinv"):
        return Hopfield(rule=name.split("-", 1)[1])
    if name == "modern-hopfield":
        return ModernHopfield()
    raise EbmmError("--baselines", f"unknown baseline {name!r}; choose from {', '.join(NAMES)}")
