"""Write, read and energy: the EBMM algorithm on one model (Bartunov et al., ICLR 2020).

A memory is the set of written parameters θ of an energy network E(x; θ) (the modules
named `memory`; the rest of the network is slow and fixed by meta-training).

    energy   E(x; θ), one scalar per pattern x in [0, 1]^d.

    write    W(x, θ) = E(x; θ) + α ||∇x E(x; θ)||² + β ||θ − θ̄||²                    (3)
             θ(t+1)  = θ(t) − η(t) · (1/N) Σi ∇θ W(xi, θ(t)),   θ(0) = θ̄             (4)
             η: one positive (softplus) rate per step t, written layer and term (`WRITE_TERMS`).

    read     x̂(k)   = proj(x(k) + ψ(k) v(k))                  Nesterov look-ahead
             v(k+1) = ψ(k) v(k) − γ(k) ∇x E(x̂(k); θ)
             x(k+1) = proj(x(k) + v(k+1)),   x(0) = query,   proj = clip to [0, 1]    (1)
             γ(k) = γ(k−1) σ(ℓk) and ψ(k) = ψ(k−1) σ(mk): non-increasing, learned.

The report's fixed schedule is the same code with constant rules: write rate 0.5 (0.05
for conv), α = 0.5 decayed by 0.95 per step, no β, γ(1) = 500 halved per step, no
momentum. Everything here is plain torch over an explicit dict of memory parameters
(`torch.func.functional_call`), shared by meta-training and the command line;
`create_graph=True` keeps the graph for backpropagating through write and read.
The key-value energies (`kv`, `kv-conv`) take the same write in closed form, and read by
drawing what the memory recalls: `kv.py`, to which `write_flags` and `read_flags` hand
them over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ebmm_cli import kv
from ebmm_cli.energy import memory_layers

Params = dict[str, torch.Tensor]

WRITE_TERMS = ("energy", "grad_norm", "prior")
"""The terms of the write loss W (3), E + α ||∇x E||² + β ||θ − θ̄||², in the order of the
last axis of the write rates: each step and written layer has one rate per term."""


REFINE_LR = 1e-2
"""Adam's rate for `model.refine_memory` unless a model says otherwise
(`RuleConfig.refine_lr`): on the built-in binary-128, 25 steps at 0.01 leave fewer error
bits at 32 to 96 patterns than at 0.03, and 0.1 diverges (worse than the query;
`examples/refine_sweep.py`, one episode per N). The built-in omniglot-32 refines best at
0.03 to 0.05 (`docs/TRAINING.md`, the refinement's rates)."""


@dataclass(frozen=True)
class RuleConfig:
    """The write and read rules: step counts, schedule and initial (or fixed) values.

    Args:
        write_steps: T, gradient steps of writing.
        read_steps: K, gradient steps of reading.
        schedule: `learned` (the paper: all rates meta-learned, starting from the values
            below) or `fixed` (the report: the values below stay constant).
        read: `gd` (descend the energy), `decoder` (the report's MAML-adapted decoder) or
            `redraw` (`kv`: the image the energy draws from what the memory recalls).
        rekeys: the `redraw` read of `kv`: this many more drawings after the first, each
            recalled by the key of the drawing before (the value, maps and pixels stay
            the query's): a completed drawing's key lies nearer its stored key than the
            occluded query's (docs/TRAINING.md, the kv family). 0: one drawing.
        write_lr: initial (learned) or constant (fixed) write rate η.
        alpha: weight of the gradient-norm term; fixed: decayed by `alpha_decay` per step.
            0 drops the term for good (learned too: it is neither computed nor learned).
        alpha_decay: the fixed schedule's decay of α per write step.
        beta: weight of the ||θ − θ̄||² term (0 disables it).
        read_lr: γ(1), the first read step size.
        read_decay: σ(ℓk), the factor between read step sizes (fixed: 0.5).
        momentum: ψ(1), the Nesterov momentum of the read (decays like γ).
        decoder_steps: MAML adaptation steps of the decoder read.
        decoder_lr: MAML inner learning rate of the decoder read.
        patterns: (least, most) patterns per write that the model was meta-trained on;
            None in files from before it was recorded. Over a range (least < most) the
            learned rates see N: see `Rules.write_schedule`.
        rates_see_n: over a range of N, whether the learned rates scale with N (the
            default); False keeps the same rates at every N (an ablation: files that
            say so read as they were trained).
        refine: the model's own write in `ebmm write` and `ebmm compare` (not in a
            training step): after the T learned steps, this many Adam steps on the
            written floats (`model.refine_memory`). 0: the learned write alone. Why: the
            learned write can fall far short of what the energy and read hold; the
            built-in omniglot-32 reads 64 characters to Hamming 14.7 refined 200 steps at
            0.05, 21.1 from its learned write (docs/TRAINING.md, the kv family).
        refine_lr: Adam's rate for every refinement of this model's memories (its
            write's, and `--refine`'s of `ebmm write` and `compare`).
    """

    write_steps: int = 5
    read_steps: int = 5
    schedule: str = "learned"
    read: str = "gd"
    rekeys: int = 0
    write_lr: float = 1e-2
    alpha: float = 1.0
    alpha_decay: float = 0.95
    beta: float = 1e-2
    read_lr: float = 2.0
    read_decay: float = 0.9
    momentum: float = 0.5
    decoder_steps: int = 2
    decoder_lr: float = 0.1
    patterns: tuple[int, int] | None = None
    rates_see_n: bool = True
    refine: int = 0
    refine_lr: float = REFINE_LR

    def __post_init__(self) -> None:
        if self.patterns is not None:  # JSON gives a list
            object.__setattr__(self, "patterns", tuple(int(v) for v in self.patterns))

    def sees_n(self) -> bool:
        """Whether the write rates depend on N: learned rates over a range of N."""
        return (
            self.schedule == "learned"
            and self.rates_see_n
            and self.patterns is not None
            and self.patterns[0] < self.patterns[1]
        )

    @classmethod
    def report(cls, kind: str, **overrides: object) -> RuleConfig:
        """The report's fixed schedule (write rate 0.5, or 0.05 for conv; α = 0.5 ×0.95 per
        step; no β; γ(1) = 500 halved per step; plain gradient descent)."""
        values: dict = dict(
            schedule="fixed",
            write_lr=0.05 if kind.startswith("conv") else 0.5,
            alpha=0.5,
            alpha_decay=0.95,
            beta=0.0,
            read_lr=500.0,
            read_decay=0.5,
            momentum=0.0,
        )
        values.update(overrides)
        return cls(**values)


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y)) if y < 20 else y


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


class Rules(nn.Module):
    """The meta-learned rule parameters: write rates η, α, β, read steps γ and momenta ψ.

    With the fixed schedule they are buffers (saved, never trained); with the learned
    one, parameters kept in range by softplus (rates, α, β) and sigmoids (decays, ψ).
    """

    def __init__(self, config: RuleConfig, layers: int) -> None:
        super().__init__()
        self.config = config
        t, k = config.write_steps, config.read_steps
        learned = config.schedule == "learned"
        values = {
            "write_rate": torch.full((t, layers, len(WRITE_TERMS)), _inv_softplus(config.write_lr)),
            "alpha": torch.tensor(_inv_softplus(config.alpha) if config.alpha > 0 else -30.0),
            "beta": torch.tensor(_inv_softplus(config.beta) if config.beta > 0 else -30.0),
            "read_rate": torch.tensor(_inv_softplus(config.read_lr)),
            "read_decay": torch.full((max(k - 1, 0),), _logit(config.read_decay)),
            "momentum": torch.tensor(_logit(config.momentum) if config.momentum > 0 else -30.0),
            "momentum_decay": torch.full((max(k - 1, 0),), _logit(config.read_decay)),
        }
        if config.sees_n():  # 0: the same rates at every N, to start with
            values["rate_exponent"] = torch.zeros(len(WRITE_TERMS))
        for name, value in values.items():
            if learned:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    def write_schedule(
        self, n: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rates (T, layers, len(WRITE_TERMS)), α (T,) and β (T,) for each write step of
        `n` patterns.

        A model meta-trained over a range of N (`RuleConfig.sees_n`) scales each term's
        rates by (N / N̄)^κ, with N̄ the geometric mean of the range and one learned κ per
        term of W (starting at 0). The gradient terms of (4) are means over the N
        patterns, so each pattern's pull on θ shrinks as 1/N: κ = 1 would turn the mean
        back into a sum, κ = 0 keeps it; meta-training chooses per term.
        """
        t = self.config.write_steps
        rates = F.softplus(self.write_rate)
        if n is not None and self.config.sees_n():
            least, most = self.config.patterns
            rates = rates * (n / math.sqrt(least * most)) ** self.rate_exponent
        if self.config.schedule == "fixed":
            decay = self.config.alpha_decay ** torch.arange(t, device=rates.device)
            alphas = self.config.alpha * decay
            betas = torch.full((t,), self.config.beta, device=rates.device)
            return torch.full_like(rates, self.config.write_lr), alphas, betas
        return rates, F.softplus(self.alpha).expand(t), F.softplus(self.beta).expand(t)

    def read_schedule(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Step sizes γ (K,) and momenta ψ (K,), each non-increasing."""
        if self.config.schedule == "fixed":
            k = torch.arange(self.config.read_steps, device=self.read_rate.device)
            gammas = self.config.read_lr * self.config.read_decay**k
            return gammas, torch.full_like(gammas, self.config.momentum)
        gamma = F.softplus(self.read_rate)
        psi = torch.sigmoid(self.momentum)
        gammas = gamma * torch.cat([gamma.new_ones(1), torch.sigmoid(self.read_decay).cumprod(0)])
        psis = psi * torch.cat([psi.new_ones(1), torch.sigmoid(self.momentum_decay).cumprod(0)])
        return gammas, psis


def initial_memory(net: nn.Module) -> Params:
    """θ̄: the meta-learned initial values of the written parameters."""
    names = {n for layer in memory_layers(net).values() for n in layer}
    return {n: p for n, p in net.named_parameters() if n in names}


def energy(net: nn.Module, memory: Params, x: torch.Tensor) -> torch.Tensor:
    """E(x; θ) for a batch: (B, ...) patterns -> (B,) energies, with θ = `memory`."""
    return functional_call(net, memory, (x,))


def energy_grad(
    net: nn.Module, memory: Params, x: torch.Tensor, create_graph: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E(x), ∇x E(x)); x need not require grad. Energies of a batch are independent, so
    the gradient of their sum is each pattern's own gradient."""
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        e = energy(net, memory, x)
        (grad,) = torch.autograd.grad(e.sum(), x, create_graph=create_graph)
    return e, grad


class WriteGrads(NamedTuple):
    """One write step's derivatives at θ(t); both batch terms are means over the N patterns.

    Attributes:
        energy: E(xi; θ), (N,).
        input_grad: ∇x E(xi; θ), (N, ...), the partial derivative at fixed θ.
        energy_term: ∇θ (1/N) Σi E(xi; θ), by parameter name.
        grad_norm_term: ∇θ (1/N) Σi ||∇x E(xi; θ)||², by parameter name.
    """

    energy: torch.Tensor
    input_grad: torch.Tensor
    energy_term: Params
    grad_norm_term: Params

    def finite(self) -> torch.Tensor:
        """Whether E and ∇x E are all finite, in the order of `_NON_FINITE`: a (2,) bool
        tensor, so that checking it can wait until the write is done."""
        return torch.stack([self.energy.isfinite().all(), self.input_grad.isfinite().all()])


_BatchSums = tuple[torch.Tensor, torch.Tensor, Params, Params]


def _batch_sums_autograd(
    net: nn.Module, theta: Params, patterns: torch.Tensor, create_graph: bool, grad_norm: bool
) -> _BatchSums:
    """E, ∇x E, ∇θ Σi E and ∇θ Σi ||∇x E||² at θ, with torch.autograd; without
    `grad_norm` the last is zeros, and ∇x E is not differentiated again."""
    # A fresh leaf each step: ∇x E is the partial derivative at fixed θ(t). Reusing one
    # leaf would also differentiate through θ(t)'s own dependence on x, which is wrong
    # and grows the graph exponentially with the steps.
    x = patterns.detach().requires_grad_(True)
    values = list(theta.values())
    with torch.enable_grad():
        e = energy(net, theta, x)
        # One backward pass gives both ∇x E (kept differentiable: the gradient-norm term
        # is differentiated again) and ∇θ E summed over the batch.
        gx, *g_energy = torch.autograd.grad(
            e.sum(), [x, *values], create_graph=create_graph or grad_norm
        )
        if grad_norm:
            g_norm = torch.autograd.grad(gx.pow(2).sum(), values, create_graph=create_graph)
        else:
            g_norm = [torch.zeros_like(v) for v in values]
    return e, gx, dict(zip(theta, g_energy, strict=True)), dict(zip(theta, g_norm, strict=True))


def _batch_sums_functional(
    net: nn.Module, theta: Params, patterns: torch.Tensor, grad_norm: bool
) -> _BatchSums:
    """`_batch_sums_autograd` with torch.func (vmap-able): one forward and one backward
    give E, ∇x E and ∇θ Σi E; with `grad_norm` the gradient norm is differentiated once
    more. Transforms take partial derivatives, so no fresh leaf is needed."""

    def norm(th: Params) -> tuple[torch.Tensor, tuple]:
        e, pullback = torch.func.vjp(lambda t, x: functional_call(net, t, (x,)), th, patterns)
        g_theta, gx = pullback(torch.ones_like(e))
        return gx.pow(2).sum(), (e, gx, g_theta)

    if not grad_norm:
        _, (e, gx, g_energy) = norm(theta)
        return e, gx, g_energy, {k: torch.zeros_like(v) for k, v in theta.items()}
    g_norm, (e, gx, g_energy) = torch.func.grad(norm, has_aux=True)(theta)
    return e, gx, g_energy, g_norm


WRITE_CHUNK = 128
"""Patterns per piece of a write step's gradient without `create_graph` (`ebmm write`):
the sums over the batch are accumulated piece by piece, so that the activations held
for the backward pass are a piece's, and a write's peak memory does not grow with N."""


def _chunked_sums(
    net: nn.Module, theta: Params, patterns: torch.Tensor, grad_norm: bool
) -> _BatchSums:
    """`_batch_sums_autograd` (first order) over `WRITE_CHUNK` patterns at a time: the
    θ-gradients of the batch sums are sums of the pieces' (equal within float
    rounding); E and ∇x E come back detached, one value per pattern."""
    energies, input_grads = [], []
    g_energy: Params = {}
    g_norm: Params = {}
    for piece in patterns.split(WRITE_CHUNK):
        e, gx, ge, gn = _batch_sums_autograd(net, theta, piece, False, grad_norm)
        energies.append(e.detach())
        input_grads.append(gx.detach())
        for total, part in ((g_energy, ge), (g_norm, gn)):
            for k, g in part.items():
                total[k] = g.detach() if k not in total else total[k] + g.detach()
        del e, gx, ge, gn  # the piece's graph goes before the next piece's is made
    return torch.cat(energies), torch.cat(input_grads), g_energy, g_norm


def _write_grads(
    net: nn.Module,
    theta: Params,
    patterns: torch.Tensor,
    create_graph: bool,
    functional: bool,
    grad_norm: bool = True,
) -> WriteGrads:
    """The step's `WriteGrads`, with torch.func when `functional` (for `vmap`), else with
    torch.autograd (faster for one episode). Both differentiate sums over the batch, made
    means here by one division by N. Without `create_graph` the θ-gradients are detached:
    first order treats them as constants, and a batch of more than `WRITE_CHUNK` patterns
    is differentiated piece by piece (`_chunked_sums`). Without `grad_norm` (α = 0) the
    gradient-norm term is zeros, and the double backward it costs is skipped."""
    if functional:
        e, gx, g_energy, g_norm = _batch_sums_functional(net, theta, patterns, grad_norm)
    elif not create_graph and patterns.shape[0] > WRITE_CHUNK:
        e, gx, g_energy, g_norm = _chunked_sums(net, theta, patterns, grad_norm)
    else:
        e, gx, g_energy, g_norm = _batch_sums_autograd(
            net, theta, patterns, create_graph, grad_norm
        )
    n = patterns.shape[0]

    def mean(sums: Params) -> Params:
        return {k: (g if create_graph else g.detach()) / n for k, g in sums.items()}

    return WriteGrads(e, gx, mean(g_energy), mean(g_norm))


def write_step(
    net: nn.Module,
    theta: Params,
    theta_bar: Params,
    patterns: torch.Tensor,
    layers: list[list[str]],
    eta: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    create_graph: bool = False,
    functional: bool = False,
    grad_norm: bool = True,
) -> tuple[Params, WriteGrads]:
    """One write step θ(t) -> θ(t+1): gradient descent on the write loss W of (3), per (4).

        W(x, θ) = E(x; θ) + α ||∇x E(x; θ)||² + β ||θ − θ̄||²                          (3)
                  energy    grad_norm           prior
        θ(t+1)  = θ(t) − η(t) · (1/N) Σi ∇θ W(xi, θ(t))                              (4)

    η(t) holds one rate per written layer and term of W (`WRITE_TERMS`), so a layer's
    parameter p moves by

        − η_energy ∇p mean E − η_grad_norm α ∇p mean ||∇x E||² − η_prior β 2 (p − p̄).

    Both batch terms are means over the N patterns, taken the same way by both gradient
    implementations: the gradient of the sum, divided by N. ∇x E is the partial
    derivative at fixed θ(t).

    Args:
        net: the energy network.
        theta: θ(t).
        theta_bar: θ̄, the anchor of the prior term.
        patterns: the N patterns xi being written.
        layers: the written parameters' names by layer (`memory_layers`), one per row of
            `eta`.
        eta: η(t), the rates (layers, len(WRITE_TERMS)).
        alpha: α(t).
        beta: β(t).
        create_graph: as in `write`; without it the step's gradients are constants.
        functional: as in `write`.
        grad_norm: compute the gradient-norm term (False: α is 0 for good, `RuleConfig`).

    Returns:
        θ(t+1), and the step's `WriteGrads` (its E and ∇x E are for `write`'s check).
    """
    grads = _write_grads(net, theta, patterns, create_graph, functional, grad_norm)
    new = {}
    for names, (r_energy, r_grad_norm, r_prior) in zip(layers, eta, strict=True):
        for n in names:
            new[n] = theta[n] - (
                r_energy * grads.energy_term[n]
                + r_grad_norm * alpha * grads.grad_norm_term[n]
                + r_prior * beta * 2 * (theta[n] - theta_bar[n])
            )
    return new, grads


_NON_FINITE = ("the energy", "the energy gradient")


def read_checks(config: RuleConfig) -> str:
    """What a read's one finiteness check per step covers, for its error: the energy
    gradient of the gradient read, the image the `redraw` read draws."""
    return "the redrawn image" if config.read == "redraw" else _NON_FINITE[1]


def raise_first_non_finite(finite: torch.Tensor, kind: str, checks: str = _NON_FINITE[1]) -> None:
    """Raise FloatingPointError naming the first `kind` step ("write" or "read"), and
    within it the first of `_NON_FINITE` checked (or, with one check per step, what
    `checks` names: `read_checks`), that left the reals.

    `finite` is (steps, checks) bools recorded on the device by `write_flags` or
    `read_flags`: looked at once after the last step, with one host sync, so that the
    steps never wait for the device (and can be captured in a CUDA graph); the steps
    after a non-finite one only spread NaN. A write checks the energy and its gradient,
    a read the gradient only."""
    if finite.numel() == 0:  # no steps
        return
    bad = (~finite).flatten().nonzero()
    if len(bad):
        step, what = divmod(int(bad[0]), finite.shape[1])
        named = _NON_FINITE[what] if finite.shape[1] == len(_NON_FINITE) else checks
        raise FloatingPointError(
            f"{kind} step {step + 1} of {finite.shape[0]}: {named} holds NaN or infinite values"
        )


def write(
    net: nn.Module,
    rules: Rules,
    patterns: torch.Tensor,
    create_graph: bool = False,
    start: Params | None = None,
    functional: bool = False,
    check: bool = True,
) -> Params:
    """Write a batch of clean patterns (N, ...) into a new memory: T steps of (4) on (3).

    Args:
        net: the energy network; its memory modules' current values are θ̄.
        rules: write rates, α and β.
        patterns: the batch X to store.
        create_graph: keep the graph of each step, for second-order meta-gradients.
            Without it, each step's gradient is a constant (first order), but the result
            still depends on θ̄ and on the rates.
        start: θ(0), a memory written before (appending); default θ̄. The β term still
            pulls towards θ̄.
        functional: take the gradients with torch.func instead of torch.autograd, so
            that `torch.func.vmap` can write many episodes at once (`write_episodes`);
            the same values, no finiteness checks, and 10-20% slower for one episode.
        check: without `create_graph` or `functional`, raise if a step left the reals
            (one host sync after the last step). Meta-training checks its loss instead.

    Returns:
        θ(T), the written memory: {parameter name: tensor}.

    Raises:
        FloatingPointError: with `check`, naming the first step whose energy or gradient
            is NaN or infinite.

    Example:
        >>> memory = write(net, rules, images)      # images (N, 1, 28, 28)
        >>> retrieved = read(net, rules, memory, queries)[-1]
    """
    theta, finite = write_flags(net, rules, patterns, create_graph, start, functional)
    if check and not create_graph and not functional:
        raise_first_non_finite(finite, "write")
    return theta


def write_flags(
    net: nn.Module,
    rules: Rules,
    patterns: torch.Tensor,
    create_graph: bool = False,
    start: Params | None = None,
    functional: bool = False,
) -> tuple[Params, torch.Tensor]:
    """`write` without the check: θ(T), and each step's finiteness of E and ∇x E as a
    (T, 2) bool tensor on the device, for `raise_first_non_finite` once the caller may
    wait for the device (after replaying a captured write, say). An energy with
    `associations` (kv) takes the same steps in closed form: `kv.delta_write`."""
    theta_bar = initial_memory(net)
    theta = dict(theta_bar)
    if start is not None:  # a stored memory is a constant: differentiate from it
        theta = {
            k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in start.items()
        }
    rates, alphas, betas = rules.write_schedule(patterns.shape[0])
    grad_norm = rules.config.alpha > 0
    if getattr(net, "associations", None) is not None:  # kv: the delta rule, in kv.py
        if grad_norm:
            raise ValueError("a key-value energy writes without the gradient-norm term (α = 0)")
        theta, flags = kv.delta_write(
            net, theta, theta_bar, patterns, rates, betas, create_graph, functional, WRITE_CHUNK
        )
        return theta, _stack_flags(flags, 2, patterns.device)
    layers = list(memory_layers(net).values())
    finite: list[torch.Tensor] = []
    for eta, alpha, beta in zip(rates, alphas, betas, strict=True):
        theta, grads = write_step(
            net, theta, theta_bar, patterns, layers, eta, alpha, beta, create_graph, functional,
            grad_norm,
        )  # fmt: skip
        if not functional:  # under vmap the flags would be batched; nobody checks them
            finite.append(grads.finite())
    return theta, _stack_flags(finite, 2, patterns.device)


def _stack_flags(finite: list[torch.Tensor], checks: int, device: torch.device) -> torch.Tensor:
    if not finite:
        return torch.ones(0, checks, dtype=torch.bool, device=device)
    return torch.stack(finite)


def read(
    net: nn.Module,
    rules: Rules,
    memory: Params,
    queries: torch.Tensor,
    create_graph: bool = False,
    steps: int | None = None,
    functional: bool = False,
) -> list[torch.Tensor]:
    """Read: K steps of projected gradient descent with Nesterov momentum, per (1).

    Args:
        memory: a written memory (from `write`).
        queries: x(0), (B, ...) in [0, 1].
        create_graph: keep the graph (meta-training); otherwise iterates are detached.
        steps: K; default the model's. Beyond the learned schedule the last step size
            and momentum are kept.
        functional: ∇x E with torch.func, for `torch.func.vmap` (see `write`).

    Returns:
        The iterates [x(1), ..., x(K)]; the last one is the retrieval.

    Raises:
        FloatingPointError: without `create_graph`, naming the first step whose energy
            gradient (or redrawn image) is NaN or infinite (checked once, after the
            last step).
    """
    iterates, finite = read_flags(net, rules, memory, queries, create_graph, steps, functional)
    if not create_graph and not functional:
        raise_first_non_finite(finite, "read", read_checks(rules.config))
    return iterates


def read_flags(
    net: nn.Module,
    rules: Rules,
    memory: Params,
    queries: torch.Tensor,
    create_graph: bool = False,
    steps: int | None = None,
    functional: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`read` without the check: the iterates, and each step's finiteness of ∇x E as a
    (K, 1) bool tensor on the device (see `write_flags`). The `redraw` read of the
    key-value energies is `kv.redraw_read`: 1 + `RuleConfig.rekeys` drawings, each
    checked."""
    if rules.config.read == "redraw":  # kv's read: what the memory recalls, drawn (kv.py)
        rekeys = rules.config.rekeys
        iterates, flags = kv.redraw_read(net, memory, queries, rekeys, create_graph, functional)
        return iterates, _stack_flags(flags, 1, queries.device)
    gammas, psis = rules.read_schedule()
    k_steps = steps if steps is not None else len(gammas)
    if not create_graph:
        gammas, psis = gammas.detach(), psis.detach()
    x = queries
    v = torch.zeros_like(queries)
    iterates, finite = [], []
    for k in range(k_steps):
        gamma, psi = gammas[min(k, len(gammas) - 1)], psis[min(k, len(psis) - 1)]
        look = (x + psi * v).clamp(0.0, 1.0)
        if functional:
            g = torch.func.grad(lambda y: functional_call(net, memory, (y,)).sum())(look)
        else:
            _, g = energy_grad(net, memory, look, create_graph=create_graph)
            finite.append(g.isfinite().all()[None])
        v = psi * v - gamma * g
        x = (x + v).clamp(0.0, 1.0)
        if not create_graph:
            x, v = x.detach(), v.detach()
        iterates.append(x)
    return iterates, _stack_flags(finite, 1, queries.device)


def write_episodes(
    net: nn.Module, rules: Rules, patterns: torch.Tensor, create_graph: bool = False
) -> Params:
    """Write E episodes (E, N, ...) into E memories at once: `write` under
    `torch.func.vmap`, so each kernel runs once over all episodes instead of E times
    (the memories become grouped weights). Returns {name: (E, ...)}."""
    return torch.func.vmap(lambda x: write(net, rules, x, create_graph, functional=True))(patterns)


def read_episodes(
    net: nn.Module,
    rules: Rules,
    memories: Params,
    queries: torch.Tensor,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    """Read E episodes' queries (E, B, ...) from their memories (`write_episodes`) at
    once: `read` under `torch.func.vmap`. Returns the iterates, each (E, B, ...)."""
    return torch.func.vmap(lambda m, q: read(net, rules, m, q, create_graph, functional=True))(
        memories, queries
    )
