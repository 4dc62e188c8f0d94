"""The key-value energies' write and read (`kv`, `kv-conv`), beside the paper's in `memory.py`.

For an energy E(x; θ) = ½‖θ k(x) − v(x)‖² (`associations`: unit keys k and values v from
one encoder pass, one written matrix θ), the paper's write (4) without the gradient-norm
term is the delta rule

    θ(t+1) = θ(t) − η(t) (1/N) Σi (θ(t) ki − vi) kiᵀ − η_prior β 2 (θ(t) − θ̄),

which `delta_write` takes in closed form on the keys and values, its energy rates in units
of 1/λmax of the episode's keys (`delta_curvature`). The read `redraw` draws the image the
energy decodes from the value θ k(q) a query's key recalls (`redrawn`), `rekeys` more
times by the key of the drawing before (`redraw_read`). `memory.write_flags` and
`memory.read_flags` hand these energies and that read over to here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]


def top_eigenvalue(gram: torch.Tensor, squarings: int = 7) -> torch.Tensor:
    """The largest eigenvalue of a symmetric positive semi-definite matrix, by squaring
    it `squarings` times (rescaled to unit trace each time): tr(G P) / tr(P) with
    P ∝ G^(2^squarings) weighs each eigenvalue λi by λi^128, so the largest dominates
    even with a gap of 5%. Why not `eigvalsh`: a fixed number of matmuls needs no start
    vector, no host sync (CUDA graphs) and works under `vmap`."""
    power = gram
    for _ in range(squarings):
        power = power @ power
        power = power / power.diagonal().sum().clamp_min(1e-30)
    return (gram * power).sum() / power.diagonal().sum().clamp_min(1e-30)


def delta_curvature(keys: torch.Tensor) -> torch.Tensor:
    """λmax of (1/N) Σi ki kiᵀ for the stored keys (N, d) of an energy ½‖θ k − v‖²: the
    largest curvature of the mean energy in θ, by which `delta_write` divides the energy
    term's rates (a constant: no gradient). Why: a delta-rule step with rate η shrinks
    the residual along an eigenvalue λ of that matrix by 1 − ηλ; rates meta-learned in
    absolute units reached ηλmax = 3.3-4.5, tuned to the typical episode, and the
    episodes with the most similar keys (a larger λmax) blew up (docs/TRAINING.md, the
    kv family). Divided, a rate is in units of 1/λmax (1: the top direction solved in
    one step), the same polynomial in λ/λmax for every episode."""
    keys = keys.detach()
    return top_eigenvalue(keys.T @ keys / keys.shape[0])


def delta_write(
    net: nn.Module,
    theta: Params,
    theta_bar: Params,
    patterns: torch.Tensor,
    rates: torch.Tensor,
    betas: torch.Tensor,
    create_graph: bool,
    functional: bool,
    chunk: int,
) -> tuple[Params, list[torch.Tensor]]:
    """The write (4) of an energy with `associations` (one written matrix θ; kv-conv's 3x3
    convolution read as one, (out, in·9)) without the gradient-norm term, from θ(0) =
    `theta`: T delta-rule steps with `rates` (T, 1, len(WRITE_TERMS)) and `betas` (T,),
    the energy rates divided by the episode's `delta_curvature`. Why closed form: the
    autograd write ran the encoder forward and backward (to the pixels, for ∇x E) at each
    of the T steps, and meta-training differentiated all of them again.

    Returns θ(T) and each step's finiteness of the residual and the gradient (none under
    `functional`). Without `create_graph` the gradient is a constant, as in the paper's
    write. Without `create_graph` the keys and values are constants too, computed `chunk`
    patterns at a time, so that a write's peak memory does not grow with N beyond the
    patterns themselves."""
    if create_graph or functional:
        keys, values = net.associations(patterns)
    else:
        with torch.no_grad():
            pieces = [net.associations(piece) for piece in patterns.split(chunk)]
        keys = torch.cat([k for k, _ in pieces])
        values = torch.cat([v for _, v in pieces])
    lam = delta_curvature(keys)
    ((name, w),) = theta.items()
    shape = w.shape
    w, start = w.reshape(shape[0], -1), theta_bar[name].reshape(shape[0], -1)
    n = keys.shape[0]
    finite: list[torch.Tensor] = []
    for eta, beta in zip(rates, betas, strict=True):
        r_energy, _, r_prior = eta[0]
        residual = keys @ w.T - values  # (N, dynamic): θ ki − vi
        grad = residual.T @ keys / n
        if not create_graph:
            grad = grad.detach()
        if not functional:
            finite.append(torch.stack([residual.isfinite().all(), grad.isfinite().all()]))
        w = w - r_energy / lam * grad - r_prior * beta * 2 * (w - start)
    return {name: w.reshape(shape)}, finite


def redrawn(
    net: nn.Module, memory: Params, x: torch.Tensor, cue: torch.Tensor | None = None
) -> torch.Tensor:
    """The image (x.shape) a kv energy with θ = `memory` draws from the value θ recalls by
    x's key, or by `cue`'s key (a drawing before: `RuleConfig.rekeys`)."""
    extra = {"redraw": True} if cue is None else {"redraw": True, "cue": cue}
    return functional_call(net, memory, (x,), extra)


def redraw_read(
    net: nn.Module,
    memory: Params,
    queries: torch.Tensor,
    rekeys: int,
    create_graph: bool,
    functional: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The `redraw` read: one drawing per query (`redrawn`), then `rekeys` more, each
    recalled by the key of the drawing before (a completed drawing's key lies nearer its
    stored key than the occluded query's; the value, maps and pixels stay the query's).
    Returns the drawings and each one's finiteness (none under `functional`)."""
    iterates, flags = [], []
    x = None
    for _ in range(1 + rekeys):
        x = redrawn(net, memory, queries, cue=x)
        if not create_graph:
            x = x.detach()
        if not functional:
            flags.append(x.isfinite().all()[None])
        iterates.append(x)
    return iterates, flags
