"""What a user chooses from, and the defaults that follow from the dataset: in one place.

Torch-free on purpose: the command line builds its choices and help texts from these names
without importing torch, so `ebmm --help` stays fast. The library validates against the
same tuples, so a name accepted by the shell is one the library knows.
"""

from __future__ import annotations

from dataclasses import dataclass

MEMORIES = ("conv", "conv-large", "fc", "kv", "kv-conv", "rnn")
KV_MEMORIES = ("kv", "kv-conv")
"""The key-value energies: they read by `redraw` unless told otherwise, re-key
(`--rekeys`), and write by the delta rule at rate 1 without the gradient-norm term."""
READS = ("gd", "decoder", "redraw")
SCHEDULES = ("learned", "fixed")
LOSSES = ("mse", "ssim+mse", "bce")
DISTORTIONS = (
    "noise",
    "occlude",
    "saltpepper",
    "flip",
    "erase",
    "randomize",
    "eraseblock",
    "randomizeblock",
)
DATASETS = ("omniglot", "fc100", "cifar10", "imagenet64", "binary")
CUDA_GRAPHS = ("auto", "on", "off")
"""`--cuda-graph`: auto (on for CUDA), on (CUDA required), off (launch every kernel)."""

SETTINGS: dict[str, tuple[type, str]] = {
    "lr": (float, "AdamW rate of the network, 1e-3 (the paper's 5e-5 suits its 2e6 steps)"),
    "rule_lr": (float, "AdamW rate of the rules (rates, α, β, step sizes, momenta), 0.03"),
    "write_lr": (float, "write rate η, learned from there or fixed: 0.01 learned, 0.5 "
                 "(conv 0.05) fixed; kv and kv-conv 1, in units of 1/λmax of the keys"),
    "read_lr": (float, "first read step γ(1) of the gradient read: 2 learned, 500 fixed"),
    "write_refine_lr": (float, "Adam's rate of every refinement of the model's memories, 0.01"),
    "schedule": (str, "learned (the paper) or fixed (the report's constants)"),
    "first_order": (bool, "do not backpropagate through the write's own gradients, false"),
    "shots": (int, "images per class in an episode, 1; 0 ignores classes"),
    "episodes_per_step": (int, "episodes written and read per meta-step (per process), 1"),
    "checkpoint_minutes": (float, "save a checkpoint at least this often, 2 (0: every step)"),
    "prior": (bool, "kv: add a learned prior energy w ½‖x − R(x)‖², R a small autoencoder, false"),
    "rates_see_n": (bool, "over a range of N, scale the learned write rates with N, true"),
}  # fmt: skip
"""`ebmm train --set KEY=VALUE`: the rates and run mechanics that few runs change, each
a `runconfig.train_config` keyword, with its type and what it is (and its default)."""


@dataclass(frozen=True)
class DatasetDefaults:
    """What a dataset implies when the user does not say otherwise.

    Args:
        image_size: side of the square images a model is trained on (None: bit strings).
        channels: image channels (None: read from a folder's first image).
        distortion: the query distortion `KIND:N` of training, and of `ebmm compare`
            without a model.
        memory: the energy network.
        inverted: the files hold dark strokes on light while the model sees ink = 1, so
            image files are inverted on the way in and out (Omniglot's PNGs).
    """

    image_size: int | None
    channels: int | None
    distortion: str
    memory: str
    inverted: bool = False


_IMAGES = DatasetDefaults(image_size=32, channels=3, distortion="noise:7", memory="conv")
DEFAULTS = {
    "omniglot": DatasetDefaults(28, 1, "noise:7", "conv", inverted=True),
    "cifar10": _IMAGES,
    "fc100": _IMAGES,
    # The paper's 16x16 block on 32x32 images is a quarter of the side: 32 on 64x64.
    "imagenet64": DatasetDefaults(64, 3, "occlude:32", "conv-large"),
    "binary": DatasetDefaults(None, None, "eraseblock:64", "rnn"),
}
FOLDER = DatasetDefaults(image_size=28, channels=None, distortion="noise:7", memory="conv")


def dataset_defaults(name: str) -> DatasetDefaults:
    """The defaults of a named dataset, or of a folder of images (any other name)."""
    return DEFAULTS.get(name, FOLDER)
