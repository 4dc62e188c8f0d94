"""Building blocks of the energy networks (paper appendix B; report C.2/C.3).

Activations are smooth (SiLU, tanh, sigmoid): the energy is differentiated twice, in the
input and in the weights, and the read descends its input gradient, so kinks would give
piecewise-constant gradients. Normalisation is per sample (LayerNorm over C, H, W as
`GroupNorm(1, C)`), never across the batch: one image's energy must not depend on the
other images of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def layer_norm(channels: int) -> nn.GroupNorm:
    """LayerNorm of a (B, C, H, W) map over (C, H, W), with a per-channel affine."""
    return nn.GroupNorm(1, channels)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with a 1x1 projected skip; stride 2 halves the map.

    With `downscale` the skip is average-pooled (the paper's conv memory), else it is a
    strided 1x1 convolution (its fully-connected memory encoder).
    """

    def __init__(self, cin: int, cout: int, stride: int = 2, downscale: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.norm1 = layer_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = layer_norm(cout)
        self.downscale = downscale and stride > 1
        self.skip = nn.Conv2d(cin, cout, 1, stride=1 if self.downscale else stride)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        if self.downscale:  # pool, then project: equal (the 1x1 map is affine), 4x cheaper
            x = F.avg_pool2d(x, 3, stride=self.stride, padding=1, count_include_pad=False)
        return F.silu(y + self.skip(x))


class MemoryBottleneck(nn.Module):
    """The paper's `resblock_bottleneck`: its 3x3 convolution is split into `dynamic`
    written output channels (the module named `memory`) and `channels - dynamic` static
    ones. Memory floats: dynamic x (3 x 3 x bottleneck + 1).
    """

    def __init__(
        self, cin: int, channels: int, bottleneck: int, dynamic: int, downscale: bool
    ) -> None:
        super().__init__()
        if not 0 < dynamic < channels:
            raise ValueError(f"dynamic must be in 1..{channels - 1}, got {dynamic}")
        stride = 2 if downscale else 1
        self.reduce = nn.Conv2d(cin, bottleneck, 1)
        self.reduce_norm = layer_norm(bottleneck)
        self.memory = nn.Conv2d(bottleneck, dynamic, 3, stride=stride, padding=1)
        self.static = nn.Conv2d(bottleneck, channels - dynamic, 3, stride=stride, padding=1)
        self.norm = layer_norm(channels)
        self.skip = nn.Conv2d(cin, channels, 1)
        self.downscale = downscale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.reduce_norm(self.reduce(x)))
        h = torch.tanh(self.norm(torch.cat([self.static(h), self.memory(h)], 1)))
        if self.downscale:  # as in ResBlock: pool, then project
            x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
        return h + self.skip(x)


class ConvGatedRecurrence(nn.Module):
    """A convolutional gated recurrent block run for `hops` steps from a zero state:
    h <- u * tanh(LN(conv3x3[x, h])) + (1 - u) * h, with u = sigmoid(LN(conv1x1[x, h])).

    Each convolution of [x, h] is the sum of its x part, the same every hop and so
    computed once, and its h part, zero on the first hop: 3 hops cost 3 half
    convolutions instead of 3 whole ones. Parameters are the paper's.
    """

    def __init__(self, cin: int, hidden: int, hops: int) -> None:
        super().__init__()
        self.candidate = nn.Conv2d(cin + hidden, hidden, 3, padding=1)
        self.candidate_norm = layer_norm(hidden)
        self.gate = nn.Conv2d(cin + hidden, hidden, 1)
        self.gate_norm = layer_norm(hidden)
        self.hidden = hidden
        self.hops = hops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cin = x.shape[1]
        wc, wg = self.candidate.weight, self.gate.weight
        cx = F.conv2d(x, wc[:, :cin], self.candidate.bias, padding=1)
        gx = F.conv2d(x, wg[:, :cin], self.gate.bias)
        wc_h, wg_h = wc[:, cin:], wg[:, cin:]  # sliced once: one gradient scatter each
        h = None
        for _ in range(self.hops):
            c, g = cx, gx
            if h is not None:
                c = c + F.conv2d(h, wc_h, padding=1)
                g = g + F.conv2d(h, wg_h)
            candidate = torch.tanh(self.candidate_norm(c))
            u = torch.sigmoid(self.gate_norm(g))
            h = u * candidate if h is None else u * candidate + (1 - u) * h
        assert h is not None, "hops >= 1"
        return h


class GatedRecurrence(nn.Module):
    """The vector form: h <- u * LN(tanh(Linear[x, h])) + (1 - u) * h, u = sigmoid(Linear[x, h]).

    (The paper's pseudocode reads `u * c + (1 - u) * c`, surely meaning `(1 - u) * state`.)
    Unlike the convolutional block, splitting [x, h] here measured no faster (fc, 28x28).
    """

    def __init__(self, cin: int, hidden: int, hops: int) -> None:
        super().__init__()
        self.candidate = nn.Linear(cin + hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.gate = nn.Linear(cin + hidden, hidden)
        self.hidden = hidden
        self.hops = hops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.hidden)
        for _ in range(self.hops):
            z = torch.cat([x, h], 1)
            u = torch.sigmoid(self.gate(z))
            h = u * self.norm(torch.tanh(self.candidate(z))) + (1 - u) * h
        return h


class EnergyHead(nn.Module):
    """tanh(Linear 1024) -> Linear 1: the scalar energy of each sample, shape (B,)."""

    def __init__(self, cin: int, width: int = 1024) -> None:
        super().__init__()
        self.hidden = nn.Linear(cin, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x.flatten(1)))).squeeze(1)


def he_init(module: nn.Module) -> None:
    """He et al. (2015) initialisation (the paper's), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
