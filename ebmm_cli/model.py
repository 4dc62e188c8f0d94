"""The model and its memories: what the files hold, and the algorithm applied to them.

`ModelConfig` (stored as JSON in every file) rebuilds a `Model`: the energy network, its
write and read rules, the decoder of the report's decoder read, and the distortion it was
meta-trained on. A `Memory` is what one write produced. `write_memory` and `retrieve`
apply `memory.py`'s algorithm at the level of a model (the energy write, then the
decoder's MAML adaptation; the gradient read or the decoder), for meta-training, the
command line and the benchmarks alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import ebmm_cli.memory as rules_lib
from ebmm_cli.distort import Distortion
from ebmm_cli.energy import EnergyConfig, build_energy, memory_floats, memory_layers
from ebmm_cli.energy.decoder import Decoder
from ebmm_cli.memory import (
    Params,
    RuleConfig,
    Rules,
    energy_grad,
    initial_memory,
    raise_first_non_finite,
    read,
    read_checks,
    write,
)
from ebmm_cli.metrics import iterates_loss

REMOVED = ("conv-ae", "l1")
"""A memory and a loss that were tried and did not help, and were removed: a file that
used one is refused by name."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored as JSON in its files.

    Args:
        energy: the energy network.
        rules: the write and read rules.
        distortion: the distortion it was meta-trained on (`KIND:N`); the decoder read
            also adapts to it when writing.
        loss: the meta-training loss, `mse`, `ssim+mse` or `bce`.
        dataset: what it was meta-trained on.
        invert_files: image files hold dark strokes on light (Omniglot's PNGs, a folder
            trained with `--invert`) while the model sees ink = 1; the CLI inverts files
            on the way in and out. Always true for an image model of Omniglot, whose
            loader inverts: files written before this was enforced say false.
        binarize: its images were thresholded at 0.5 after resizing (`--binarize`: the
            paper's Omniglot is binary images, and resizing to 32x32 greys the strokes'
            edges, which a read that sharpens them turns into Hamming errors); the CLI
            thresholds image files the same way on the way in.
    """

    energy: EnergyConfig
    rules: RuleConfig
    distortion: str = "noise:7"
    loss: str = "mse"
    dataset: str = "omniglot"
    invert_files: bool = False
    binarize: bool = False

    def __post_init__(self) -> None:
        if self.dataset == "omniglot" and len(self.energy.shape) == 3:
            object.__setattr__(self, "invert_files", True)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """Parse `to_json`'s output; raises ValueError, TypeError or KeyError if malformed."""
        raw = json.loads(text)
        if raw["energy"]["kind"] == "kv" and "rekeys" not in raw["rules"]:
            # `rekeys` came with the write rates in units of 1/λmax: an
            # older kv file's rates (absolute, up to 41) would blow every write up
            raise ValueError(
                "a kv model from before its write rates were in units of 1/λmax; "
                "its rates would mean otherwise: retrain it"
            )
        for what, value in (("memory", raw["energy"]["kind"]), ("loss", raw.get("loss"))):
            if value in REMOVED:
                raise ValueError(
                    f"it was trained with --{what} {value}, which ebmm no longer has "
                    "(docs/TRAINING.md: it did not help)"
                )
        energy_raw = dict(raw.pop("energy"))
        energy_raw["shape"] = tuple(int(v) for v in energy_raw["shape"])
        for name in energy_raw.keys() - {f.name for f in fields(EnergyConfig)}:
            # a network option tried and later removed: left at its default (null,
            # false), the network is today's; set, it is not, and the file is refused
            if energy_raw.pop(name) not in (None, False):
                raise ValueError(
                    f"it was trained with the energy option {name}, which ebmm no longer "
                    "has (docs/TRAINING.md: it did not help)"
                )
        return cls(energy=EnergyConfig(**energy_raw), rules=RuleConfig(**raw.pop("rules")), **raw)


class Model(nn.Module):
    """An EBMM: the energy network, its rules and, for the decoder read, the decoder;
    `distortion` is the one it was meta-trained on (the decoder read adapts to it)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.distortion = Distortion.parse(config.distortion)
        self.energy = build_energy(config.energy)
        self.rules = Rules(config.rules, len(memory_layers(self.energy)))
        shape = config.energy.shape
        self.decoder = Decoder(shape[0], shape[1]) if config.rules.read == "decoder" else None
        self.graphs: Any = None  # graphs.InferenceGraphs, when `use_cuda_graphs` turns them on

    def use_cuda_graphs(self, mode: str) -> bool:
        """Replay the write and the gradient read from CUDA graphs (`graphs.py`) where
        `mode` (auto, on, off) asks for them on this model's device; the decoder read and
        appending stay eager. Call it once the model is on its device; returns whether
        graphs are on. EbmmError for `on` off CUDA."""
        from ebmm_cli.graphs import InferenceGraphs, wanted

        device = next(self.parameters()).device
        on = wanted(mode, device) and self.decoder is None
        self.graphs = InferenceGraphs(self) if on else None
        return on

    def memory_floats(self) -> int:
        """Floats a written memory holds: the energy's written layers, plus the decoder's
        adapted weights for the decoder read."""
        floats = memory_floats(self.energy)
        if self.decoder is not None:
            floats += sum(p.numel() for p in self.decoder.parameters())
        return floats


@dataclass
class Memory:
    """A written memory: the written energy parameters θ(T) and, for the decoder read,
    the decoder's adapted parameters; `patterns` counts the stored patterns."""

    params: Params
    decoder: Params | None
    patterns: int

    def detach(self) -> Memory:
        """The same memory cut from the graph that wrote it."""
        return self._map(lambda v: v.detach())

    def to(self, device: torch.device) -> Memory:
        """The same memory on `device`."""
        return self._map(lambda v: v.to(device))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Memory:
        decoder = None if self.decoder is None else {k: fn(v) for k, v in self.decoder.items()}
        return Memory({k: fn(v) for k, v in self.params.items()}, decoder, self.patterns)


def unwritten_memory(model: Model) -> Memory:
    """The memory before any write: θ̄, and for the decoder read the unadapted decoder.
    Reading from it is the control that shows what a write stores (`unwritten_*` in
    held-out metrics, `ebmm compare --unwritten`)."""
    decoder = model.decoder
    return Memory(
        {k: v.detach() for k, v in initial_memory(model.energy).items()},
        None if decoder is None else {k: v.detach() for k, v in decoder.named_parameters()},
        0,
    )


def write_memory(
    model: Model,
    patterns: torch.Tensor,
    create_graph: bool = False,
    generator: torch.Generator | None = None,
    append_to: Memory | None = None,
    check: bool = True,
    replay: bool = True,
) -> Memory:
    """Write a batch into a new `Memory`: the energy write, then (decoder read) the
    decoder's MAML adaptation to the batch. `generator` draws the adaptation's queries.
    `check` as in `memory.write` (meta-training checks its loss instead).

    `replay`: take the model's captured write (`graphs.InferenceGraphs`) where it has
    one. Meta-training passes False: the captured write returns a memory cut from θ̄,
    and a first-order meta-gradient (no `create_graph`) still reaches θ̄ and the write
    rates through θ(T); with the replayed write they learned nothing.

    `append_to` continues writing from that memory instead of θ̄: T more steps on the new
    patterns only (the earlier ones are not seen again, so they may fade). The decoder
    read cannot append: its adaptation needs every stored pattern.
    """
    if append_to is not None and model.decoder is not None:
        raise ValueError("a decoder-read memory cannot be appended to")
    if replay and model.graphs is not None and not create_graph and append_to is None:
        theta, finite = model.graphs.write(patterns)
        if check:
            raise_first_non_finite(finite, "write")
        return Memory(theta, None, patterns.shape[0])
    start = None if append_to is None else append_to.params
    theta = write(
        model.energy, model.rules, patterns, create_graph=create_graph, start=start, check=check
    )
    decoder = None
    if model.decoder is not None:
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        decoder = adapt_decoder(model, theta, patterns, generator, create_graph)
    stored = patterns.shape[0] + (0 if append_to is None else append_to.patterns)
    return Memory(theta, decoder, stored)


def refine_memory(
    model: Model,
    memory: Memory,
    patterns: torch.Tensor,
    steps: int,
    lr: float | None = None,
    generator: torch.Generator | None = None,
) -> Memory:
    """The written floats after `steps` Adam steps (rate `lr`, default the model's
    `RuleConfig.refine_lr`) on the model's own training loss: the read's iterates from
    distorted copies of `patterns` (the model's training distortion, a fresh draw each
    step from `generator`) against the patterns.

    Why: the meta-learned write (T gradient steps on the energy) can fall far short of
    what the energy and the read can hold. On the built-in binary-128, the same 8,256
    floats optimised this way read back 32 stored strings without an error where its own
    write leaves 6.6 bits (`examples/refine_sweep.py`, README); the kv omniglot-32 reads
    64 characters to Hamming 14.7 instead of 21.1 (its own write refines: `RuleConfig.
    refine`), where the conv model before it, whose energy could not hold the batch,
    gained 0.2. The write then costs `steps`
    reads with their backward pass instead of T energy gradients: seconds, not
    milliseconds. It sees only the stored patterns and the distortion the model was
    trained for, as the decoder read's adaptation does (`adapt_decoder`); refining an
    appended memory sees only the new batch, so earlier patterns may fade."""
    if model.decoder is not None:
        raise ValueError("refining a memory needs a read through the energy, not the decoder read")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    lr = lr if lr is not None else model.config.rules.refine_lr
    params = {k: v.detach().clone().requires_grad_(True) for k, v in memory.params.items()}
    optimiser = torch.optim.Adam(params.values(), lr=lr)
    kind = model.config.loss
    with torch.enable_grad():
        for _ in range(steps):
            queries = model.distortion(patterns, generator)
            # The loss is a mean over the patterns: its gradient is the pieces' gradients
            # weighted by their share, so a piece's read graph is all that is held.
            total: Sequence[torch.Tensor] | None = None
            chunk = rules_lib.WRITE_CHUNK
            for qs, ps in zip(queries.split(chunk), patterns.split(chunk), strict=True):
                iterates = read(model.energy, model.rules, params, qs, create_graph=True)
                loss = iterates_loss(kind, iterates, ps) * (ps.shape[0] / patterns.shape[0])
                if not torch.isfinite(loss):
                    raise FloatingPointError("refining the memory left the reals")
                # gradients for the memory alone: the model's own weights stay untouched
                grads = torch.autograd.grad(loss, list(params.values()))
                if total is not None:
                    grads = tuple(a + b for a, b in zip(total, grads, strict=True))
                total = grads
                del iterates, loss
            for param, grad in zip(params.values(), total or [], strict=True):
                param.grad = grad
            optimiser.step()
    return Memory({k: v.detach() for k, v in params.items()}, None, memory.patterns)


def adapt_decoder(
    model: Model,
    theta: Params,
    patterns: torch.Tensor,
    generator: torch.Generator,
    create_graph: bool,
) -> Params:
    """The report's decoder read, adapted with learn2learn's MAML on the written batch:
    a few SGD steps on the error of decoding distorted copies of the patterns (drawn with
    the model's training distortion) back to the patterns."""
    from ebmm_cli._learn2learn import import_learn2learn

    l2l = import_learn2learn()
    rules = model.config.rules
    maml = l2l.algorithms.MAML(model.decoder, lr=rules.decoder_lr, first_order=not create_graph)
    learner = maml.clone()
    noisy = model.distortion(patterns, generator)
    _, grad = energy_grad(model.energy, theta, noisy, create_graph=create_graph)
    for _ in range(rules.decoder_steps):
        learner.adapt(F.mse_loss(learner(noisy, grad), patterns))
    return dict(learner.module.named_parameters())


def retrieve(
    model: Model,
    memory: Memory,
    queries: torch.Tensor,
    create_graph: bool = False,
    steps: int | None = None,
) -> list[torch.Tensor]:
    """Read queries from a memory: the iterates of the gradient read, or the decoder's
    single retrieval. The last element is the answer."""
    if model.decoder is None:
        if model.graphs is not None and not create_graph:
            iterates, finite = model.graphs.read(memory.params, queries, steps)
            raise_first_non_finite(finite, "read", read_checks(model.config.rules))
            return iterates
        return read(model.energy, model.rules, memory.params, queries, create_graph, steps)
    assert memory.decoder is not None, "a decoder model's memory carries decoder weights"
    _, grad = energy_grad(model.energy, memory.params, queries, create_graph=create_graph)
    out = functional_call(model.decoder, memory.decoder, (queries, grad))
    return [out if create_graph else out.detach()]


def same_model(a: Model, b: Model) -> bool:
    """Same configuration and the same slow weights and rules (both on one device): the
    test for appending to a memory that `a` wrote with `b`."""
    if a.config.to_json() != b.config.to_json():
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
