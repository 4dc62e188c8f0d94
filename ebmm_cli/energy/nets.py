"""The energy networks of the paper: `conv` (and `conv-large` for 64x64), `fc`, `rnn`;
and ebmm's own: `kv`, a key-value energy whose written layer is an associative matrix,
and `kv-conv`, whose written layer is a 3x3 convolution.

Each maps a batch of patterns to one scalar energy per pattern, shape (B,). The written
("fast") weights live in modules named `memory`; everything else is slow and
meta-learned. `dynamic` sets how many output channels/units of the memory layers are
written, and so the memory size in floats.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn
from torch.nn import functional as F

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
        return self.head(self.recurrence(self.block2(self.block1(self.encoder(x)))))


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


class KVEnergy(nn.Module):
    """A key-value energy (ebmm's, not the paper's): E(x; θ) = ½‖θ k(x) − v(x)‖², with a
    key k(x) (unit length, 64 floats) and a value v(x) (`dynamic` floats) from one conv
    encoder, and the written layer θ = `memory`, a Linear(64 → dynamic) without bias.

    Why: the paper's write rule, gradient steps on the stored patterns' energy, turns
    this energy into a delta-rule associative memory: each step moves θ by η (1/N) Σi
    (vi − θ ki) kiᵀ, so the write stores key → value pairs, and a query's key recalls
    θ k(q), the value of the stored pattern it resembles. The conv energies' writes
    stored nothing a query could find in any variant tried (docs/TRAINING.md); here association
    is the write's very form. Memory = 64 × dynamic floats (dynamic 72: 4,608). The
    write's rates are in units of 1/λmax of the mean of ki kiᵀ (`kv.delta_write`): below
    2, each step shrinks the residual along every direction, on every episode.

    The read `redraw` decodes the recalled value, beside the query's own value, into an
    image through transposed convolutions that also see the query's encoder maps at each
    resolution (U-Net skips), and a last 3x3 pair of convolutions that also sees the
    query's pixels, so that the visible strokes steer the drawing and the memory's recall
    fills the rest; `forward(x, redraw=True)` is that image. The skips cost no written
    floats, and the run with them read 3.8 pixels better at step 1,200 than the one
    without (docs/TRAINING.md, the kv family). The gradient read (`gd`) descends E itself.
    θ̄ starts at zero: an unwritten memory recalls nothing.
    """

    KEYS = 64

    def __init__(
        self,
        channels: int,
        size: int,
        dynamic: int,
        width: int = 32,
        prior: bool = False,
    ) -> None:
        super().__init__()
        self.prior = _prior_autoencoder(channels, width // 2) if prior else None
        # softplus(-4.6) = 0.01: an untrained R draws grey, whose pull at w = 0.1 made
        # the first reads 40 pixels worse than the query; meta-training tunes w from here
        self.prior_weight = nn.Parameter(torch.tensor(-4.6)) if prior else None
        self.sides = [_halved(size, i) for i in (3, 2, 1, 0)]
        self.width = width
        flat = 4 * width * self.sides[0] ** 2
        self.encoder = nn.Sequential(
            *_halvings([channels, width, 2 * width, 4 * width]), nn.Flatten()
        )
        self.key, self.value, self.memory, self.expand = self._heads(flat, dynamic)
        widths = [4 * width, 2 * width, width, 8]
        self.ups = nn.ModuleList(  # each also takes the encoder's map of its input side
            nn.ConvTranspose2d(a + a, b, 3, stride=2, padding=1) for a, b in pairwise(widths)
        )
        self.out = nn.Sequential(
            nn.Conv2d(8 + channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, channels, 3, padding=1),
        )

    def _heads(self, flat: int, dynamic: int) -> tuple[nn.Module, ...]:
        """The key and value heads on the encoder's output (`flat` floats), the written
        layer (keys → values) and the decoder's first layer (recalled and own value →
        the encoder's last map)."""
        return (
            nn.Linear(flat, self.KEYS),
            nn.Linear(flat, dynamic),
            nn.Linear(self.KEYS, dynamic, bias=False),
            nn.Linear(2 * dynamic, flat),
        )

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The encoder's output (B, flat), and its maps of x, finest first (sides 16, 8,
        4 at 32x32), for the skips."""
        maps = []
        for layer in self.encoder:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                maps.append(x)
        return x, maps

    def _unit_key(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key(h), dim=1)

    def addresses(self, x: torch.Tensor) -> torch.Tensor:
        """The unit keys k(x) (B, KEYS) by which the memory stores and recalls: after a
        write from θ̄ = 0, θ k(q) weighs each stored value by k(q)·k(xi). The same keys
        as `forward`'s, so that identification scores what the recall uses."""
        return self._unit_key(self.encoder(x))

    def associations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unit keys (B, KEYS) and values (B, dynamic) of x, from one encoder pass:
        E(x; θ) = ½‖θ k(x) − v(x)‖² with θ = `memory.weight`, so that `memory.write` can
        take its delta-rule steps on them in closed form instead of differentiating the
        encoder at each step."""
        h = self.encoder(x)
        return self._unit_key(h), self.value(h)

    def forward(
        self, x: torch.Tensor, redraw: bool = False, cue: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The energies (B,); with `redraw`, the image (x.shape) drawn from the value
        recalled by x's key (or by `cue`'s, an earlier drawing of x) and x's own value."""
        h, maps = self._encode(x)
        key = self._unit_key(h if cue is None else self.encoder(cue))
        value = self.value(h)
        recalled = self.memory(key)
        if not redraw:
            e = 0.5 * (recalled - value).pow(2).sum(1)
            if self.prior is not None:
                gap = (x - self.prior(x)).pow(2).flatten(1).sum(1)
                e = e + F.softplus(self.prior_weight) * 0.5 * gap
            return e
        h = F.relu(self.expand(torch.cat([recalled, value], 1)))
        return self._draw(h.view(-1, 4 * self.width, self.sides[0], self.sides[0]), maps, x)

    def _draw(self, h: torch.Tensor, maps: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The image (x.shape) the decoder draws from its first map h (the encoder's last
        map's shape): up through the skips from x's encoder `maps`, then the last pair of
        convolutions that also sees x's pixels."""
        for up, side, skip in zip(self.ups, self.sides[1:], reversed(maps), strict=True):
            h = F.relu(up(torch.cat([h, skip], 1), output_size=[side, side]))
        return torch.sigmoid(self.out(torch.cat([h, x], 1)))


def _halvings(widths: list[int]) -> list[nn.Module]:
    """3x3 stride-2 convolutions, each followed by a ReLU, from `widths[0]` channels
    through the rest: each halves the map's side (`KVEnergy`'s encoder and its prior's
    R start alike)."""
    layers: list[nn.Module] = []
    for a, b in pairwise(widths):
        layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.ReLU()]
    return layers


def _prior_autoencoder(channels: int, width: int) -> nn.Module:
    """R of `KVEnergy`'s prior energy: three stride-2 convolutions down to a map of a
    sixty-fourth of the pixels, three transposed ones back, a sigmoid: too narrow to copy
    an image, so ‖x − R(x)‖² is small only on what it learned to draw."""
    return nn.Sequential(
        *_halvings([channels, width, 2 * width, 2 * width]),
        nn.ConvTranspose2d(2 * width, 2 * width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1),
        nn.Sigmoid(),
    )


class MapFromWhole(nn.Module):
    """A map of `channels` at every position of a (B, w, side, side) map, each position's
    a linear function of the whole map (one Linear over its w·side² floats): a head
    whose output at a position depends on every position's input."""

    def __init__(self, width: int, side: int, channels: int) -> None:
        super().__init__()
        self.side, self.channels = side, channels
        self.linear = nn.Linear(width * side * side, channels * side * side)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h.flatten(1)).view(-1, self.channels, self.side, self.side)


class KVConvEnergy(KVEnergy):
    """`kv` with a convolutional written layer (`kv-conv`): E(x; θ) = ½ mean over the
    positions p of ‖(θ ⋆ K(x))p − V(x)p‖², with K(x) a map of unit keys (64 channels at
    every position of the encoder's last map, 4x4 at 32x32), V(x) a map of values
    (`dynamic` channels), and θ = `memory`, a 3x3 convolution 64 → `dynamic` without
    bias: 576 × dynamic floats (8: 4,608, the paper's conv budget of 4,616 less its 8
    biases).

    Why: a convolutional memory, as the paper's is, where the paper's own (written
    channels of a ResNet's 3x3 convolutions) stored nothing a query could find, where
    `kv`'s written matrix did (docs/TRAINING.md). Here the written weights are a 3x3
    convolution and the write is still the delta rule: a gradient step on the stored
    patterns' energy moves θ by η times the mean over every pattern and position of
    (vp − θ kp) kpᵀ, with kp the 3x3 patch of keys around p (`associations`), so each
    position stores its patch's key → value pair, and a query's patches recall theirs.
    The key and value at each position are functions of the whole encoder output
    (`MapFromWhole`), not of the position's own features: with keys from 1x1
    convolutions, the positions an occlusion covers keyed the query apart from its
    stored character and the written memory read no better than the unwritten one; from
    the whole image, the visible part finds the character at every position
    (docs/TRAINING.md, the kv family). The read draws the recalled value map, beside the
    query's own, as `kv` does (its decoder starts from a 3x3 convolution of the two maps
    instead of a linear layer)."""

    def _heads(self, flat: int, dynamic: int) -> tuple[nn.Module, ...]:
        """`KVEnergy._heads` at every position of the encoder's last map: key and value
        maps from the whole map, the written 3x3 convolution, and a 3x3 first decoder
        layer."""
        w, side = 4 * self.width, self.sides[0]
        return (
            MapFromWhole(w, side, self.KEYS),
            MapFromWhole(w, side, dynamic),
            nn.Conv2d(self.KEYS, dynamic, 3, padding=1, bias=False),
            nn.Conv2d(2 * dynamic, w, 3, padding=1),
        )

    def _last_map(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's last map of x (B, 4w, s, s): its output before the Flatten."""
        return self._encode(x)[1][-1]

    def addresses(self, x: torch.Tensor) -> torch.Tensor:
        """The key maps k(x), flattened (B, KEYS·s²) and scaled to unit length: the
        mean over positions of the keys' products, by which a write from θ̄ = 0 weighs
        each stored pattern's values (up to the patches' overlap)."""
        keys = self._unit_key(self._last_map(x))  # a unit key at every position
        return F.normalize(keys.flatten(1), dim=1)

    def associations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The key patches (B·s², KEYS·9) and values (B·s², dynamic) of x, one row per
        pattern and position, from one encoder pass: E's mean over the rows is the mean
        energy, with θ = `memory.weight` read as a (dynamic, KEYS·9) matrix (`F.unfold`
        orders a patch as the weight does), so that `memory.write` takes its delta-rule
        steps in closed form."""
        h = self._last_map(x)
        patches = F.unfold(self._unit_key(h), 3, padding=1)  # (B, KEYS·9, s²)
        values = self.value(h).flatten(2)  # (B, dynamic, s²)
        return patches.transpose(1, 2).flatten(0, 1), values.transpose(1, 2).flatten(0, 1)

    def forward(
        self, x: torch.Tensor, redraw: bool = False, cue: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The energies (B,); with `redraw`, the image (x.shape) drawn from the value map
        recalled by x's keys (or by `cue`'s, an earlier drawing of x) and x's own."""
        _, maps = self._encode(x)
        h = maps[-1]
        keys = self._unit_key(h if cue is None else self._last_map(cue))
        value = self.value(h)
        recalled = self.memory(keys)
        if not redraw:
            return 0.5 * (recalled - value).pow(2).sum(1).flatten(1).mean(1)
        return self._draw(F.relu(self.expand(torch.cat([recalled, value], 1))), maps, x)
