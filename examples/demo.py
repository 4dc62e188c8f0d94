"""The demo: an energy-based memory recalls Omniglot characters it has never seen.

1. takes the built-in `omniglot-32` model (`ebmm models`: the paper's protocol, 64
   characters per memory, 32x32 binarized, a 16x16 block of each query blanked), or any
   Omniglot image model by `--model` (a built-in's name or a file), or with
   `--train-minutes M` meta-trains one from scratch for M minutes on the report's
   protocol (resumed, not redone, when run again);
2. writes episodes of the model's N characters from the evaluation alphabets (never seen
   in training) into memories with the model's own write, distorts them with its
   training distortion, and reads them back. The episodes and queries are `ebmm
   compare`'s (seed 0), and the write and read are its model rows, so the numbers are
   those of `ebmm compare --model NAME --unwritten` on as many episodes;
3. saves `grid.png` (rows: original, query, retrieved, read from a memory of other
   characters, read with nothing written) and prints Hamming error (for a binarized
   model), MSE and SSIM of the query, the retrieval and the two controls, and the mean
   energies of originals, queries and retrievals. The gap between the retrieval and the
   controls is what the memory recalls: for `omniglot-32` the strokes the query hides;
   for `omniglot-28`, a denoiser, almost none (README, "Built-in models").

    python examples/demo.py --data-root ../shared/data --out demo
    python examples/demo.py --data-root ../shared/data --out demo --model omniglot-28
    python examples/demo.py --data-root ../shared/data --out demo --train-minutes 3
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from itertools import pairwise
from pathlib import Path

import ebmm_cli  # noqa: F401  first: OpenMP's threads sleep, not spin (ebmm_cli's docstring)

# isort: split
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torchvision.utils import make_grid

from ebmm_cli import builtin
from ebmm_cli.compare import CompareConfig, ModelMethod, episode_metrics, make_episodes
from ebmm_cli.imageio import save_image
from ebmm_cli.memory import energy
from ebmm_cli.meta import Trainer
from ebmm_cli.model import Model
from ebmm_cli.runconfig import train_config
from ebmm_cli.store import load_model

DEFAULT_MODEL = builtin.DEFAULT
"""The CLI's default model, whose memory recalls what a query hides."""
SHOWN = 16
"""Characters of each episode in the grid: 64 columns of 32x32 would not fit a screen."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("EBMM_DATA") or None)
    parser.add_argument("--out", type=Path, default=Path("demo"))
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a built-in's name or a file")
    parser.add_argument(
        "--train-minutes",
        type=float,
        help="meta-train a model from scratch for this long (the report's protocol) "
        "instead of using --model",
    )
    parser.add_argument(
        "--episodes",
        type=int,
        help="episodes written and read (default: enough for 16 characters in the grid, "
        "which shows up to 16 of each)",
    )
    parser.add_argument("--seed", type=int, default=0, help="`ebmm compare`'s --seed")
    args = parser.parse_args()

    if args.train_minutes is None:
        model = load_model(builtin.resolve(args.model))
        name = args.model
        print(f"using {name} (ebmm models)", file=sys.stderr)
    else:
        model = _train(args.out / "run", args.train_minutes, args.data_root, args.seed)
        name = str(args.out / "run")
    config = model.config
    if config.dataset != "omniglot" or len(config.energy.shape) != 3:
        sys.exit(f"demo: {name}: an Omniglot image model is needed, not {config.dataset}")
    # N as trained; a model file from before N was recorded is the report's 5
    n = config.rules.patterns[1] if config.rules.patterns else 5
    episodes = make_episodes(
        CompareConfig(
            data_root=args.data_root,
            image_size=config.energy.shape[-1],
            patterns=(n,),
            distortion=config.distortion,
            episodes=(args.episodes or math.ceil(SHOWN / n)) + 1,  # the last: a foil
            seed=args.seed,
            binarize=config.binarize,
        ),
        tuple(config.energy.shape),
    )[n]
    own = ModelMethod(model, name, refine=config.rules.refine)
    unwritten = ModelMethod(model, name, unwritten=True)
    how = f"then {config.rules.refine} refining Adam steps" if config.rules.refine else "only"
    print(
        f"writing {len(episodes) - 1} episode(s) of {n} evaluation characters with its own "
        f"write ({config.rules.write_steps} learned steps, {how}), reading {config.distortion} "
        "queries ...",
        file=sys.stderr,
        flush=True,
    )
    rows, metrics, energies, seconds = [], [], [], 0.0
    for episode, foil in pairwise(episodes):
        shape = (-1, *episode.shape)
        start = time.monotonic()
        memory = own.write(episode.patterns)
        seconds += time.monotonic() - start
        retrieved = own.read(memory, episode.queries)
        other = own.read(own.write(foil.patterns), episode.queries)
        blank = unwritten.read(unwritten.write(episode.patterns), episode.queries)
        outs = (episode.queries, retrieved, other, blank)
        metrics.append([episode_metrics(x, episode.patterns, episode.shape) for x in outs])
        with torch.no_grad():
            energies.append(
                [
                    float(energy(model.energy, memory.params, x.view(shape)).mean())
                    for x in (episode.patterns, episode.queries, retrieved)
                ]
            )
        rows.append(torch.cat([x[:SHOWN].view(shape) for x in (episode.patterns, *outs)]))
    # One block of 5 rows (original, query, retrieved, other memory, nothing written) per
    # episode.
    blocks = [make_grid(r, nrow=len(r) // 5, padding=2, pad_value=0.5) for r in rows]
    grid = make_grid(torch.stack(blocks), nrow=len(blocks), padding=6, pad_value=1.0)[:1]
    grid = F.interpolate(grid[None], scale_factor=3, mode="nearest")[0]
    save_image(grid, args.out / "grid.png")

    def mean(column: int, key: str) -> float:
        return sum(m[column][key] for m in metrics) / len(metrics)

    pixels = math.prod(config.energy.shape)
    title = f"{len(rows)} held-out episode(s) of {n} evaluation characters, {pixels:,} pixels each"
    table = Table(title=title)
    table.add_column("", no_wrap=True)
    for column in ("original", "query", "retrieved", "other memory", "nothing written"):
        table.add_column(column, justify="right")
    if config.binarize:
        table.add_row(
            "Hamming error",
            "0",
            *(f"{mean(c, 'hamming'):.1f}" for c in range(4)),
        )
    table.add_row("MSE to original", "0", *(f"{mean(c, 'mse'):.4f}" for c in range(4)))
    if "ssim" in metrics[0][0]:
        table.add_row("SSIM to original", "1", *(f"{mean(c, 'ssim'):.3f}" for c in range(4)))
    table.add_row(
        "mean energy",
        *(f"{sum(e[i] for e in energies) / len(energies):.3f}" for i in range(3)),
        "",
        "",
    )
    Console().print(table)
    query, written, other, blank = (mean(c, "mse") for c in range(4))
    print(f"retrieved MSE / query MSE = {written / query:.3f}")
    print(f"retrieved MSE / MSE read from other characters' memory = {written / other:.3f}")
    print(f"read with nothing written: {blank / query:.3f} of the query's MSE")
    print(f"write: {seconds / len(rows):.1f} s per episode")
    print(args.out / "grid.png")


def _train(run: Path, minutes: float, data_root: str | None, seed: int) -> Model:
    """Meta-train (or continue) the report's protocol in `run` for `minutes`."""
    if (run / "checkpoint.safetensors").exists():
        trainer = Trainer.resume(run, steps=None, minutes=minutes)
    else:
        config = train_config(
            dataset="omniglot",
            image_size=28,
            batch_size=5,
            distortion="noise:7",
            loss="ssim+mse",
            data_root=data_root,
            minutes=minutes,
            eval_every=50,
            seed=seed,
        )
        trainer = Trainer.create(config, run)
    print(f"meta-training for {minutes} min (report protocol) into {run} ...", file=sys.stderr)
    trainer.run(_tick)
    last = trainer.metrics[-1]
    print(
        f"  trained: step {last['step']}, held-out loss {last['heldout_loss']:.4f}",
        file=sys.stderr,
    )
    return trainer.model.cpu()


def _tick(info: dict) -> None:
    """One line per held-out evaluation: readable in a terminal and in a log file alike."""
    if info["evaluated"]:
        print(
            f"  step {info['step']}  {info['elapsed'] / 60:.1f} min  held-out loss "
            f"{info['heldout_loss']:.4f}",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    main()
