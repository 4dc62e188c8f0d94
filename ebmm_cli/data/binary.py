"""Random binary strings: the paper's first experiment (128 bits, like a 128-unit Hopfield net).

There is no dataset to read: every episode draws fresh uniform bits from a seeded
generator. Patterns are (N, bits) float32 in {0, 1}.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BinaryStrings:
    """Uniform random bit strings of length `bits`."""

    bits: int = 128

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n patterns, (n, bits), each bit 0 or 1 with probability 1/2."""
        return torch.randint(0, 2, (n, self.bits), generator=generator).float()
