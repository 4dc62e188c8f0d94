"""Trained models that ship with ebmm: a name works wherever a model path does.

The files live in `ebmm_cli/models/NAME.safetensors` (package data), in half precision
(loading widens them to float32). Each was made by the project's own recipe,
`examples/builtin_models.py` (the exact `ebmm train` command), and carries its
provenance in its header under `provenance`: command, commit, steps, minutes, machine,
and held-out metrics measured on the half-precision file itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ebmm_cli.errors import EbmmError

FOLDER = Path(__file__).parent / "models"
DEFAULT = "omniglot-32"
"""The model `ebmm write` uses without `--model`: the paper's Omniglot protocol (64
characters of 32x32 per memory), whose memory carries its recall: its queries read from
a memory of other characters stay broken (`examples/recall.py`). `omniglot-28` restores
its queries as well from any memory, a denoiser's work, so it is not the default."""


def names() -> list[str]:
    """The built-in models' names, sorted."""
    return sorted(p.stem for p in FOLDER.glob("*.safetensors"))


def resolve(model: Path | str) -> Path:
    """A `--model` value as a file: an existing path as it is, else a built-in name.

    Raises:
        EbmmError: naming the value, with the built-in names, when it is neither.
    """
    path = Path(model)
    if path.exists():
        return path
    builtin = FOLDER / f"{model}.safetensors"
    if "/" not in str(model) and builtin.is_file():
        return builtin
    known = ", ".join(names()) or "none installed"
    raise EbmmError(model, f"no such file, and not a built-in model ({known})")


def describe(path: Path) -> dict[str, Any]:
    """What `ebmm models` lists of one model file: its protocol, pattern shape, memory
    size, N range, its read, the learned and refining steps of its write and its
    provenance (held-out metrics, the unwritten control and the write's time
    included), from its header alone."""
    from ebmm_cli.store import read_header

    meta = read_header(path)
    config = json.loads(meta.get("config", "{}"))
    energy, rules = config.get("energy", {}), config.get("rules", {})
    provenance = json.loads(meta.get("provenance", "{}"))
    return {
        "name": path.stem,
        "dataset": config.get("dataset"),
        "memory": energy.get("kind"),
        "shape": json.loads(meta.get("shape", "[]")),
        "distortion": config.get("distortion"),
        "read": rules.get("read"),
        "binarize": bool(config.get("binarize")),
        "patterns": rules.get("patterns"),
        "refine": rules.get("refine", 0),
        "write_steps": rules.get("write_steps"),
        "memory_floats": provenance.get("memory_floats"),
        "size_bytes": path.stat().st_size,
        **{k: v for k, v in provenance.items() if k != "memory_floats"},
    }
