"""Named training recipes: `ebmm train --recipe NAME` trains by the options each built-in
model (`ebmm models`) was made with, and `examples/builtin_models.py` exports its run.

Why named: the paper's Omniglot protocol needs twelve options beyond `ebmm train`'s
defaults (the default conv memory stores nothing a query finds at 64 characters,
docs/TRAINING.md); a recipe is those options under one name, the same for a user, the
export and `examples/reproduce.py`.
"""

from __future__ import annotations

from typing import Any

from ebmm_cli.choices import SETTINGS
from ebmm_cli.errors import EbmmError

PAPER_OMNIGLOT: dict[str, Any] = dict(
    dataset="omniglot", image_size=32, batch_size=64, distortion="occlude:16", binarize=True,
    loss="bce", write_lr=1.0, rekeys=1, episodes_per_step=4, write_refine=200,
    write_refine_lr=0.05,
)  # fmt: skip
"""The paper's Omniglot protocol as omniglot-32 trains it, beside its memory: one place,
so that omniglot-32-conv differs from it by the memory alone."""

RECIPES: dict[str, dict[str, Any]] = {
    "omniglot-28": {
        "what": "Omniglot 28x28, 5 characters, noise:7 (the report's protocol)",
        "train": dict(memory="conv", dataset="omniglot", image_size=28, batch_size=5,
                      distortion="noise:7", loss="ssim+mse"),
        "episodes": 100,
    },
    "omniglot-32": {
        "what": "Omniglot 32x32, 64 characters, occlude:16 (the paper's protocol), binarized",
        "train": dict(memory="kv", **PAPER_OMNIGLOT),
        "episodes": 20,
    },
    "omniglot-32-conv": {
        "what": "Omniglot 32x32, 64 characters, occlude:16 (the paper's protocol), binarized; "
                "a convolutional memory",
        "train": dict(memory="kv-conv", **PAPER_OMNIGLOT),
        "episodes": 20,
    },
    "omniglot-32-ebmm": {
        "what": "Omniglot 32x32, 64 characters, occlude:16 (the paper's protocol), binarized; "
                "the paper's mechanism: a delta-rule write, a read by energy descent on the "
                "kv energy and a learned prior energy",
        "train": dict(PAPER_OMNIGLOT, memory="kv", read="gd", rekeys=0, write_refine=0,
                      read_steps=10, batch_size=(16, 64), prior=True),
        "episodes": 20,
    },
    "binary-128": {
        "what": "128-bit strings, 8 to 96 per memory, eraseblock:64 (8,256 floats)",
        "train": dict(dataset="binary", memory="rnn", batch_size=(8, 96),
                      distortion="eraseblock:64", write_lr=1.0, read_lr=5.0, rule_lr=0.1,
                      lr=2e-3, contrast=0.1),
        "episodes": 50,
    },
}  # fmt: skip
"""Per recipe: what it is for, its `train` options (`runconfig.train_config` keywords,
which are `ebmm train`'s options), and how many held-out episodes its export evaluates."""


def recipe_options(name: str) -> dict[str, Any]:
    """The recipe's `train_config` keywords; an unknown name is a one-line error."""
    if name not in RECIPES:
        raise EbmmError("--recipe", f"unknown recipe {name!r}; use one of {', '.join(RECIPES)}")
    return dict(RECIPES[name]["train"])


def recipe_arguments(name: str) -> list[str]:
    """The recipe as `ebmm train` options, spelled out (switches as switches, the
    settings of `choices.SETTINGS` as `--set KEY=VALUE`)."""
    args = []
    for key, value in recipe_options(name).items():
        if key in SETTINGS:
            args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
            continue
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):  # a switch: `--binarize`, not `--binarize True`
            args += [flag] if value else []
            continue
        text = "-".join(map(str, value)) if isinstance(value, tuple) else str(value)
        args += [flag, text]
    return args
