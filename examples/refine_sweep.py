"""How good could the write be? The refined write over steps and rates, against the learned one.

A model's error can come from its write rule (a few learned gradient steps on the
energy) or from what its energy and read can express at all. This separates the two: on
`ebmm compare`'s seeded episodes it writes each batch with the model's learned steps
alone (a model whose own write refines, like omniglot-32, is not refined here unless
`--steps` and `--lr` name its setting), then refines the written floats
(`model.refine_memory`: Adam steps so that the model's read restores freshly drawn
distortions of the stored patterns, never the benchmark's queries) for each `--steps`
and `--lr`, and reads the benchmark's queries. Prints one
JSON line per N: the mean of `ebmm compare`'s metrics (`compare.episode_metrics`) for
the query, the learned write and each refinement, with seconds per write.

If a refined write is far better than the learned one, the slow weights and the read
can hold these patterns and the write rule is what falls short; if no refinement is, no
write into these floats can do it with this energy, and the energy must change.

    python examples/refine_sweep.py --model binary-128 --dataset binary \\
        --distortion eraseblock:64 --patterns 16,32,64 --episodes 3 --steps 25,100
    python examples/refine_sweep.py --model omniglot-32 --data-root ../shared/data \\
        --image-size 32 --distortion occlude:16 --patterns 64 --episodes 1 --steps 50
"""

from __future__ import annotations

import argparse
import json
import time

import ebmm_cli  # noqa: F401  first: OpenMP's threads sleep, not spin (ebmm_cli's docstring)

# isort: split
import torch

from ebmm_cli import builtin
from ebmm_cli.compare import CompareConfig, Episode, episode_metrics, make_episodes
from ebmm_cli.model import refine_memory, retrieve, write_memory
from ebmm_cli.store import load_model


def errors(out: torch.Tensor, episode: Episode) -> dict[str, float]:
    """`ebmm compare`'s metrics of one episode's retrievals, in the pattern's shape."""
    return episode_metrics(out.flatten(1), episode.patterns, episode.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model file or a built-in name")
    parser.add_argument("--dataset", default="omniglot")
    parser.add_argument("--data-root")
    parser.add_argument("--image-size", type=int)
    parser.add_argument(
        "--binarize", action="store_true", help="threshold at 0.5 (implied for a binarized model)"
    )
    parser.add_argument("--distortion", default="occlude:16")
    parser.add_argument("--patterns", default="64", help="comma-separated N")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--steps", default="100", help="comma-separated Adam step counts")
    parser.add_argument("--lr", default="0.01", help="comma-separated Adam rates")
    args = parser.parse_args()
    model = load_model(builtin.resolve(args.model))
    config = CompareConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        image_size=args.image_size,
        patterns=tuple(int(n) for n in args.patterns.split(",")),
        distortion=args.distortion,
        episodes=args.episodes,
        binarize=args.binarize or model.config.binarize,  # as `ebmm compare` reads it
    )
    settings = [(int(s), float(r)) for s in args.steps.split(",") for r in args.lr.split(",")]
    for n, episodes in make_episodes(config, tuple(model.config.energy.shape)).items():
        rows: dict[str, list[dict[str, float]]] = {"query": [], "learned write": []}
        for index, episode in enumerate(episodes):
            patterns = episode.patterns.view(-1, *episode.shape)
            queries = episode.queries.view(-1, *episode.shape)
            memory = write_memory(model, patterns).detach()
            rows["query"].append(errors(queries, episode))
            rows["learned write"].append(errors(retrieve(model, memory, queries)[-1], episode))
            for steps, lr in settings:
                start = time.monotonic()
                generator = torch.Generator().manual_seed(index)
                refined = refine_memory(model, memory, patterns, steps, lr, generator)
                row = errors(retrieve(model, refined, queries)[-1], episode)
                row["seconds"] = time.monotonic() - start
                rows.setdefault(f"refined {steps} at {lr:g}", []).append(row)
        means = {
            name: {k: round(sum(r[k] for r in values) / len(values), 3) for k in values[0]}
            for name, values in rows.items()
        }
        print(json.dumps({"n": n, **means}), flush=True)


if __name__ == "__main__":
    main()
