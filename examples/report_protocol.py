"""The report's protocol, measured: Omniglot 28x28, 5-way 1-shot, 7x7 noise block, SSIM+MSE.

Meta-trains `conv` (or `fc`) on the background alphabets for a time budget with
`ebmm train`, then evaluates on held-out episodes from the evaluation alphabets, which
training never sees: MSE and SSIM of retrievals and of queries, and the mean energies
of originals, queries and retrievals (the report's Table 1). Prints a table and writes
`OUT/report_protocol.json`.

    python examples/report_protocol.py --data-root ../shared/data --minutes 15 --out runs/report
    python examples/report_protocol.py --model runs/report/model.safetensors   # evaluate only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ebmm_cli.data import load_dataset
from ebmm_cli.distort import Distortion
from ebmm_cli.evaluation import evaluate_episodes, heldout_batches
from ebmm_cli.runconfig import TrainConfig
from ebmm_cli.store import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("EBMM_DATA") or None)
    parser.add_argument("--out", type=Path, default=Path("runs/report"))
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--memory", default="conv", choices=["conv", "fc"])
    parser.add_argument("--read", default="gd", choices=["gd", "decoder"])
    parser.add_argument("--loss", default="ssim+mse", choices=["mse", "ssim+mse"])
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--episodes", type=int, default=100, help="held-out episodes")
    parser.add_argument("--model", type=Path, help="evaluate this model instead of training")
    args = parser.parse_args()

    if args.model is None:
        command = [
            sys.executable,
            "-m",
            "ebmm_cli",
            "train",
            "--memory",
            args.memory,
            "--dataset",
            "omniglot",
            "--image-size",
            "28",
            "--batch-size",
            "5",
            "--distortion",
            "noise:7",
            "--loss",
            args.loss,
            "--read",
            args.read,
            "--minutes",
            str(args.minutes),
            "--eval-every",
            "100",
            "--out",
            str(args.out),
        ]
        if args.data_root:
            command += ["--data-root", args.data_root]
        if args.first_order:
            command += ["--set", "first_order=true"]
        print(" ".join(command), file=sys.stderr)
        started = time.monotonic()
        subprocess.run(command, check=True)
        print(f"trained in {(time.monotonic() - started) / 60:.1f} min", file=sys.stderr)
        args.model = args.out / "model.safetensors"
    model = load_model(args.model)
    config = TrainConfig(model.config, data_root=args.data_root, device="cpu", seed=12345)
    held = load_dataset("omniglot", "test", args.data_root, 28)
    batches = heldout_batches(held, config, Distortion.parse("noise:7"), args.episodes)
    result = evaluate_episodes(model, batches)
    result["mse_ratio"] = result["mse"] / result["query_mse"]
    result["episodes"] = args.episodes
    result["model"] = str(args.model)
    metrics = args.out / "metrics.jsonl"
    if metrics.exists():
        last = json.loads(metrics.read_text().splitlines()[-1])
        result["train_steps"], result["train_seconds"] = last["step"], last["seconds"]
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report_protocol.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
