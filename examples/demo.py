"""The demo: distort real Omniglot characters and save originals and queries side by side.

Until training lands this is ebmm's main job in miniature: one seeded episode of
distinct characters from the evaluation set, each shown clean and under every image
distortion the toolkit offers. Run it with `make demo`, or:

    python examples/demo.py --data-root ../shared/data --out demo
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from ebmm_cli.data import Episodes, load_dataset
from ebmm_cli.distort import Distortion
from ebmm_cli.imageio import save_image

ROWS = (
    Distortion(kind="noise", block=7),
    Distortion(kind="occlude", block=10, value=None),
    Distortion(kind="saltpepper", prob=0.1),
    Distortion(kind="flip", bits=60),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-root",
        default=os.environ.get("EBMM_DATA") or None,
        help="data root (default: $EBMM_DATA, else the user cache)",
    )
    parser.add_argument("--out", type=Path, default=Path("demo"))
    parser.add_argument("--count", type=int, default=8, help="characters in the episode")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=3, help="pixel magnification of the grid")
    args = parser.parse_args()

    characters = load_dataset("omniglot", "test", args.data_root, args.size)
    images, labels = Episodes(characters, args.count, seed=args.seed).sample()
    generator = torch.Generator().manual_seed(args.seed)
    rows = [images] + [distortion(images, generator) for distortion in ROWS]
    grid = make_grid(torch.cat(rows), nrow=args.count, padding=2, pad_value=0.5)[:1]
    grid = F.interpolate(grid[None], scale_factor=args.scale, mode="nearest")[0]
    path = args.out / "grid.png"
    save_image(grid, path)
    print(f"episode: {', '.join(characters.classes[i] for i in labels.tolist())}")
    print(f"rows: original, {', '.join(d.spec() for d in ROWS)}")
    print(path)


if __name__ == "__main__":
    main()
