"""Kill a training run at random moments, resume it, and check the end result.

Trains once without interruption, then the same run again while killing it (`kill -9`,
no chance to clean up; or SIGTERM with `--signal TERM`, or Ctrl-C's SIGINT with
`--signal INT`, which ebmm answers by finishing the step and saving a checkpoint) at
random moments `--kills` times, each time continuing with
`ebmm train --resume`. Prints JSON: the step each kill landed after, whether the
resumed run's final model and metrics agree with the uninterrupted run's (the model's
weights, and the metrics but wall-clock seconds, to the last bits that MKL's reductions
leave to chance: `store.model_parting`, `meta.metrics_parting`), and if not, where they
part. Exits 1 if either parts.

    python examples/kill_resume.py --kills 5 --steps 40 --out runs/kill
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from ebmm_cli.meta import metrics_parting, read_metrics
from ebmm_cli.store import model_parting, read_header


def train_command(out: Path, steps: int, seed: int, resume: bool) -> list[str]:
    """A small, fast binary-string run that checkpoints after every step."""
    args = ["--resume"] if resume else [
        "--dataset", "binary", "--memory", "rnn", "--batch-size", "8", "--write-steps", "2",
        "--read-steps", "2", "--eval-every", "5", "--eval-episodes", "2",
        "--set", "checkpoint_minutes=0", "--device", "cpu", "--seed", str(seed),
    ]  # fmt: skip
    return [
        sys.executable,
        "-m",
        "ebmm_cli",
        "train",
        "--out",
        str(out),
        "--steps",
        str(steps),
        *args,
    ]


def checkpoint_step(out: Path) -> int:
    """The step of the run's last checkpoint (0 if none yet)."""
    path = out / "checkpoint.safetensors"
    if not path.exists():
        return 0
    return int(json.loads(read_header(path)["state"])["step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="of the run and of the kill times")
    parser.add_argument(
        "--signal",
        choices=["KILL", "TERM", "INT"],
        default="KILL",
        help="KILL: no chance to clean up (resumes from the last checkpoint); TERM: what "
        "`timeout` or a scheduler sends (ebmm saves a checkpoint and exits 143); INT: "
        "Ctrl-C (the same, exit 130)",
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    whole, split = args.out / "whole", args.out / "split"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    if not (whole / "model.safetensors").exists():
        subprocess.run(train_command(whole, args.steps, args.seed, False), check=True, **quiet)

    kills, codes = [], []
    resume = (split / "checkpoint.safetensors").exists()
    while True:
        proc = subprocess.Popen(train_command(split, args.steps, args.seed, resume), **quiet)
        resume = True
        if len(kills) < args.kills:
            start = checkpoint_step(split)
            # Wait for progress past the last checkpoint, then kill at a random moment.
            while proc.poll() is None and checkpoint_step(split) <= start:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
            if proc.poll() is None:
                sent = getattr(signal, f"SIG{args.signal}")
                proc.send_signal(sent)
                code = proc.wait()
                # A signal that lands after the last step, while Python tears itself down
                # (ebmm's handlers are gone by then), kills with -15 or -2: nothing is
                # lost, since everything was written; anywhere else ebmm must answer with
                # 143 (SIGTERM) or 130 (Ctrl-C).
                finished = checkpoint_step(split) == args.steps and code == -sent
                expected = {"TERM": 143, "INT": 130}.get(args.signal)
                if expected and code not in (expected, 0) and not finished:
                    raise SystemExit(f"SIG{args.signal} gave exit code {code}, not {expected}")
                kills.append(checkpoint_step(split))
                codes.append(code)
                continue
        if proc.wait() != 0:
            raise SystemExit(f"resumed run failed with exit code {proc.returncode}")
        break

    # where the two runs part (None: they agree, to the evaluation's last bits)
    parted = metrics_parting(read_metrics(whole), read_metrics(split))
    model = model_parting(whole / "model.safetensors", split / "model.safetensors")
    leftovers = sorted(p.name for p in split.iterdir() if p.name.endswith(".tmp"))
    report = {
        "steps": args.steps,
        "killed_after_checkpoint_steps": kills,
        "exit_codes": codes,
        "same_metrics": parted is None,
        "same_model": model is None,
        "model_parting": model,
        "first_differing_metrics": parted,
        "temporary_files_left": leftovers,
    }
    print(json.dumps(report))
    if not (parted is None and model is None and not leftovers):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
