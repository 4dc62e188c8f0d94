"""Auxiliary terms of the meta-loss: each in one place, by name.

A term adds `weight` times its value to each episode's meta-loss (the read's loss summed
over its iterates, the paper's (2)); its weight is the `TrainConfig` field and the
`ebmm train` option of its name, 0 (off) by default. A run with a term's weight above 0
also reports the term's unweighted value on its held-out episodes, as `heldout_NAME`.
The gradient joins the step; the training loss recorded stays the read's, so curves stay
comparable with and without terms.

`TERMS` lists them; meta-training and held-out evaluation go through it, so a term's
code is here alone, and adding or removing one touches only its weight besides: the
`TrainConfig` field, its check in `train_config` and `ebmm train`'s option. Terms that
were tried and did not help are in docs/TRAINING.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ebmm_cli.memory import Params, energy

TermLoss = Callable[[nn.Module, Params, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(energy network, written memory θ, stored patterns (N, ...), their queries (N, ...),
where the read of each query ended (N, ..., detached)) -> the episode's term, a 0-dim
tensor; functional, so that meta-training takes it under `vmap` over episodes."""


@dataclass(frozen=True)
class Term:
    """One term: its `name` (the `TrainConfig` weight field and `--NAME`) and `loss`."""

    name: str
    loss: TermLoss


def contrast_loss(
    net: nn.Module, memory: Params, stored: torch.Tensor, queries: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """mean softplus(E(xi; θ) − E(x̂i; θ)) over the stored patterns xi, x̂i where the read
    of xi's query ended, both under the written memory θ.

    Positive margins: the read stopped somewhere the energy ranks below the truth, so
    descending further cannot reach it. Trained reads on Omniglot and binary strings
    stop there at every query: the stored patterns are not the energy's minima but
    points a short read passes. The term asks each stored pattern to lie lower than
    where its read ended; the ends are detached, so it moves the energy under the
    read's endpoint, not the read. It needs nothing but the read, so a step with it
    keeps its CUDA graph (the built-in binary-128 trains with weight 0.1)."""
    return F.softplus(energy(net, memory, stored) - energy(net, memory, ends)).mean()


TERMS: dict[str, Term] = {"contrast": Term("contrast", contrast_loss)}


def weights(config: object) -> dict[str, float]:
    """The terms a run uses, {name: weight above 0}, from its `TrainConfig`."""
    return {name: w for name in TERMS if (w := getattr(config, name)) > 0}


def episode_terms(
    net: nn.Module,
    used: dict[str, float],
    memories: Params,
    patterns: torch.Tensor,
    queries: torch.Tensor,
    ends: torch.Tensor,
) -> torch.Tensor:
    """Each episode's weighted sum of the `used` terms, (E,), for episodes stacked on the
    first axis of every argument (`memories` {name: (E, ...)})."""
    total = patterns.new_zeros(patterns.shape[0])
    for name, weight in used.items():
        loss = torch.func.vmap(lambda m, x, q, e, f=TERMS[name].loss: f(net, m, x, q, e))
        total = total + weight * loss(memories, patterns, queries, ends.detach())
    return total
