"""Peak memory of `ebmm write` as the number of images grows.

Writes N images of 28x28 (random strokes, made here) with the built-in omniglot-28 model
in a fresh `python -m ebmm_cli write` process per N, and prints the process's peak
resident memory (ru_maxrss). A write accumulates its gradient over pieces of
`WRITE_CHUNK` images, so the peak should stay nearly flat in N: the images themselves
are 3 KB each.

    python examples/bench_write_memory.py                 # N = 2,000
    python examples/bench_write_memory.py --counts 100,2000
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, count: int, size: int = 28, seed: int = 0) -> None:
    """`count` grayscale PNGs of dark strokes on white, as Omniglot's files are."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = np.full((size, size), 255, np.uint8)
        for _ in range(3):  # three random strokes, each a short straight line
            r0, c0, r1, c1 = rng.integers(2, size - 2, 4)
            steps = max(abs(r1 - r0), abs(c1 - c0), 1)
            for t in np.linspace(0, 1, steps * 2):
                r, c = int(r0 + t * (r1 - r0)), int(c0 + t * (c1 - c0))
                img[r - 1 : r + 1, c - 1 : c + 1] = 0
        Image.fromarray(img, "L").save(folder / f"{i:05d}.png")


def peak_write(images: Path, out: Path, device: str) -> tuple[float, float]:
    """Peak RSS (MB) and seconds of one `ebmm write` of the folder `images`, alone in
    its process (the children's maximum is read before and after: only a new peak
    shows, so each N runs in a wrapper process of its own)."""
    code = (
        "import resource, subprocess, sys; "
        "r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.exit(r.returncode)"
    )
    command = [sys.executable, "-m", "ebmm_cli", "write", str(images), "-o", str(out),
               "--force", "--device", device]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code, *command], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"ebmm write failed: {result.stderr.strip()}")
    kilobytes = int(result.stdout.strip().splitlines()[-1])
    return kilobytes / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="2000", help="comma-separated N (default 2000)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    assert resource.RUSAGE_CHILDREN  # Unix only
    with tempfile.TemporaryDirectory() as tmp:
        for count in (int(c) for c in args.counts.split(",")):
            folder = Path(tmp) / f"images-{count}"
            make_images(folder, count)
            mb, seconds = peak_write(folder, Path(tmp) / f"memory-{count}.safetensors", args.device)
            print(
                f"ebmm write of {count:,} images of 28x28 (omniglot-28, {args.device}): "
                f"peak RSS {mb:,.0f} MB, {seconds:.1f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
