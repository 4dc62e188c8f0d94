"""Energy networks: `build_energy(config)` and the split into slow and memory parameters.

The memory parameters are those of modules named `memory`; `memory_layers` groups them
by layer (weight and bias together), the unit that gets its own write rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ebmm_cli.energy.blocks import he_init
from ebmm_cli.energy.nets import ConvEnergy, FCEnergy, KVConvEnergy, KVEnergy, RNNEnergy

KINDS = ("conv", "conv-large", "fc", "kv", "kv-conv", "rnn")
DEFAULT_DYNAMIC = {
    "conv": 4, "conv-large": 8, "fc": 16, "kv": 72, "kv-conv": 8, "rnn": 64
}  # fmt: skip


@dataclass(frozen=True)
class EnergyConfig:
    """Which energy network, for which patterns.

    Args:
        kind: `conv`, `conv-large` (the paper's 64x64 network), `fc` (images), `kv` (a key-value
            energy, see `KVEnergy`), `kv-conv` (the same with a convolutional written
            layer, see `KVConvEnergy`) or `rnn` (binary strings).
        shape: one pattern's shape: (C, H, W) with H = W for images, (bits,) for `rnn`.
        dynamic: written channels (conv) or units (fc, rnn); None takes the default
            (conv 4 = 4,616 floats, conv-large 8 = 18,448, fc 16 = 4,112,
            kv 72 = 4,608, kv-conv 8 = 4,608, rnn 64 = 8,256).
        prior: kv only: add a learned prior energy w·½‖x − R(x)‖², R a small
            convolutional autoencoder of slow weights (`KVEnergy`), so that a descent
            that follows a blended recall stays on what looks like a character.
        signed: rnn only: the written layer reads 2x − 1 (a Hopfield net's ±1 coding)
            instead of x. The same functions (W(2x − 1) + b = 2Wx + b − W1), but each
            write step's update δ(2x − 1)ᵀ pushes towards a pattern's 0-bits as well as
            its 1-bits; it learned several times faster here. Files written before this
            field existed load as False.
    """

    kind: str = "conv"
    shape: tuple[int, ...] = (1, 28, 28)
    dynamic: int | None = None
    signed: bool = False
    prior: bool = False

    @property
    def dynamic_units(self) -> int:
        return self.dynamic if self.dynamic is not None else DEFAULT_DYNAMIC[self.kind]


def build_energy(config: EnergyConfig) -> nn.Module:
    """A freshly He-initialised energy network for `config`."""
    if config.kind not in KINDS:
        raise ValueError(f"unknown energy {config.kind!r}; ebmm has {', '.join(KINDS)}")
    d = config.dynamic_units
    if config.prior and config.kind != "kv":
        raise ValueError(f"prior is a kv option, not {config.kind}'s")
    if config.kind == "rnn":
        if len(config.shape) != 1:
            raise ValueError(f"rnn takes bit strings (D,), not {config.shape}")
        net: nn.Module = RNNEnergy(config.shape[0], d, signed=config.signed)
    else:
        if config.signed:
            raise ValueError("signed input is an rnn option")
        if len(config.shape) != 3 or config.shape[1] != config.shape[2]:
            raise ValueError(f"{config.kind} takes square images (C, H, H), not {config.shape}")
        channels, size = config.shape[0], config.shape[1]
        if config.kind == "fc":
            net = FCEnergy(channels, size, d)
        elif config.kind == "kv":
            net = KVEnergy(channels, size, d, prior=config.prior)
        elif config.kind == "kv-conv":
            net = KVConvEnergy(channels, size, d)
        else:
            net = ConvEnergy(channels, size, d, large=config.kind == "conv-large")
    he_init(net)
    if isinstance(net, KVEnergy):
        nn.init.zeros_(net.memory.weight)  # θ̄ = 0: an unwritten memory recalls nothing
    return net


def memory_layers(net: nn.Module) -> dict[str, list[str]]:
    """{layer name: [its parameter names]} for the written layers, in module order."""
    layers: dict[str, list[str]] = {}
    for name, _ in net.named_parameters():
        module, _, _ = name.rpartition(".")
        if module.split(".")[-1] == "memory":
            layers.setdefault(module, []).append(name)
    return layers


def memory_names(net: nn.Module) -> list[str]:
    """Names of all written parameters."""
    return [n for names in memory_layers(net).values() for n in names]


def memory_floats(net: nn.Module) -> int:
    """The memory size in floats: the number of written parameters (the paper's x-axis)."""
    params = dict(net.named_parameters())
    return sum(params[n].numel() for n in memory_names(net))
