"""The report's decoder read: a small convolutional decoder, roughly the transpose of the
encoder, that maps a query and the written memory's energy gradient at the query to a
retrieval. Its weights are adapted to each written batch (MAML), so they are written too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ebmm_cli.energy.blocks import layer_norm


class Decoder(nn.Module):
    """(query, energy gradient) -> retrieval in (0, 1).

    Down two stride-2 convolutions (32, 64 channels), up two transposed ones, then a 3x3
    convolution over the upsampled features concatenated with the inputs, and a sigmoid.
    """

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.down1 = nn.Conv2d(2 * channels, 32, 3, stride=2, padding=1)
        self.norm1 = layer_norm(32)
        self.down2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.norm2 = layer_norm(64)
        self.up1 = nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1)
        self.out = nn.Conv2d(32 + 2 * channels, channels, 3, padding=1)
        self.size = size

    def forward(self, query: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        # The gradient's scale depends on the network; only its direction is informative.
        grad = grad / (grad.flatten(1).std(1).view(-1, 1, 1, 1) + 1e-12)
        x = torch.cat([query, grad], 1)
        h = F.silu(self.norm1(self.down1(x)))
        h = F.silu(self.norm2(self.down2(h)))
        h = F.silu(self.up1(h))
        h = F.silu(self.up2(h))
        h = F.interpolate(h, size=query.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(torch.cat([h, x], 1)))
