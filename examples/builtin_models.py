"""The built-in models (`ebmm models`): each made by its recipe (`ebmm_cli/recipes.py`,
`ebmm train --recipe NAME`), then exported here.

    # 1. train by the recipe (an `ebmm train` run folder; resumable with --resume)
    python examples/builtin_models.py train omniglot-28 --minutes 45 --out runs/omniglot-28
    python examples/builtin_models.py train binary-128 --steps 10000 --out runs/binary-128
    # 2. evaluate in float32 and float16 on fixed held-out episodes, and write
    #    ebmm_cli/models/omniglot-28.safetensors in float16 with its provenance
    python examples/builtin_models.py export omniglot-28 --run runs/omniglot-28 \
        --machine "2-core CPU, 1 torch thread"

    # 3. the controls `ebmm models` shows beside the held-out numbers: the same queries
    #    read with nothing written, and the seconds one write of N patterns takes here
    python examples/builtin_models.py controls omniglot-28 --machine "2-core CPU"

The export refuses a run whose configuration is not the recipe's, and records in the
file's header (`provenance`): the recipe's `ebmm train` command, the commit exported
from and the ebmm version trained with, steps, minutes, machine, and the held-out
metrics of the float16 file (and of float32, to show the narrowing costs nothing).
`controls` rewrites that header alone (the tensors stay as they are).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import ebmm_cli  # noqa: F401  first: OpenMP's threads sleep, not spin (ebmm_cli's docstring)

# isort: split
import torch

from ebmm_cli import builtin
from ebmm_cli.compare import ModelMethod
from ebmm_cli.evaluation import evaluate_sets, heldout_sets
from ebmm_cli.memory import RuleConfig
from ebmm_cli.meta import _datasets, read_metrics
from ebmm_cli.model import Model
from ebmm_cli.recipes import RECIPES, recipe_arguments
from ebmm_cli.runconfig import TrainConfig, train_config
from ebmm_cli.store import load_checkpoint, load_model, read_header, save_model

KEPT = ("mse", "query_mse", "ssim", "query_ssim", "hamming", "query_hamming", "nonfinite",
        "refined_mse", "refined_ssim", "refined_hamming", "unwritten_mse",
        "unwritten_hamming")  # fmt: skip


def _command(name: str) -> str:
    return "ebmm train " + " ".join(recipe_arguments(name))


def train(name: str, out: Path, budget: list[str], data_root: str | None) -> None:
    """Run the recipe's `ebmm train` for `budget` (`--minutes M` or `--steps S`: the
    learning rate decays over it), resuming `out` when it holds a run."""
    ebmm = [sys.executable, "-m", "ebmm_cli", "train", "--out", str(out)]
    if (out / "checkpoint.safetensors").exists():
        command = [*ebmm, "--resume", *budget]
    else:
        command = [*ebmm, "--recipe", name, *budget]
        command += ["--eval-every", "100"] + (["--data-root", data_root] if data_root else [])
    subprocess.run(command, check=True)


def _evaluate(model: Any, config: TrainConfig, episodes: int) -> dict[str, Any]:
    """Held-out metrics over `episodes` fixed episodes per N (the run's own held-out
    seeds and split), with the ratios a reader wants; for a model whose write refines
    (`RuleConfig.refine`), `refined_*` too: its own write's, beside the learned steps'."""
    _, held, split = _datasets(config)
    sets = heldout_sets(held, config, model.distortion, episodes)
    merged = evaluate_sets(model, sets, refine=model.config.rules.refine)
    out: dict[str, Any] = {k: round(float(merged[k]), 5) for k in KEPT if k in merged}
    out["mse_ratio"] = round(merged["mse"] / merged["query_mse"], 4)
    if "by_n" in merged:
        out["by_n"] = {
            n: {k: round(float(r[k]), 4) for k in ("mse", "query_mse", "hamming", "query_hamming")}
            for n, r in merged["by_n"].items()
        }
    out["episodes"], out["split"] = episodes, split
    return out


def export(
    name: str,
    run: Path,
    machine: str,
    data_root: str | None,
    folder: Path = builtin.FOLDER,
    episodes: int | None = None,
) -> Path:
    """Evaluate the run's model in float32 and float16 on `episodes` per N (default the
    recipe's); write the float16 model into `folder` (default the package's built-ins)."""
    _, _, state = load_checkpoint(run / "checkpoint.safetensors")
    recipe = RECIPES[name]
    expected = train_config(**recipe["train"], steps=1)
    config = _with_patterns(TrainConfig.from_json(state["train_config"]))
    config = _with_refinement(config, expected)
    run_fields = {k: getattr(config, k) for k in _RUN_FIELDS}
    if config.model.to_json() != expected.model.to_json() or run_fields != {
        k: getattr(expected, k) for k in _RUN_FIELDS
    }:
        raise SystemExit(f"{run} was not trained by the {name} recipe ({_command(name)})")
    config = TrainConfig.from_json(
        json.dumps({**json.loads(config.to_json()), "data_root": data_root, "device": "cpu"})
    )
    step = int(read_header(run / "model.safetensors")["step"])  # newer than metrics if stopped
    if state["step"] == step:
        seconds = state["elapsed"]
    else:
        metrics = read_metrics(run)
        seconds = next(m["seconds"] for m in metrics if m["step"] == step)
    trained = load_model(run / "model.safetensors")
    full = Model(config.model)  # the run's configuration, with its N range recorded
    full.load_state_dict(trained.state_dict())
    episodes = episodes or recipe["episodes"]
    target = folder / f"{name}.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    provenance = {
        "what": recipe["what"],
        "command": _command(name) + _budget(config),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "ebmm_version": read_header(run / "model.safetensors").get("ebmm_version", "unknown"),
        "steps": step,
        "minutes": round(seconds / 60, 1),
        "machine": machine,
        "memory_floats": full.memory_floats(),
        "heldout_float32": _evaluate(full, config, episodes),
    }
    save_model(full, target, dtype=torch.float16, provenance=provenance)
    half = load_model(target)
    provenance["heldout"] = _evaluate(half, config, episodes)
    save_model(full, target, dtype=torch.float16, provenance=provenance)
    print(json.dumps(provenance, indent=2))
    print(f"{target}: {target.stat().st_size / 2**20:.1f} MiB")
    return target


def controls(name: str, machine: str, data_root: str | None, folder: Path = builtin.FOLDER) -> Path:
    """Add to a built-in's provenance what tells a memory from a denoiser and what its
    write costs: the held-out queries read with nothing written (`unwritten_*`, on the
    export's own episodes) and the seconds of one write of N patterns, its own (learned
    steps, then any refinement), on `machine`; for a model trained over a range of N,
    the range's largest (the protocol's N, where a write costs most). Only the header
    changes."""
    target = folder / f"{name}.safetensors"
    model = load_model(target)
    provenance = json.loads(read_header(target)["provenance"])
    held = provenance["heldout"]
    config = train_config(**RECIPES[name]["train"], steps=1, data_root=data_root, device="cpu")
    _, data, _ = _datasets(config)
    sets = heldout_sets(data, config, model.distortion, held["episodes"])
    merged = evaluate_sets(model, sets)
    for key in ("unwritten_mse", "unwritten_hamming"):
        held[key] = round(float(merged[key]), 5)
        for n, row in held.get("by_n", {}).items():
            row[key] = round(float(merged["by_n"][n][key]), 4)
    patterns = sets[max(sets)][0].patterns
    own = ModelMethod(model, name, refine=model.config.rules.refine)
    own.write(patterns)  # the first call pays for loading kernels
    start = time.perf_counter()
    own.write(patterns)
    provenance["write"] = {
        "patterns": len(patterns),
        "seconds": round(time.perf_counter() - start, 3),
        "machine": machine,
    }
    save_model(model, target, dtype=torch.float16, provenance=provenance)
    print(json.dumps({"heldout": held, "write": provenance["write"]}, indent=2))
    return target


def _budget(config: TrainConfig) -> str:
    """The run's budget as options (the learning rate decays over it, so it is part of
    the recipe even when the run was stopped, or resumed, before its end)."""
    text = f" --steps {config.steps}" if config.steps is not None else ""
    return text + (f" --minutes {config.minutes:g}" if config.minutes is not None else "")


def _with_patterns(config: TrainConfig) -> TrainConfig:
    """A run from before models recorded their N range (`RuleConfig.patterns`), with it."""
    rules = config.model.rules
    if rules.patterns is not None:
        return config
    least = config.batch_min or config.batch_size
    model = replace(config.model, rules=replace(rules, patterns=(least, config.batch_size)))
    return replace(config, model=model)


def _with_refinement(config: TrainConfig, expected: TrainConfig) -> TrainConfig:
    """A run trained without the recipe's write refinement (`--write-refine`, which no
    training step takes: a run from before the option, or that left it out), with it."""
    rules, wanted = config.model.rules, expected.model.rules
    if (rules.refine, rules.refine_lr) != (0, RuleConfig().refine_lr):
        return config  # set by the run: the check that follows compares it
    rules = replace(rules, refine=wanted.refine, refine_lr=wanted.refine_lr)
    return replace(config, model=replace(config.model, rules=rules))


# What, beside the model's configuration, makes a run the recipe's.
_RUN_FIELDS = (
    "batch_size",
    "batch_min",
    "shots",
    "lr",
    "rule_lr",
    "first_order",
    "contrast",
    "episodes_per_step",
    "init",
)


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("train", "export", "controls"))
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--out", type=Path, help="train: the run folder")
    parser.add_argument("--run", type=Path, help="export: the run folder")
    parser.add_argument("--minutes", type=float, default=45.0, help="train: the budget")
    parser.add_argument("--steps", type=int, help="train: a budget in steps instead")
    parser.add_argument("--machine", default="unknown machine")
    parser.add_argument("--to", type=Path, default=builtin.FOLDER, help="export: the folder")
    parser.add_argument("--episodes", type=int, help="export: per N (default: the recipe's)")
    parser.add_argument("--data-root", default=os.environ.get("EBMM_DATA") or None)
    args = parser.parse_args()
    if args.action == "train":
        budget = ["--steps", str(args.steps)] if args.steps else ["--minutes", str(args.minutes)]
        train(args.name, args.out or Path("runs") / args.name, budget, args.data_root)
    elif args.action == "controls":
        controls(args.name, args.machine, args.data_root, args.to)
    else:
        export(args.name, args.run, args.machine, args.data_root, args.to, args.episodes)


if __name__ == "__main__":
    main()
