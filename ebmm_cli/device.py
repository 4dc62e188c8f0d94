"""Where tensors live: the `--device` option of every command."""

from __future__ import annotations

import torch

from ebmm_cli.errors import EbmmError


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; `cuda` without a GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EbmmError("--device", f"unknown device {name!r}; use auto, cpu or cuda[:i]") from None
    if device.type not in ("cpu", "cuda"):
        raise EbmmError("--device", f"ebmm runs on cpu or cuda[:i], not {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EbmmError("--device", f"{name} requested but no CUDA GPU is available")
    return device
