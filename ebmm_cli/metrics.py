"""How close a retrieval is to its pattern: the meta-training losses and SSIM.

Shared by meta-training (the loss it minimises), its held-out evaluation, `ebmm compare`
and the examples, so every number is measured the same way.
"""

from __future__ import annotations

import torch


def ssim(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM (piqa, 11x11 Gaussian window) of each image pair, (B,)."""
    from piqa import SSIM

    metric = SSIM(n_channels=x.shape[1], reduction="none").to(x.device)
    return metric(x.clamp(0, 1), target.clamp(0, 1))


def reconstruction_loss(kind: str, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pattern loss (B,): `mse` (mean squared error over pixels; the paper's squared
    error up to scale) or `ssim+mse` = 0.5 MSE + 0.5 (1 - SSIM) (the report, piqa SSIM);
    the names are `choices.LOSSES`."""
    mse = (x - target).pow(2).flatten(1).mean(1)
    if kind == "mse":
        return mse
    return 0.5 * mse + 0.5 * (1.0 - ssim(x, target))


def hamming(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixels (bits) on the wrong side of 0.5, per pattern (B,): the paper's error for
    binary strings and for Omniglot, whose characters are nearly binary."""
    return ((x > 0.5) != (target > 0.5)).flatten(1).sum(1).float()
