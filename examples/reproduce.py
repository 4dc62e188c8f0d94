"""Reproduce the paper's and the report's benchmarks: train what is needed, then compare.

Each experiment meta-trains its EBMM models with `ebmm train` (several at once with
`--jobs`, e.g. on a GPU), then runs `ebmm compare` on the same seeded episodes for the
models and the baselines, and writes into OUT: one run folder per model, `compare.json`
(`ebmm compare --json`), `compare.md`, `compare.png` (error against memory size or
number of patterns) and `summary.json` (machine, budget, wall times; for binary strings
also each model's paired difference from the pseudo-inverse Hopfield net, episode by episode).

    binary    128-bit strings, eraseblock:64, rnn at 8,256 floats trained at 64 and at 96
              patterns; Hopfield (Hebb, Storkey, pseudo-inverse), modern Hopfield,
              nearest neighbour, at 16/32/48/64/96 patterns (paper Table 1).
    omniglot  32x32, 64 images, occlude:16, conv at 2,308 / 4,616 / 16,156 floats, fc at
              2,313 / 4,626 / 16,191 floats and kv (ebmm's key-value memory, the recipe of the
              built-in omniglot-32) and kv-conv (the same, its written layer a 3x3
              convolution: omniglot-32-conv) at 2,304 / 4,608 / 16,128 floats against
              nearest neighbour (full and PCA-compressed)
              and Hopfield networks (paper Fig. 3, Hamming error), on characters
              thresholded at 0.5 (`--binarize`: the paper's are binary images).
    cifar10   32x32, 64 images, occlude:16, conv at 2,308 / 4,616 / 16,156 floats (paper
              Fig. 3, squared error). The shared JPEG copy has no test split: the comparison
              draws its episodes from the training images, and says so.
    imagenet64  downsampled ImageNet 64x64, 32 images (the paper used fewer than 64 and
              does not say how many), occlude:32, the paper's larger conv (`conv-large`,
              18,448 floats) against nearest neighbour. Needs the release under
              DATA_ROOT/imagenet64/ (not downloadable without an image-net.org account).
    report    Omniglot 28x28, 5-way 1-shot, 7x7 noise: conv vs fc, gradient vs decoder read,
              MSE vs SSIM+MSE loss (the student report), on the evaluation alphabets.

Episodes of images ignore classes (`train --set shots=0`, `compare --shots 0`): 64
images drawn at random.

    python examples/reproduce.py binary --minutes 30 --out runs/binary
    python examples/reproduce.py omniglot --minutes 60 --jobs 6 --device cuda --out runs/omni
    python examples/reproduce.py binary --compare-only --out runs/binary   # re-run the table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# The paper's image protocol, for training.
PAPER = [
    "--image-size", "32", "--batch-size", "64", "--set", "shots=0", "--distortion", "occlude:16"
]  # fmt: skip
HOPFIELD = "hopfield-hebb,hopfield-storkey,hopfield-pinv,modern-hopfield"

# Per experiment: training runs (name -> `ebmm train` arguments) and the comparison.
EXPERIMENTS: dict[str, dict] = {
    "binary": {
        "runs": {
            name: [
                "--dataset", "binary", "--memory", "rnn", "--batch-size", str(n),
                "--distortion", "eraseblock:64", "--set", "write_lr=1", "--set", "read_lr=5",
                "--set", "rule_lr=0.1", "--set", f"lr={lr}",
            ]
            for name, n, lr in (("rnn-64", 64, "2e-3"), ("rnn-96", 96, "2e-3"))
        },
        "compare": [
            "--dataset", "binary", "--patterns", "16,32,48,64,96",
            "--distortion", "eraseblock:64", "--episodes", "50",
            "--baselines", f"identity,nearest,{HOPFIELD}",
        ],
        "paired": ("hopfield-pinv", "hamming"),
    },
    "omniglot": {
        "runs": {
            **{
                f"conv-{d}": ["--memory", "conv", "--dynamic", str(d), *PAPER]
                for d in (2, 4, 14)
            },
            **{
                f"fc-{d}": ["--memory", "fc", "--dynamic", str(d), *PAPER]
                for d in (9, 18, 63)
            },
            **{
                # ebmm's key-value memory by the built-in omniglot-32's recipe (which
                # draws distinct characters; PAPER's shots=0 draws any 64 images)
                f"kv-{d}": ["--recipe", "omniglot-32", "--dynamic", str(d), *PAPER]
                for d in (36, 72, 252)
            },
            **{
                # the same with a 3x3 convolution as the written layer (omniglot-32-conv)
                f"kv-conv-{d}": ["--recipe", "omniglot-32-conv", "--dynamic", str(d), *PAPER]
                for d in (4, 8, 28)
            },
        },
        "train_data": ["--dataset", "omniglot", "--binarize"],
        "compare": [
            "--dataset", "omniglot", "--binarize", "--split", "test", "--image-size", "32",
            "--batch-size", "64", "--shots", "0", "--distortion", "occlude:16",
            "--episodes", "20", "--baselines",
            f"identity,nearest,nearest-pca:1,nearest-pca:3,nearest-pca:14,{HOPFIELD}",
        ],
    },
    "cifar10": {
        "runs": {
            f"conv-{d}": ["--memory", "conv", "--dynamic", str(d), *PAPER]
            for d in (2, 4, 14)
        },
        "train_data": ["--dataset", "cifar10"],
        "compare": [
            "--dataset", "cifar10", "--split", "train", "--image-size", "32",
            "--batch-size", "64", "--shots", "0", "--distortion", "occlude:16",
            "--episodes", "20", "--baselines", "identity,nearest,nearest-pca:1,nearest-pca:2",
        ],
    },
    "imagenet64": {
        "runs": {
            "conv-large-8": [
                "--memory", "conv-large", "--dynamic", "8", "--image-size", "64",
                "--batch-size", "32", "--set", "shots=0", "--distortion", "occlude:32",
            ],
        },
        "train_data": ["--dataset", "imagenet64"],
        "compare": [
            "--dataset", "imagenet64", "--split", "test", "--image-size", "64",
            "--batch-size", "32", "--shots", "0", "--distortion", "occlude:32",
            "--episodes", "20", "--baselines", "identity,nearest",
        ],
    },
    "report": {
        "runs": {
            name: [
                "--memory", memory, "--read", read, "--loss", loss, "--image-size", "28",
                "--batch-size", "5", "--distortion", "noise:7",
            ]
            for name, memory, read, loss in (
                ("conv-gd-ssim", "conv", "gd", "ssim+mse"),
                ("fc-gd-ssim", "fc", "gd", "ssim+mse"),
                ("conv-decoder-ssim", "conv", "decoder", "ssim+mse"),
                ("conv-gd-mse", "conv", "gd", "mse"),
            )
        },
        "train_data": ["--dataset", "omniglot"],
        "compare": [
            "--dataset", "omniglot", "--split", "test", "--image-size", "28",
            "--batch-size", "5", "--shots", "1", "--distortion", "noise:7",
            "--episodes", "100", "--baselines", "identity,nearest",
        ],
    },
}  # fmt: skip


def ebmm(*args: str) -> list[str]:
    """The `ebmm` command line, run with this interpreter."""
    return [sys.executable, "-m", "ebmm_cli", *args]


def train(out: Path, name: str, args: list[str], budget: list[str], common: list[str]) -> dict:
    """Train one model (or resume its run: only its `budget` may change) and return its
    last metrics and wall time."""
    run = out / name
    start = time.monotonic()
    resume = (run / "checkpoint.safetensors").exists()
    flags = ["--resume", *budget] if resume else [*args, *budget, *common]
    log = (out / f"{name}.log").open("w")
    subprocess.run(ebmm("train", "--out", str(run), *flags), check=True, stdout=log, stderr=log)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    return {"name": name, "wall_s": round(time.monotonic() - start, 1), "last": last}


def paired(rows: list[dict], baseline: str, metric: str) -> list[dict]:
    """Each model against `baseline` on the same episodes, per number of patterns: the
    mean of the per-episode differences (model minus baseline; below 0, the model is
    ahead), a 95% bootstrap interval of that mean, and the episodes each side wins."""
    generator = torch.Generator().manual_seed(0)
    base = {r["patterns"]: r[metric]["episodes"] for r in rows if r["method"] == baseline}
    out = []
    for row in rows:
        own = row["method"].startswith("ebmm:") and not row["method"].endswith(" unwritten")
        if not own or row["patterns"] not in base:  # the unwritten controls are not paired
            continue
        diff = torch.tensor(row[metric]["episodes"], dtype=torch.float64) - torch.tensor(
            base[row["patterns"]], dtype=torch.float64
        )
        picks = torch.randint(len(diff), (10_000, len(diff)), generator=generator)
        levels = torch.tensor([0.025, 0.975], dtype=diff.dtype)
        low, high = torch.quantile(diff[picks].mean(1), levels).tolist()
        out.append(
            {
                "method": row["method"], "against": baseline, "metric": metric,
                "patterns": row["patterns"], "mean_difference": float(diff.mean()),
                "bootstrap_95": [low, high],
                "model_better": int((diff < 0).sum()), "baseline_better": int((diff > 0).sum()),
            }
        )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget per model")
    parser.add_argument("--jobs", type=int, default=1, help="models trained at once")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", default=os.environ.get("EBMM_DATA") or None)
    parser.add_argument("--runs", help="comma-separated subset of the experiment's models")
    parser.add_argument("--episodes", type=int, help="episodes per comparison (default: spec)")
    parser.add_argument("--compare-only", action="store_true", help="use the trained models")
    args = parser.parse_args()

    spec = EXPERIMENTS[args.experiment]
    compare = list(spec["compare"])
    if args.episodes:
        compare[compare.index("--episodes") + 1] = str(args.episodes)
    runs = spec["runs"]
    if args.runs:
        runs = {k: v for k, v in runs.items() if k in args.runs.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    data = ["--data-root", args.data_root] if args.data_root else []
    budget = ["--minutes", str(args.minutes), "--device", args.device]
    common = ["--eval-episodes", "10", "--eval-every", "50", *data]
    summary: dict = {
        "experiment": args.experiment,
        "machine": f"{platform.node()}: {len(os.sched_getaffinity(0))} CPUs"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "minutes_per_model": args.minutes,
        "jobs": args.jobs,
        "date": time.strftime("%Y-%m-%d"),
    }
    if not args.compare_only:
        start = time.monotonic()
        with ThreadPoolExecutor(args.jobs) as pool:
            jobs = [
                pool.submit(
                    train, args.out, name, [*spec.get("train_data", []), *flags], budget, common
                )
                for name, flags in runs.items()
            ]
            summary["training"] = [job.result() for job in jobs]
        summary["training_wall_s"] = round(time.monotonic() - start, 1)

    models = [a for name in runs for a in ("--model", str(args.out / name / "model.safetensors"))]
    start = time.monotonic()
    result = subprocess.run(
        ebmm(
            "compare", *compare, *models, *data, "--device", args.device, "--json", "--force",
            "--markdown", str(args.out / "compare.md"), "--plot", str(args.out / "compare.png"),
        ),
        check=True, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    (args.out / "compare.json").write_text(result.stdout)
    summary["compare_wall_s"] = round(time.monotonic() - start, 1)
    if "paired" in spec:
        summary["paired"] = paired(json.loads(result.stdout)["rows"], *spec["paired"])
        for p in summary["paired"]:
            print(
                f"{p['method']} - {p['against']}, {p['metric']} at {p['patterns']}: "
                f"{p['mean_difference']:+.2f} [{p['bootstrap_95'][0]:+.2f}, "
                f"{p['bootstrap_95'][1]:+.2f}], better on {p['model_better']} episodes, "
                f"worse on {p['baseline_better']}"
            )
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print((args.out / "compare.md").read_text())


if __name__ == "__main__":
    main()
