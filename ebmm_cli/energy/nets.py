"""The energy networks of the paper: `conv` (and `conv-large` for 64x64), `fc`, `rnn`.

Each maps a batch of patterns to one scalar energy per pattern, shape (B,). The written
("fast") weights live in modules named `memory`; everything else is slow and
meta-learned. `dynamic` sets how many output channels/units of the memory layers are
written, and so the memory size in floats.
"""

from __future__ import annotations

import torch
from torch import nn

from ebmm_cli.energy.blocks import (
    ConvGatedRecurrence,
    EnergyHead,
    GatedRecurrence,
    MemoryBottleneck,
    ResBlock,
)


def _halved(size: int, times: int) -> int:
    """Side of a map after `times` stride-2 convolutions with padding 1."""
    for _ in range(times):
        size = (size + 1) // 2
    return size


class ConvEnergy(nn.Module):
    """ResNet with convolutional memory (paper B.3, report C.3).

    Two stride-2 ResBlocks (32, 64 channels), two bottleneck blocks (128 channels,
    bottleneck 64, the second one stride 2) whose 3x3 convolutions write `dynamic`
    channels, a gated recurrent block (3 hops, 128 channels) on the 4x4 map, then
    tanh(Linear 1024) -> Linear 1. Memory = 2 x dynamic x (3*3*64 + 1) floats: dynamic =
    2, 3, 4, 8, 10, 12, 14 gives the paper's 2,308 ... 16,156.

    `large` is the paper's ImageNet 64x64 network (B.4, `conv-large`): ResBlocks of 64
    and 128 channels, both bottleneck blocks of 256 channels (bottleneck 128) with stride
    2, a 256-channel recurrence on the 4x4 map of a 64x64 image. Memory = 2 x dynamic x
    (3*3*128 + 1) floats: dynamic = 8 gives 18,448, the paper's size by inference
    (`../shared/PAPER.md` §1d).
    """

    def __init__(self, channels: int, size: int, dynamic: int, large: bool = False) -> None:
        super().__init__()
        (first, second), width, bottleneck = ((64, 128), 256, 128) if large else ((32, 64), 128, 64)
        self.encoder = nn.Sequential(ResBlock(channels, first), ResBlock(first, second))
        self.block1 = MemoryBottleneck(second, width, bottleneck, dynamic, downscale=large)
        self.block2 = MemoryBottleneck(width, width, bottleneck, dynamic, downscale=True)
        self.recurrence = ConvGatedRecurrence(width, width, hops=3)
        self.head = EnergyHead(width * _halved(size, 4 if large else 3) ** 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.block1(self.encoder(x)))
        return self.head(self.recurrence(h))


class FCEnergy(nn.Module):
    """ResNet with fully-connected memory (paper B.2, report C.2).

    Encoder: ResBlocks of 32, 64, 96 channels (stride 2) -> Linear 256 -> LayerNorm; then
    tanh of a written Linear(256 -> dynamic) concatenated with a static
    Linear(256 -> 512 - dynamic), a gated recurrent block (3 hops, 512 units) and
    tanh(Linear 1024) -> Linear 1. Memory = 257 x dynamic floats.
    """

    def __init__(self, channels: int, size: int, dynamic: int, width: int = 512) -> None:
        super().__init__()
        if not 0 < dynamic < width:
            raise ValueError(f"dynamic must be in 1..{width - 1}, got {dynamic}")
        self.encoder = nn.Sequential(
            ResBlock(channels, 32, downscale=False),
            ResBlock(32, 64, downscale=False),
            ResBlock(64, 96, downscale=False),
            nn.Flatten(),
            nn.Linear(96 * _halved(size, 3) ** 2, 256),
            nn.LayerNorm(256),
        )
        self.memory = nn.Linear(256, dynamic)
        self.static = nn.Linear(256, width - dynamic)
        self.recurrence = GatedRecurrence(width, width, hops=3)
        self.head = EnergyHead(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        h = torch.tanh(torch.cat([self.memory(h), self.static(h)], 1))
        return self.head(self.recurrence(h))


class RNNEnergy(nn.Module):
    """Gated RNN for binary strings (paper B.1): hidden 1024, 5 steps, energy from the
    last state. Only Linear(bits -> dynamic) is written: dynamic = 64 at 128 bits gives
    129 x 64 = 8,256 floats, exactly a 128-unit Hopfield network's budget (the paper's
    pseudocode says (128 - 1) // 2 = 63, i.e. 8,127 floats, just under it). `signed`
    feeds the written layer 2x − 1 instead of x (see `EnergyConfig.signed`).
    """

    def __init__(
        self, bits: int, dynamic: int, hidden: int = 1024, hops: int = 5, signed: bool = False
    ) -> None:
        super().__init__()
        if not 0 < dynamic < hidden:
            raise ValueError(f"dynamic must be in 1..{hidden - 1}, got {dynamic}")
        self.memory = nn.Linear(bits, dynamic)
        self.static = nn.Linear(bits + hidden, hidden - dynamic)
        self.gate = nn.Linear(bits + hidden, hidden)
        self.out = nn.Linear(hidden, 1)
        self.hidden = hidden
        self.hops = hops
        self.signed = signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = x.new_zeros(x.shape[0], self.hidden)
        dynamic = self.memory(2 * x - 1 if self.signed else x)  # the same for every hop
        for _ in range(self.hops):
            z = torch.cat([x, state], 1)
            c = torch.tanh(torch.cat([dynamic, self.static(z)], 1))
            u = torch.sigmoid(self.gate(z))
            state = u * c + (1 - u) * state
        return self.out(state).squeeze(1)
