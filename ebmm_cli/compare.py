"""One benchmark harness for EBMM models and baselines, on the same seeded episodes.

Every method writes the same episodes and reads the same distorted queries; per method
and number of written patterns it reports the memory size in floats and, over episodes
(mean, 5th and 95th percentiles): squared error per pattern (summed over pixels), MSE,
Hamming error (after thresholding at 0.5), SSIM (images), PSNR, and write and read
milliseconds per episode. The library returns rows; the CLI prints them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ebmm_cli import baselines
from ebmm_cli.data import BinaryStrings, Episodes, load_dataset
from ebmm_cli.distort import Distortion
from ebmm_cli.errors import EbmmError
from ebmm_cli.metrics import hamming, ssim
from ebmm_cli.model import Model, refine_memory, retrieve, unwritten_memory, write_memory

METRICS = ("sq_error", "mse", "hamming", "ssim", "psnr", "write_ms", "read_ms")


class Method(Protocol):
    """What the harness needs of a method: a name, a memory size, write and read."""

    name: str

    def memory_floats(self, n: int, d: int) -> int: ...

    def write(self, patterns: torch.Tensor) -> Any: ...

    def read(self, memory: Any, queries: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ModelMethod:
    """A trained EBMM model as a method: patterns in the model's own shape.

    `unwritten`: the control that writes nothing, reading every query from θ̄ (and an
    unadapted decoder). A model can beat the query on what its slow weights learned of
    the data alone; the gap between its row and this one is what its memory stores.

    `refine`: Adam steps of `refine_memory` after the learned write (0: none; the
    model's own write is `refine=model.config.rules.refine`), at rate `refine_lr` (None:
    the model's).
    """

    model: Model
    name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    unwritten: bool = False
    refine: int = 0
    refine_lr: float | None = None

    def memory_floats(self, n: int, d: int) -> int:
        return self.model.memory_floats()

    def write(self, patterns: torch.Tensor) -> Any:
        if self.unwritten:
            return unwritten_memory(self.model)
        shaped = patterns.reshape(-1, *self.model.config.energy.shape).to(self.device)
        memory = write_memory(self.model, shaped, generator=torch.Generator().manual_seed(0))
        if self.refine:
            memory = refine_memory(self.model, memory, shaped, self.refine, self.refine_lr)
        return memory.detach()

    def read(self, memory: Any, queries: torch.Tensor) -> torch.Tensor:
        shaped = queries.reshape(-1, *self.model.config.energy.shape).to(self.device)
        return retrieve(self.model, memory, shaped)[-1].reshape(queries.shape).cpu()


@dataclass(frozen=True)
class CompareConfig:
    """The benchmark: data, episode sizes, distortion, number of episodes, seed; `invert`
    reads a folder's images as ink = 1 (for a model trained with `--invert`), `binarize`
    thresholds the images at 0.5 (`--binarize`)."""

    dataset: str = "omniglot"
    data_root: str | None = None
    split: str = "test"
    image_size: int | None = None
    patterns: tuple[int, ...] = (64,)
    shots: int | None = 1
    distortion: str = "occlude:16"
    episodes: int = 20
    seed: int = 0
    invert: bool = False
    binarize: bool = False


@dataclass
class Episode:
    """Patterns and queries, flattened to (N, D), plus the pattern shape."""

    patterns: torch.Tensor
    queries: torch.Tensor
    shape: tuple[int, ...]


def make_episodes(
    config: CompareConfig, shape: tuple[int, ...] | None = None
) -> dict[int, list[Episode]]:
    """The seeded episodes and queries every method sees, per number of patterns."""
    size = config.image_size if config.image_size else (shape[-1] if shape else None)
    data = load_dataset(
        config.dataset,
        config.split,
        config.data_root,
        size,
        invert=config.invert,
        binarize=config.binarize,
    )
    binary = isinstance(data, BinaryStrings)
    pattern = (data.bits,) if binary else tuple(data[0][0].shape)
    distortion = Distortion.parse(config.distortion, pattern)
    out: dict[int, list[Episode]] = {}
    for n in config.patterns:
        try:
            stream = Episodes(
                data,
                n,
                None if binary else config.shots,
                seed=config.seed + n,
            )
        except EbmmError as e:
            raise EbmmError("--patterns", f"{n}: {e.problem}") from None
        generator = torch.Generator().manual_seed(config.seed + 1_000 + n)
        episodes = []
        for _ in range(config.episodes):
            x, _ = stream.sample()
            q = distortion(x, generator)
            episodes.append(Episode(x.flatten(1), q.flatten(1), tuple(x.shape[1:])))
        out[n] = episodes
    return out


def episode_metrics(
    out: torch.Tensor, target: torch.Tensor, shape: tuple[int, ...]
) -> dict[str, float]:
    """Metrics of one episode's retrievals (N, D) against its patterns, mean over patterns."""
    sq = (out - target).pow(2).sum(1)
    mse = sq / target.shape[1]
    values = {
        "sq_error": float(sq.mean()),
        "mse": float(mse.mean()),
        "hamming": float(hamming(out, target).mean()),
        "psnr": float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean()),
    }
    if len(shape) == 3 and min(shape[1:]) >= 11:  # SSIM's 11x11 window needs room
        values["ssim"] = float(ssim(out.reshape(-1, *shape), target.reshape(-1, *shape)).mean())
    return values


def _summary(values: list[float]) -> dict[str, Any]:
    """Mean, its standard error, 5th/95th percentiles, and the values themselves in
    episode order: every method sees the same episodes, so two methods' values pair up
    (a paired difference says more about a small gap than two overlapping intervals).

    Why both: the percentiles are how far one episode can stray, which more episodes do
    not narrow; the standard error is how well the mean is known, which they do. A bar
    on the mean is met or missed by the second (a p95 is easily misread as the mean's
    bound). 0 for a single episode, whose spread is unknown."""
    t = torch.tensor(values, dtype=torch.float64)
    se = float(t.std() / len(values) ** 0.5) if len(values) > 1 else 0.0
    return {
        "mean": float(t.mean()),
        "se": se,
        "p5": float(torch.quantile(t, 0.05)),
        "p95": float(torch.quantile(t, 0.95)),
        "episodes": values,
    }


def run(methods: list[Method], episodes: dict[int, list[Episode]]) -> list[dict[str, Any]]:
    """Each method on each episode; one row per (method, number of patterns)."""
    rows = []
    for n, eps in episodes.items():
        d = eps[0].patterns.shape[1]
        for method in methods:
            per: dict[str, list[float]] = {}
            for ep in eps:
                start = time.perf_counter()
                memory = method.write(ep.patterns)
                middle = time.perf_counter()
                with torch.enable_grad():
                    out = method.read(memory, ep.queries).detach().float()
                end = time.perf_counter()
                values = episode_metrics(out, ep.patterns, ep.shape)
                values["write_ms"] = (middle - start) * 1e3
                values["read_ms"] = (end - middle) * 1e3
                for k, v in values.items():
                    per.setdefault(k, []).append(v)
            row: dict[str, Any] = {
                "method": method.name,
                "patterns": n,
                "memory_floats": method.memory_floats(n, d),
            }
            row.update({k: _summary(per[k]) if k in per else None for k in METRICS})
            rows.append(row)
    return rows


def check_model(model: Model, path: Path, shape: tuple[int, ...]) -> None:
    """Refuse a model trained on another pattern shape than the data's."""
    if tuple(model.config.energy.shape) != tuple(shape):
        raise EbmmError(
            path,
            f"was trained on patterns of shape {model.config.energy.shape}, "
            f"the data has {tuple(shape)} (use --image-size or another dataset)",
        )


def report(config: CompareConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON document: the config and the rows."""
    data = asdict(config)
    data["patterns"] = list(config.patterns)
    return {"config": data, "rows": rows}


def markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table: mean ±standard error [p5, p95] per metric."""
    head = ["method", "patterns", "memory floats", *METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["patterns"]), f"{r['memory_floats']:,}"]
        cells += [format_metric(r[k]) for k in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_metric(m: dict[str, Any] | None) -> str:
    if m is None:
        return "-"
    digits = 3 if abs(m["mean"]) < 10 else 1
    spread = f"[{m['p5']:.{digits}f}, {m['p95']:.{digits}f}]"
    return f"{m['mean']:.{digits}f} ±{m['se']:.{digits}f} {spread}"


def methods_from(names: list[str]) -> list[Method]:
    """Baselines by name (`baselines.make`)."""
    return [baselines.make(n) for n in names if n]


def plot(rows: list[dict[str, Any]], path: Path, metric: str) -> None:
    """Error against memory size (several sizes) or against the number of patterns: the
    mean as a line, the 5th to 95th percentile as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ebmm_cli.atomic import atomic_path

    by_patterns = len({r["patterns"] for r in rows}) > 1
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name and r[metric] is not None]
        xs = [r["patterns"] if by_patterns else r["memory_floats"] for r in mine]
        (line,) = ax.plot(xs, [r[metric]["mean"] for r in mine], marker="o", label=name)
        # The 5-95% interval as its own bar: a skewed metric's mean can lie outside it.
        low, high = [r[metric]["p5"] for r in mine], [r[metric]["p95"] for r in mine]
        ax.vlines(xs, low, high, color=line.get_color(), alpha=0.5)
    ax.set_xlabel("patterns written" if by_patterns else "memory (floats)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def grid(methods: list[Method], episode: Episode, path: Path, count: int = 8) -> None:
    """Original, query and each method's retrieval for the first `count` patterns."""
    from torchvision.utils import make_grid

    from ebmm_cli.imageio import save_image

    if len(episode.shape) != 3:
        raise EbmmError("--grid", "needs image data")
    x, q = episode.patterns[:count], episode.queries[:count]
    rows = [x, q]
    for m in methods:
        with torch.enable_grad():
            rows.append(m.read(m.write(episode.patterns), episode.queries)[:count].detach())
    images = torch.cat(rows).reshape(-1, *episode.shape).float()
    picture = make_grid(images, nrow=len(x), padding=2, pad_value=0.5)
    if episode.shape[0] == 1:
        picture = picture[:1]
    scale = max(1, math.ceil(96 / episode.shape[-1]))
    picture = torch.nn.functional.interpolate(picture[None], scale_factor=scale)[0]
    save_image(picture, path)
