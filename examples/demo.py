"""The demo: an energy-based memory on Omniglot characters it has never seen.

1. takes the built-in `omniglot-28` model (`ebmm models`: meta-trained on the background
   alphabets with the report's protocol, 28x28, 5-way 1-shot, 7x7 noise block,
   SSIM+MSE), or with `--train-minutes M` meta-trains one from scratch for M minutes
   (resumed, not redone, when run again);
2. writes episodes of 5 characters from the evaluation alphabets (never seen in
   training) into memories, distorts them, and reads them back;
3. saves `grid.png` (rows: original, query, retrieved) and prints MSE, SSIM and the mean
   energies of originals, queries and retrievals, and the same read with nothing
   written (from θ̄): the gap is what the memory adds to what the slow weights know
   about characters (for `omniglot-28`, little: README, "Built-in models").

    python examples/demo.py --data-root ../shared/data --out demo
    python examples/demo.py --data-root ../shared/data --out demo --train-minutes 3
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torchvision.utils import make_grid

from ebmm_cli import builtin
from ebmm_cli.data import Episodes, load_dataset
from ebmm_cli.distort import Distortion
from ebmm_cli.imageio import save_image
from ebmm_cli.memory import energy
from ebmm_cli.meta import Trainer
from ebmm_cli.metrics import ssim
from ebmm_cli.model import Model, retrieve, unwritten_memory, write_memory
from ebmm_cli.runconfig import train_config
from ebmm_cli.store import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("EBMM_DATA") or None)
    parser.add_argument("--out", type=Path, default=Path("demo"))
    parser.add_argument(
        "--train-minutes",
        type=float,
        help="meta-train a model from scratch for this long instead of the built-in one",
    )
    parser.add_argument("--episodes", type=int, default=4, help="evaluation episodes shown")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.train_minutes is None:
        model = load_model(builtin.resolve(builtin.DEFAULT))
        print(f"using the built-in {builtin.DEFAULT} model (ebmm models)", file=sys.stderr)
    else:
        model = _train(args.out / "run", args.train_minutes, args.data_root, args.seed)

    chars = load_dataset("omniglot", "test", args.data_root, 28)
    episodes = Episodes(chars, 5, seed=args.seed + 1)
    distortion = Distortion.parse("noise:7")
    generator = torch.Generator().manual_seed(args.seed)
    rows, totals = [], {}
    for _ in range(args.episodes):
        images, _ = episodes.sample()
        queries = distortion(images, generator)
        memory = write_memory(model, images).detach()
        retrieved = retrieve(model, memory, queries)[-1]
        unwritten = retrieve(model, unwritten_memory(model), queries)[-1]
        rows.append(torch.cat([images, queries, retrieved]))
        with torch.no_grad():
            values = {
                "MSE": [(x - images).pow(2).mean() for x in (queries, retrieved, unwritten)],
                "SSIM": [ssim(x, images).mean() for x in (queries, retrieved, unwritten)],
                "energy": [
                    energy(model.energy, memory.params, x).mean()
                    for x in (images, queries, retrieved)
                ],
            }
        for k, v in values.items():
            totals[k] = [
                t + float(x) / args.episodes
                for t, x in zip(totals.get(k, [0.0] * len(v)), v, strict=True)
            ]
    # One block of 3 rows (original, query, retrieved) per episode, side by side.
    blocks = [make_grid(r, nrow=5, padding=2, pad_value=0.5) for r in rows]
    grid = make_grid(torch.stack(blocks), nrow=len(blocks), padding=6, pad_value=1.0)[:1]
    grid = F.interpolate(grid[None], scale_factor=3, mode="nearest")[0]
    save_image(grid, args.out / "grid.png")

    table = Table(title=f"{args.episodes} held-out episodes of 5 evaluation characters")
    table.add_column("")
    for name in ("original", "query", "retrieved", "nothing written"):
        table.add_column(name, justify="right")
    table.add_row("MSE to original", "0", *(f"{v:.4f}" for v in totals["MSE"]))
    table.add_row("SSIM to original", "1", *(f"{v:.3f}" for v in totals["SSIM"]))
    table.add_row("mean energy", *(f"{v:.3f}" for v in totals["energy"]), "")
    Console().print(table)
    query, written, blank = totals["MSE"]
    print(f"retrieved MSE / query MSE = {written / query:.3f}")
    print(f"read with nothing written: {blank / query:.3f} of the query's MSE")
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
