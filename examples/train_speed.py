"""Meta-training speed of `ebmm train` for the report's and the paper's protocols.

Times `--steps` meta-steps (after one warm-up step), second and first order, and prints
seconds per step, steps/s and images/s:

- report: conv on Omniglot 28x28, 5 images per episode, 7x7 noise block, SSIM+MSE, T = K = 5;
- paper:  conv on Omniglot 32x32, 64 images, 16x16 occlusion, MSE, T = K = 5 (4,616 floats);
- binary: rnn on 128-bit strings, 64 patterns, eraseblock:64 (8,256 floats).

    python examples/train_speed.py --data-root ../shared/data --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from ebmm_cli.memory import RuleConfig
from ebmm_cli.meta import TrainConfig, Trainer, default_model_config

PROTOCOLS = {
    "report": {
        "memory": "conv",
        "size": 28,
        "batch": 5,
        "distortion": "noise:7",
        "loss": "ssim+mse",
    },
    "paper": {"memory": "conv", "size": 32, "batch": 64, "distortion": "occlude:16", "loss": "mse"},
    "binary": {
        "memory": "rnn",
        "size": None,
        "batch": 64,
        "distortion": "eraseblock:64",
        "loss": "mse",
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("EBMM_DATA") or None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    rows = []
    for name, p in PROTOCOLS.items():
        for first_order in (False, True):
            dataset = "binary" if p["memory"] == "rnn" else "omniglot"
            model = default_model_config(
                p["memory"], dataset, p["size"], 1, None, RuleConfig(), p["distortion"], p["loss"]
            )
            config = TrainConfig(
                model,
                data_root=args.data_root,
                batch_size=p["batch"],
                shots=None,  # random images: the same tensors, without learn2learn's sampler
                first_order=first_order,
                device=args.device,
                eval_episodes=1,
            )
            with tempfile.TemporaryDirectory() as tmp:
                trainer = Trainer.create(config, Path(tmp))
                trainer.train_step(trainer.batch())  # warm-up
                seconds = 0.0
                for _ in range(args.steps):
                    batch = trainer.batch()
                    if trainer.device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    trainer.train_step(batch)
                    if trainer.device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds += time.perf_counter() - start
            per_step = seconds / args.steps
            rows.append(
                {
                    "protocol": name,
                    "order": "first" if first_order else "second",
                    "s_per_step": round(per_step, 3),
                    "steps_per_s": round(1 / per_step, 3),
                    "images_per_s": round(p["batch"] / per_step, 1),
                    "device": str(trainer.device),
                    "threads": torch.get_num_threads(),
                }
            )
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
