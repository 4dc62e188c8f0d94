"""How close a retrieval is to its pattern: the meta-training losses and SSIM.

Shared by meta-training (the loss it minimises), its held-out evaluation, `ebmm compare`
and the examples, so every number is measured the same way.
"""

from __future__ import annotations

import functools

import torch

_EPS = 1e-6  # bce's probabilities are kept this far from 0 and 1 (no infinite logs)


def ssim(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM (piqa, 11x11 Gaussian window) of each image pair, (B,)."""
    return _ssim_metric(x.shape[1], x.device)(x.clamp(0, 1), target.clamp(0, 1))


@functools.cache
def _ssim_metric(channels: int, device: torch.device) -> torch.nn.Module:
    """piqa's SSIM module, made once per channel count and device: its window is copied
    to the device once, not on every call (a CUDA graph cannot capture that copy). piqa's
    debug checks are off: they compare tensor values on the host (a device sync, which a
    graph cannot capture either), and `ssim` clamps its inputs into range anyway."""
    from piqa import SSIM
    from piqa.utils import set_debug

    set_debug(False)
    return SSIM(n_channels=channels, reduction="none").to(device)


def reconstruction_loss(kind: str, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pattern loss (B,): `mse` (mean squared error over pixels; the paper's squared
    error up to scale), `ssim+mse` = 0.5 MSE + 0.5 (1 - SSIM) (the report, piqa SSIM), or
    `bce`, the binary cross-entropy of a target in [0, 1] under pixel
    probabilities x, for binary images drawn through a sigmoid (`kv`'s redraw): its
    gradient does not vanish where the sigmoid saturates on the wrong side, as the
    squared error's does. The names are `choices.LOSSES`."""
    if kind == "bce":
        # by hand, not F.binary_cross_entropy, so that NaN passes through as in the
        # other losses (meta-training skips such steps) instead of raising
        p = x.clamp(_EPS, 1.0 - _EPS)
        nll = -(target * p.log() + (1.0 - target) * (1.0 - p).log())
        return nll.flatten(1).mean(1)
    mse = (x - target).flatten(1).pow(2).mean(1)
    if kind == "mse":
        return mse
    return 0.5 * mse + 0.5 * (1.0 - ssim(x, target))


def iterates_loss(kind: str, iterates: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """The training loss of a read: `reconstruction_loss` averaged over the patterns and
    over the read's iterates (each one's error counts, as in the paper's eq. 2)."""
    return sum(reconstruction_loss(kind, x, target).mean() for x in iterates) / len(iterates)


def hamming(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixels (bits) on the wrong side of 0.5, per pattern (B,): the paper's error for
    binary strings and for Omniglot, whose characters are nearly binary."""
    return ((x > 0.5) != (target > 0.5)).flatten(1).sum(1).float()
