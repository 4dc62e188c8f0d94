"""Speed benchmark: meta-training steps, write and read, peak memory, CLI start-up.

For each protocol, in its own child process (so that its peak memory is its own):

- report: conv on Omniglot 28x28, 5 images per episode, 7x7 noise block, SSIM+MSE;
- paper:  conv on Omniglot 32x32, 64 images, 16x16 occlusion, MSE (4,616 floats);
- binary: rnn on 128-bit strings, 64 patterns, eraseblock:64 (8,256 floats);
- ebmm:   the recipe omniglot-32-ebmm at 64 characters (kv, a read of K = 10 descent
          steps on the energy);

all with T = 5 (and K = 5 but for ebmm), it times `--steps` meta-training steps, second
and first order (after warm-up steps), and `--steps` inference writes and reads of one
episode; then it times `ebmm --help` and `ebmm distort` on five Omniglot images in fresh
processes. It prints a table and, with `--json FILE`, writes every number with the
machine it ran on (and OpenMP's wait policy: the README's speed tables were measured
before ebmm_cli set `PASSIVE`, with GNU OpenMP's spinning default). On CUDA,
`--cuda-graph off,on` times every protocol launching kernels one by one and replaying
CUDA graphs, and the table gives the speed-up of each over the eager row.

    python examples/bench.py --data-root ../shared/data --steps 5 --json bench.json
    python examples/bench.py --data-root ../shared/data --quick     # CI-sized: seconds
    python examples/bench.py --protocols paper --processes 2        # under torchrun (gloo)
    python examples/bench.py --protocols report --episodes 8        # 8 episodes per step
    python examples/bench.py --device cuda --cuda-graph off,on      # eager against graphs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import ebmm_cli  # noqa: F401  first: OpenMP's threads sleep, not spin (ebmm_cli's docstring)

# isort: split
import torch

from ebmm_cli.evaluation import Batch
from ebmm_cli.meta import Trainer
from ebmm_cli.recipes import RECIPES

PROTOCOLS: dict[str, dict] = {
    "report": dict(memory="conv", image_size=28, batch_size=5, distortion="noise:7",
                   loss="ssim+mse"),
    "paper": dict(memory="conv", image_size=32, batch_size=64, distortion="occlude:16"),
    "binary": dict(dataset="binary", memory="rnn", batch_size=64, distortion="eraseblock:64"),
    "ebmm": {**RECIPES["omniglot-32-ebmm"]["train"], "batch_size": 64, "episodes_per_step": 1},
}  # fmt: skip
"""Each protocol's `train_config` keywords (one episode per step: `--episodes` sets it)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Mean seconds of `fn()` over `repeats` calls, after warm-up calls: one on the
    CPU, three on CUDA (a CUDA graph's two eager calls and its capture)."""
    for _ in range(3 if device.type == "cuda" else 1):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _step(trainer: Trainer, batches: Iterator[list[Batch]]) -> None:
    trainer.step_fn(next(batches), trainer.generator)


def measure(
    name: str,
    data_root: str | None,
    steps: int,
    device: str,
    episodes: int = 1,
    cuda_graph: str = "auto",
) -> dict | None:
    """Every timing of one protocol, in this process. Under torchrun, the meta-training
    steps of all processes together (images = all processes' episodes); rank 0 reports."""
    from ebmm_cli.meta import init_distributed
    from ebmm_cli.model import retrieve, write_memory
    from ebmm_cli.runconfig import train_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = init_distributed(device) or device
    p = PROTOCOLS[name]
    row: dict = {
        "protocol": name,
        "images": p["batch_size"] * episodes * world,
        "episodes_per_step": episodes,
        "processes": world,
        "cuda_graph": cuda_graph,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for order in ("second", "first"):
            config = train_config(
                **p,
                steps=steps + 1,
                data_root=data_root,
                shots=0,  # random images: the same tensors, without learn2learn's sampler
                first_order=order == "first",
                device=device,
                eval_episodes=1,
                cuda_graph=cuda_graph,
            )
            trainer = Trainer.create(config, Path(tmp) / order)
            warm = 3 if trainer.device.type == "cuda" else 1
            batches = iter(
                [[trainer.batch() for _ in range(episodes)] for _ in range(steps + warm)]
            )
            seconds = _timed(partial(_step, trainer, batches), trainer.device, steps)
            row[f"{order}_s_per_step"] = seconds
            row[f"{order}_images_per_s"] = row["images"] / seconds
        if world > 1:  # write and read do not change with processes
            return row if trainer.rank == 0 else None
        trainer.model.eval()
        batch = trainer.batch()
        memory = write_memory(trainer.model, batch.patterns).detach()
        model = trainer.model
        row["write_read_ms"] = 1e3 * _timed(
            lambda: retrieve(model, write_memory(model, batch.patterns), batch.queries),
            trainer.device,
            steps,
        )
        row["write_ms"] = 1e3 * _timed(
            lambda: write_memory(trainer.model, batch.patterns), trainer.device, steps
        )
        row["read_ms"] = 1e3 * _timed(
            lambda: retrieve(trainer.model, memory, batch.queries), trainer.device, steps
        )
    if trainer.device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated(trainer.device) / 2**20
        row["peak_kind"] = "CUDA allocated"
    else:
        row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row["peak_kind"] = "process RSS"
    row["device"] = str(trainer.device)
    return row


def sample_pngs(data_root: str | None, out: Path, n: int = 5) -> list[Path]:
    """`n` Omniglot PNGs copied into `out`, from the extracted tree or the official zip."""
    root = Path(data_root) / "omniglot" if data_root else None
    if root is None:
        return []
    found = sorted(root.glob("images_background/*/*/*.png"))[:n]
    if found:
        return found
    archive = root / "images_background.zip"
    if not archive.exists():
        return []
    with zipfile.ZipFile(archive) as z:
        names = sorted(m for m in z.namelist() if m.endswith(".png"))[:n]
        for name in names:
            (out / Path(name).name).write_bytes(z.read(name))
    return [out / Path(name).name for name in names]


def startup(data_root: str | None, repeats: int) -> dict:
    """Median wall seconds of `ebmm --help` and of `ebmm distort` on five Omniglot PNGs."""
    ebmm = [sys.executable, "-m", "ebmm_cli"]
    commands = {"help_s": [*ebmm, "--help"]}
    with tempfile.TemporaryDirectory() as tmp:
        images = sample_pngs(data_root, Path(tmp))
        if images:
            out = str(Path(tmp) / "out")
            commands["distort_s"] = [*ebmm, "distort", *map(str, images), "--out", out, "--force"]
        result = {}
        for key, command in commands.items():
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                times.append(time.perf_counter() - start)
            result[key] = statistics.median(times)
    return result


def machine() -> str:
    cpus = len(os.sched_getaffinity(0))
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    policy = os.environ["OMP_WAIT_POLICY"]  # set by ebmm_cli unless the caller chose
    threads = f"{torch.get_num_threads()} torch threads ({policy} OpenMP waits)"
    return f"{platform.node()}: {cpus} CPUs, {threads}{gpu}"


def _speedup(row: dict, base: dict | None, key: str) -> str:
    """ " (N.Nx)": how many times faster than `base` (eager) `row` did `key` (seconds)."""
    if base is None or key not in base:
        return ""
    return f" ({base[key] / row[key]:.1f}x)"


def table(rows: list[dict], start: dict) -> str:
    """The markdown table; with eager and graph rows of a protocol, the graph rows' second-
    and first-order steps and inference as multiples of the eager row's speed."""
    lines = [
        "| protocol | graph | images | 2nd order s/step | images/s | 1st order s/step "
        "| images/s | write ms | read ms | write + read ms | peak MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    eager = {(r["protocol"], r["images"]): r for r in rows if r.get("cuda_graph") == "off"}
    for r in rows:
        base = eager.get((r["protocol"], r["images"])) if r.get("cuda_graph") != "off" else None
        x = partial(_speedup, r, base)
        rest = "| - | - | - | - |"  # distributed rows time training only
        if "write_ms" in r:
            peak = f"{r['peak_mib']:.0f} ({r['peak_kind']})"
            rest = (
                f"| {r['write_ms']:.0f} | {r['read_ms']:.0f} "
                f"| {r['write_read_ms']:.0f}{x('write_read_ms')} | {peak} |"
            )
        lines.append(
            f"| {r['protocol']} | {r.get('cuda_graph', '-')} | {r['images']} "
            f"| {r['second_s_per_step']:.3f}{x('second_s_per_step')} "
            f"| {r['second_images_per_s']:.1f} "
            f"| {r['first_s_per_step']:.3f}{x('first_s_per_step')} "
            f"| {r['first_images_per_s']:.1f} {rest}"
        )
    lines.append("")
    lines.extend(f"{k.removesuffix('_s')} start-up: {v:.2f} s" for k, v in start.items())
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("EBMM_DATA") or None)
    parser.add_argument("--protocols", default="report,paper,binary,ebmm")
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions of each part")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="report protocol, 1 step: CI-sized")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument(
        "--processes", type=int, default=1, help="time meta-training under torchrun with N"
    )
    parser.add_argument(
        "--episodes", type=int, default=1, help="episodes per meta-step (written together)"
    )
    parser.add_argument(
        "--cuda-graph",
        default="auto",
        help="auto, on or off, or several (off,on): each protocol is timed in each mode",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row = measure(
            args.child, args.data_root, args.steps, args.device, args.episodes, args.cuda_graph
        )
        if row is not None:
            print(json.dumps(row))
        return
    names = ["report"] if args.quick else args.protocols.split(",")
    steps = 1 if args.quick else args.steps
    unknown = set(names) - set(PROTOCOLS)
    if unknown:
        parser.error(f"unknown protocol(s) {sorted(unknown)}; choose from {sorted(PROTOCOLS)}")
    rows = []
    for name, mode in ((n, m) for n in names for m in args.cuda_graph.split(",")):
        child = [sys.executable, __file__, "--child", name, "--steps", str(steps)]
        child += ["--episodes", str(args.episodes), "--cuda-graph", mode]
        if args.processes > 1:  # torchrun's own defaults: OMP_NUM_THREADS=1 per process
            child[1:1] = ["-m", "torch.distributed.run", "--nproc-per-node", str(args.processes)]
        child += ["--device", args.device]
        if args.data_root:
            child += ["--data-root", args.data_root]
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.splitlines()[-1]))
    start = startup(args.data_root, 1 if args.quick else 3)
    print(table(rows, start))
    if args.json:
        result = {
            "machine": machine(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "steps": steps,
            "rows": rows,
            "startup": start,
        }
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
