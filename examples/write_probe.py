"""Does a model's write store its patterns? Three diagnostics of a training run (issue 17).

For the run folder's latest checkpoint (or, with `--untrained`, a fresh model of the
same configuration), on the run's own held-out episodes:

- write gradients: the per-pattern gradients ∇θ E(xi; θ̄) of one held-out episode, whose
  mean over the N patterns is the write's first step (4). Their mean pairwise cosine
  and the effective rank (participation ratio of the eigenvalues) of their centred Gram
  matrix: a write whose gradients are nearly parallel can only shift θ the same way for
  any batch, and stores no pattern apart from the others;
- recognition: the held-out metric of training (`evaluation.evaluate_episodes`), the
  fraction of stored/novel pairs whose energy the write lowered more for the stored one;
- completion: the fraction of (query, other stored pattern) pairs in which the write
  lowered the query completed with its own content more than with the other's
  (`memory.completion_margins`, the `--completion` term), for λ = 0.05 (the read's first
  step) and λ = 1 (whole completions); and the write's share of the read's first
  gradient, |∇x ΔE(q)| / |∇x E(q)| (ΔE = E(θ) − E(θ̄)): how much the memory can steer a read;
- how far the read moves: the mean |x̂ − q| over the positions the distortion drew and
  over the rest (where q is already right), and its progress towards the stored
  pattern, <x̂ − q, x − q> / |x − q|² over the drawn positions (1: all the way);
- where the read's Hamming errors are: inside the positions the distortion drew, and
  outside them, where the query was right (and of those, how many at grey pixels,
  |x - 0.5| < 0.2: resized characters have grey stroke edges, which a read that
  sharpens them pushes past 0.5; `--binarize` removes them);
- where the read ends in the energy: the fraction of queries whose stored pattern has a
  lower energy (written θ) than the read's endpoint x̂ (`memory.endpoint_margins` < 0,
  what the `--contrast` term trains): where it is not, descending further from x̂ lowers
  the energy and so can never reach the stored pattern;
- the written and the unwritten (θ̄) read of the same queries: MSE / the query's, Hamming.

With `--meta-steps K` it instead starts a fresh model of the run's configuration and
prints the write-gradient numbers after 1, 2, 4, ... K meta-steps on training episodes
(`--lr` overrides the run's), to see how early meta-training shapes them.

    python examples/write_probe.py /work/runs/paper-default
    python examples/write_probe.py /work/runs/paper-default --untrained
    python examples/write_probe.py /work/runs/paper-default --meta-steps 8 --lr 1e-4
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import ebmm_cli  # noqa: F401  first: OpenMP's threads sleep, not spin (ebmm_cli's docstring)

# isort: split
import torch

from ebmm_cli.data import Episodes
from ebmm_cli.evaluation import Batch, evaluate_episodes, heldout_batches
from ebmm_cli.memory import completion_margins, endpoint_margins, energy, initial_memory
from ebmm_cli.meta import MetaStep, _datasets
from ebmm_cli.model import Model, retrieve, write_memory
from ebmm_cli.runconfig import TrainConfig
from ebmm_cli.store import load_checkpoint


def write_gradients(model: Model, patterns: torch.Tensor) -> dict[str, float]:
    """Mean pairwise cosine and effective rank of the per-pattern write gradients."""
    net = model.energy
    theta = initial_memory(net)
    rows = []
    for x in patterns:
        grads = torch.autograd.grad(energy(net, theta, x[None]).sum(), list(theta.values()))
        rows.append(torch.cat([g.flatten() for g in grads]))
    g = torch.stack(rows)
    unit = torch.nn.functional.normalize(g, dim=1)
    cosines = (unit @ unit.T)[~torch.eye(len(g), dtype=torch.bool)]
    centred = g - g.mean(0)
    eigen = torch.linalg.eigvalsh(centred @ centred.T).clamp(min=0)
    return {
        "mean_cosine": cosines.mean().item(),
        "effective_rank": (eigen.sum() ** 2 / (eigen**2).sum()).item(),
    }


def read_stats(model: Model, batches: list[Batch]) -> dict[str, float]:
    """Over the episodes: the fraction of negative `completion_margins` at λ = 0.05 and
    λ = 1, the mean of |∇x ΔE(q)| / |∇x E(q)| per query, how far the read moves, and the
    fraction of stored patterns below their read's endpoint in the energy (queries and
    the positions drawn made afresh, seeded, by `Distortion.with_mask`)."""
    net = model.energy
    blank = initial_memory(net)
    generator = torch.Generator().manual_seed(0)
    wins: dict[float, list[torch.Tensor]] = {0.05: [], 1.0: []}
    shares, moves, below, errors = [], [], [], []
    for batch in batches:
        x = batch.patterns
        queries, masks = model.distortion.with_mask(x, generator)
        written = write_memory(model, x)
        memory = written.params
        read = retrieve(model, written, queries)[-1]
        step, gap = read - queries, (x - queries) * masks
        drawn, kept = masks.sum(), (1 - masks).sum().clamp(min=1)
        moves.append(
            [
                (step.abs() * masks).sum() / drawn,
                (step.abs() * (1 - masks)).sum() / kept,
                (step * gap).sum() / gap.pow(2).sum(),
            ]
        )
        wrong, drawn_at = (read > 0.5) != (x > 0.5), masks.bool()
        grey = (x - 0.5).abs() < 0.2
        errors.append(
            [(wrong & place).flatten(1).sum(1).float().mean() for place in
             (drawn_at, ~drawn_at, ~drawn_at & grey)]
            + [((queries > 0.5) != (x > 0.5)).flatten(1).sum(1).float().mean()]
        )  # fmt: skip
        with torch.no_grad():
            below.append((endpoint_margins(net, memory, x, read) < 0).float())
            for lam, won in wins.items():
                lams = torch.full((len(x),), lam)
                margins = completion_margins(net, memory, x, queries, masks, lams)
                won.append((margins < 0).float().flatten())
        q = queries.clone().requires_grad_(True)
        e = energy(net, memory, q)
        (full,) = torch.autograd.grad(e.sum(), q, retain_graph=True)
        (moved,) = torch.autograd.grad((e - energy(net, blank, q)).sum(), q)
        shares.append(moved.flatten(1).norm(dim=1) / full.flatten(1).norm(dim=1))
    inside, outside, progress = torch.tensor(moves).mean(0).tolist()
    wrong_drawn, wrong_kept, wrong_grey, wrong_query = torch.tensor(errors).mean(0).tolist()
    return {
        **{f"completion_{lam}": torch.cat(won).mean().item() for lam, won in wins.items()},
        "write_share": torch.cat(shares).mean().item(),
        "move_drawn": inside,
        "move_kept": outside,
        "progress": progress,
        "below_end": torch.cat(below).mean().item(),
        "wrong_drawn": wrong_drawn,
        "wrong_kept": wrong_kept,
        "wrong_grey": wrong_grey,
        "wrong_query": wrong_query,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="an `ebmm train` run folder")
    parser.add_argument("--untrained", action="store_true", help="a fresh model instead")
    parser.add_argument("--episodes", type=int, default=10, help="held-out episodes")
    parser.add_argument("--n", type=int, default=None, help="patterns per episode")
    parser.add_argument("--meta-steps", type=int, default=0, help="from a fresh model")
    parser.add_argument("--lr", type=float, default=None, help="with --meta-steps")
    args = parser.parse_args(argv)
    model, _, state = load_checkpoint(args.run / "checkpoint.safetensors")
    config = TrainConfig.from_json(state["train_config"])
    if args.lr is not None:
        config = dataclasses.replace(config, lr=args.lr)
    train, held, _ = _datasets(config)
    if args.untrained or args.meta_steps:
        torch.manual_seed(config.seed)
        model = Model(config.model)
    batches = heldout_batches(held, config, model.distortion, count=args.episodes, n=args.n)
    patterns = batches[0].patterns
    if args.meta_steps:
        step = MetaStep(model, config, torch.device("cpu"), world=1)
        episodes = Episodes(train, patterns.shape[0], config.shots, seed=config.seed)
        generator = torch.Generator().manual_seed(config.seed + 1)
        stats = write_gradients(model, patterns)
        print(f"step 0: cosine {stats['mean_cosine']:.3f}, rank {stats['effective_rank']:.1f}")
        for k in range(1, args.meta_steps + 1):
            x, _ = episodes.sample()
            foils = episodes.sample()[0] if config.recognition else None
            queries, masks = model.distortion.with_mask(x, generator)
            loss = step([Batch(x, queries, masks)], generator, foils=foils)
            if k & (k - 1) == 0 or k == args.meta_steps:  # powers of two, and the last
                stats = write_gradients(model, patterns)
                print(f"step {k}: loss {loss.item():.4f}, cosine {stats['mean_cosine']:.3f}, "
                      f"rank {stats['effective_rank']:.1f}")  # fmt: skip
        return 0
    stats = write_gradients(model, patterns)
    metrics = evaluate_episodes(model, batches)
    reading = read_stats(model, batches)
    query = metrics["query_mse"]
    which = "untrained" if args.untrained else f"step {state['step']}"
    print(
        f"{args.run} ({which}), N = {patterns.shape[0]}, {args.episodes} held-out episodes\n"
        f"  write gradients: mean cosine {stats['mean_cosine']:.3f}, "
        f"effective rank {stats['effective_rank']:.1f} of {patterns.shape[0]}\n"
        f"  recognition {metrics.get('recognition', float('nan')):.3f}\n"
        f"  completion {reading['completion_0.05']:.3f} (λ = 0.05), "
        f"{reading['completion_1.0']:.3f} (λ = 1); the write's share of the read's "
        f"first gradient {reading['write_share']:.3f}\n"
        f"  read moves {reading['move_drawn']:.3f} per drawn position, "
        f"{reading['move_kept']:.3f} per other; progress to the stored pattern "
        f"{reading['progress']:.3f}; stored below the read's end in energy "
        f"{reading['below_end']:.3f}\n"
        f"  Hamming errors {reading['wrong_drawn']:.1f} at drawn positions, "
        f"{reading['wrong_kept']:.1f} at the others ({reading['wrong_grey']:.1f} of them "
        f"grey, |x - 0.5| < 0.2); the query's {reading['wrong_query']:.1f}\n"
        f"  written:   MSE / query's {metrics['mse'] / query:.3f}, "
        f"Hamming {metrics['hamming']:.1f}\n"
        f"  unwritten: MSE / query's {metrics['unwritten_mse'] / query:.3f}, "
        f"Hamming {metrics['unwritten_hamming']:.1f} (query's {metrics['query_hamming']:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
