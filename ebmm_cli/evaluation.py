"""Held-out evaluation during meta-training: the fixed episodes, their metrics, the curves.

A run evaluates its model every `eval_every` steps on the same held-out episodes (from
the test split: Omniglot's evaluation alphabets), so its curve shows learning, not the
luck of the draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ebmm_cli.atomic import atomic_path
from ebmm_cli.data import Episodes
from ebmm_cli.device import resolve_device
from ebmm_cli.distort import Distortion
from ebmm_cli.memory import energy
from ebmm_cli.metrics import hamming, iterates_loss, ssim
from ebmm_cli.model import Memory, Model, refine_memory, retrieve, unwritten_memory, write_memory
from ebmm_cli.runconfig import TrainConfig
from ebmm_cli.terms import TERMS


@dataclass
class Batch:
    """One episode on the device: clean patterns and their distorted queries."""

    patterns: torch.Tensor
    queries: torch.Tensor


def heldout_batches(
    data: Any,
    config: TrainConfig,
    distortion: Distortion,
    count: int | None = None,
    n: int | None = None,
) -> list[Batch]:
    """`count` (default `config.eval_episodes`) held-out episodes of `n` patterns
    (default `config.batch_size`) with their queries, the same for every call with the
    same config: the run's fixed evaluation set. Each N has its own seeds."""
    n = config.batch_size if n is None else n
    offset = 0 if n == config.batch_size else 7_919 * n  # N = batch_size: as it always was
    episodes = Episodes(data, n, config.shots, seed=config.seed + 10_000 + offset)
    generator = torch.Generator().manual_seed(config.seed + 20_000 + offset)
    device = resolve_device(config.device)
    batches = []
    for _ in range(count if count is not None else config.eval_episodes):
        patterns, _ = episodes.sample()
        batches.append(Batch(patterns.to(device), distortion(patterns, generator).to(device)))
    return batches


def evaluate_episodes(
    model: Model, batches: list[Batch], terms: dict[str, float] | None = None, refine: int = 0
) -> dict[str, float]:
    """Mean over episodes of: the training loss of the retrieval, MSE, Hamming error and
    SSIM of the retrieval and of the query, and the mean energy (under the written memory) of the
    originals, the queries and the retrievals (the report's table). Episodes whose write
    or read leaves the reals are left out of the means and counted in `nonfinite`; if
    all are, the means are NaN.

    Also `unwritten_mse` and `unwritten_hamming`: the same queries read from θ̄ (and an
    unadapted decoder), a memory that holds nothing. The gap to `mse` is what the write
    stores; without it a run can beat the query on the energy's prior alone, with a
    write that does nothing.

    And for each of the run's auxiliary `terms` (`terms.TERMS`, by name), its unweighted
    value on the episode, under the term's name. With `refine` R > 0 (a model whose own
    write refines, `--write-refine`) also `refined_mse`, `refined_hamming` (and
    `refined_ssim` for images): the same queries read from the memory refined R steps,
    seeded per episode, the model's own write beside its learned steps."""
    model.eval()
    kind = model.config.loss
    sums: dict[str, float] = {}
    finite = 0
    blank = unwritten_memory(model)
    for index, batch in enumerate(batches):
        try:
            memory = write_memory(model, batch.patterns, generator=torch.Generator().manual_seed(0))
            memory = memory.detach()
            iterates = retrieve(model, memory, batch.queries)
            unwritten = retrieve(model, blank, batch.queries)[-1]
            refined = _refined_values(model, memory, batch, refine, index) if refine else {}
        except FloatingPointError:
            continue
        finite += 1
        out = iterates[-1]
        with torch.no_grad():
            values = {
                "loss": iterates_loss(kind, iterates, batch.patterns),
                **_errors(out, batch.patterns),
                **_errors(batch.queries, batch.patterns, "query_"),
                "energy_original": energy(model.energy, memory.params, batch.patterns).mean(),
                "energy_query": energy(model.energy, memory.params, batch.queries).mean(),
                "energy_retrieved": energy(model.energy, memory.params, out).mean(),
                "unwritten_mse": (unwritten - batch.patterns).pow(2).mean(),
                "unwritten_hamming": hamming(unwritten, batch.patterns).mean(),
            }
            for name in terms or {}:
                term = TERMS[name].loss
                values[name] = term(model.energy, memory.params, batch.patterns, batch.queries, out)
        values.update(refined)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    keys = sums or dict.fromkeys(("loss", "mse", "query_mse"), math.nan)
    totals = {k: sums[k] / finite if finite else math.nan for k in keys}
    totals["nonfinite"] = len(batches) - finite
    return totals


def _refined_values(
    model: Model, memory: Memory, batch: Batch, steps: int, seed: int
) -> dict[str, torch.Tensor]:
    """`evaluate_episodes`' `refined_*` metrics of one episode: its memory refined
    `steps` steps, then read."""
    generator = torch.Generator().manual_seed(seed)
    refined = refine_memory(model, memory, batch.patterns, steps, generator=generator)
    with torch.no_grad():
        return _errors(retrieve(model, refined, batch.queries)[-1], batch.patterns, "refined_")


def _errors(out: torch.Tensor, patterns: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """The episode's mean MSE, Hamming error and (images) SSIM of `out` against
    `patterns`, each key prefixed: the same three for the retrievals and the queries."""
    values = {"mse": (out - patterns).pow(2).mean(), "hamming": hamming(out, patterns).mean()}
    if patterns.dim() == 4:
        values["ssim"] = ssim(out, patterns).mean()
    return {prefix + k: v for k, v in values.items()}


def heldout_sets(
    data: Any, config: TrainConfig, distortion: Distortion, count: int | None = None
) -> dict[int, list[Batch]]:
    """`heldout_batches` at each held-out N of the run (`TrainConfig.sizes`): one N, or
    four spread over a range."""
    return {n: heldout_batches(data, config, distortion, count, n) for n in config.sizes()}


def evaluate_sets(
    model: Model,
    sets: dict[int, list[Batch]],
    terms: dict[str, float] | None = None,
    refine: int = 0,
) -> dict[str, Any]:
    """`evaluate_episodes` at each N of `heldout_sets`: each metric's mean over the sizes
    (each N weighs the same; `nonfinite` is summed), and every size's own metrics under
    `by_n` (the capacity curve). One size: its metrics as they are."""
    results = {n: evaluate_episodes(model, batches, terms, refine) for n, batches in sets.items()}
    if len(results) == 1:
        return next(iter(results.values()))
    first = next(iter(results.values()))
    merged: dict[str, Any] = {
        k: sum(r[k] for r in results.values()) / (1 if k == "nonfinite" else len(results))
        for k in first
    }
    merged["by_n"] = {str(n): r for n, r in sorted(results.items())}
    return merged


def _ratio(metrics: dict[str, Any], key: str, query_key: str) -> float:
    """metrics[key] / metrics[query_key], NaN where either is missing."""
    return metrics.get(key, math.nan) / max(metrics.get(query_key, math.nan), 1e-12)


def plot_curves(metrics: list[dict[str, Any]], path: Path) -> None:
    """Training and held-out loss against the step, as a PNG; for a run over a range of
    N, beside it the latest capacity curve (held-out error / the query's, against N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    capacity = metrics[-1].get("heldout_by_n") if metrics else None
    cap_axis = None
    if capacity:
        fig, (ax, cap_axis) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100)
        _plot_capacity(cap_axis, metrics[-1]["step"], capacity)
    else:
        fig, ax = plt.subplots(figsize=(6, 4.2), dpi=100)
    steps = [m["step"] for m in metrics]
    train = [(m["step"], m["train_loss"]) for m in metrics if m["train_loss"] is not None]
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss (mean since last point)")
    ax.plot(steps, [m["heldout_loss"] for m in metrics], label="held-out loss")
    if metrics and "heldout_query_mse" in metrics[0]:
        # .get: an evaluation whose every episode left the reals records no errors
        ratio = [_ratio(m, "heldout_mse", "heldout_query_mse") for m in metrics]
        ax2 = ax.twinx()
        ax2.plot(steps, ratio, color="tab:green", linestyle="--", label="held-out MSE / query MSE")
        if "heldout_query_hamming" in metrics[0]:
            ratio = [_ratio(m, "heldout_hamming", "heldout_query_hamming") for m in metrics]
            ax2.plot(steps, ratio, color="tab:red", linestyle=":", label="Hamming / query's")
        ax2.axhline(1.0, color="grey", linewidth=0.5)
        ax2.set_ylabel("retrieved / query (below 1: recall)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per read iterate")
    # one legend for both y axes, below the plot (two inside overlapped each other and
    # the curves)
    lines = [line for axis in fig.axes if axis is not cap_axis for line in axis.get_lines()]
    lines = [line for line in lines if not line.get_label().startswith("_")]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, ncol=2,
              loc="upper center", bbox_to_anchor=(0.5, -0.18))  # fmt: skip
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _plot_capacity(ax: Any, step: int, by_n: dict[str, dict[str, float]]) -> None:
    sizes = [int(n) for n in by_n]
    rows = list(by_n.values())
    ax.plot(sizes, [r["mse"] / max(r["query_mse"], 1e-12) for r in rows], "o-",
            color="tab:green", label="MSE / query MSE")  # fmt: skip
    if "query_hamming" in rows[0]:
        ax.plot(sizes, [r["hamming"] / max(r["query_hamming"], 1e-12) for r in rows], "s:",
                color="tab:red", label="Hamming / query's")  # fmt: skip
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("patterns written (N)")
    ax.set_ylabel("retrieved / query")
    ax.set_title(f"capacity at step {step}", fontsize=9)
    ax.legend(fontsize=8)
