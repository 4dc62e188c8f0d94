"""Does the memory recall, through the command line a user runs? Own memory against others'.

Takes 2N characters from Omniglot's evaluation alphabets (never seen in training), one
drawing each, as PNG files in two folders, `own/` and `other/`, then runs the real CLI:

    ebmm distort --model M own -o queries            # the queries M was trained on
    ebmm write   --model M own   -o own.safetensors
    ebmm write   --model M other -o other.safetensors
    ebmm read --memory own.safetensors   queries -o from-own
    ebmm read --memory other.safetensors queries -o from-other

and scores each folder of retrievals against the originals as the model sees them
(resized, ink = 1, thresholded for a binarized model): squared error per image, and
Hamming error for a binarized model. A memory that recalls restores its own characters'
queries far better than a memory of other characters does; a denoiser restores both
alike. Without `--model` the CLI's default model is used, as a user gets it.

    python examples/recall.py --data-root ../shared/data --out recall
    python examples/recall.py --data-root ../shared/data --out recall --model omniglot-28 -n 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import ebmm_cli  # noqa: F401  first: OpenMP's threads sleep, not spin (ebmm_cli's docstring)

# isort: split
import torch

from ebmm_cli import builtin
from ebmm_cli.imageio import collect_images, load_batch
from ebmm_cli.model import ModelConfig
from ebmm_cli.store import read_header


def extract(archive: Path, out: Path, n: int, seed: int) -> tuple[Path, Path]:
    """2n distinct characters (each character's first drawing), drawn by `seed`, written
    as `out/own/*.png` (the first n) and `out/other/*.png`."""
    with zipfile.ZipFile(archive) as z:
        firsts: dict[str, str] = {}
        for name in sorted(z.namelist()):
            if name.endswith(".png"):
                firsts.setdefault(name.rsplit("/", 1)[0], name)
        chosen = random.Random(seed).sample(sorted(firsts.values()), 2 * n)
        folders = out / "own", out / "other"
        for i, name in enumerate(chosen):
            folder = folders[i >= n]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:03d}.png").write_bytes(z.read(name))
    return folders


def ebmm(*args: str) -> None:
    """Run the installed CLI as a user would; stop on its first failure."""
    command = [sys.executable, "-m", "ebmm_cli", *args]
    print("$ ebmm " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def score(folder: Path, originals: torch.Tensor, config: ModelConfig) -> dict[str, float]:
    """Mean squared error per image and, for a binarized model, Hamming error of the
    images in `folder` against `originals`, both as the model sees them."""
    images = collect_images([str(folder)], None)
    c, size = config.energy.shape[0], config.energy.shape[-1]
    x = load_batch(images, c, size, config.invert_files, binarize=config.binarize).images
    out = {"mse": float((x - originals).pow(2).flatten(1).sum(1).mean())}
    if config.binarize:
        out["hamming"] = float(((x > 0.5) != (originals > 0.5)).flatten(1).sum(1).float().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=os.environ.get("EBMM_DATA"))
    parser.add_argument("--out", type=Path, default=Path("recall"))
    parser.add_argument("--model", help="a built-in's name or a file (default: the CLI's)")
    parser.add_argument("-n", type=int, help="characters per memory (default: the model's N)")
    parser.add_argument("--seed", type=int, default=0, help="which characters")
    parser.add_argument("--refine", type=int, help="ebmm write --refine (default: the model's)")
    args = parser.parse_args()
    if args.data_root is None:
        sys.exit("recall: --data-root (or EBMM_DATA) is needed: the Omniglot archives")

    path = builtin.resolve(args.model or builtin.DEFAULT)
    config = ModelConfig.from_json(read_header(path)["config"])
    n = args.n or (config.rules.patterns[1] if config.rules.patterns else 5)
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"recall: {args.out} is not empty")
    archive = args.data_root / "omniglot" / "images_evaluation.zip"
    own, other = extract(archive, args.out, n, args.seed)
    model = ["--model", args.model] if args.model else []
    refine = ["--refine", str(args.refine)] if args.refine is not None else []
    queries = args.out / "queries"
    name = args.model or builtin.DEFAULT  # distort has no default model: it is told
    ebmm("distort", "--model", name, "--seed", str(args.seed), str(own), "-o", str(queries))
    for which, folder in (("own", own), ("other", other)):
        memory = args.out / f"{which}.safetensors"
        ebmm("write", *model, *refine, str(folder), "-o", str(memory))
        ebmm("read", "--memory", str(memory), str(queries), "-o", str(args.out / f"from-{which}"))

    c, size = config.energy.shape[0], config.energy.shape[-1]
    images = collect_images([str(own)], None)
    originals = load_batch(images, c, size, config.invert_files, binarize=config.binarize).images
    rows = {
        "query": score(queries, originals, config),
        "own memory": score(args.out / "from-own", originals, config),
        "other characters' memory": score(args.out / "from-other", originals, config),
    }
    for label, row in rows.items():
        print(f"{label:>26}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    ratio = rows["own memory"]["mse"] / rows["other characters' memory"]["mse"]
    print(f"own memory's error / other characters' memory's error (MSE): {ratio:.3f}")
    summary = {"model": name, "n": n, "rows": rows}
    (args.out / "recall.json").write_text(json.dumps({**summary, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
