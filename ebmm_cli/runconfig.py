"""From options to a run: one builder, every default in one place, every check up front.

`train_config(...)` turns the options of `ebmm train` (keyword arguments, the same names)
into a `TrainConfig`: dataset defaults filled in from `choices.dataset_defaults`, and every
option checked before any data is loaded, so a typo costs a second, not a data load. The
command line, the benchmark, the demo and the reproduction script all build their runs
here. `model_config(...)` is the part that fixes the model alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ebmm_cli.choices import (
    CUDA_GRAPHS,
    DATASETS,
    KV_MEMORIES,
    LOSSES,
    MEMORIES,
    READS,
    SCHEDULES,
    SETTINGS,
    dataset_defaults,
)
from ebmm_cli.data import check_dataset, load_dataset
from ebmm_cli.device import resolve_device
from ebmm_cli.distort import Distortion
from ebmm_cli.energy import EnergyConfig
from ebmm_cli.errors import EbmmError
from ebmm_cli.memory import RuleConfig
from ebmm_cli.model import ModelConfig


@dataclass(frozen=True)
class TrainConfig:
    """One meta-training run. `model` fixes the network and rules; the rest the run.

    `lr` is AdamW's learning rate for the network; `rule_lr` for the rule parameters
    (write rates, α, β, read steps and momenta), which are few, scalar and start far
    from their good values, so they need larger steps than the paper's 5e-5. Both decay
    along a cosine to `lr_floor` times their value over the run's budget (`steps` and/or
    `minutes`): short runs end on small steps instead of on noise.

    `episodes_per_step` episodes are written and read per process and meta-step; under
    torchrun each of the world's processes draws its own, and the step's gradient is
    the mean over all of them.

    With `batch_min`, N is drawn per step from [batch_min, batch_size] (log-uniformly;
    `Episodes.draw_size`), the same N for all of the step's episodes, which are written
    together; held-out evaluation then runs at several N (`capacity_sizes`).

    Auxiliary terms of the meta-loss (`terms.TERMS`) have a weight field each, named as
    the term (`contrast`); 0: the paper's loss alone.

    `init` is the model file the run's weights started from (`--init`; None: a fresh He
    initialisation), kept so that a run says where it began.
    """

    def __post_init__(self) -> None:
        # Every trained model records the N it was trained on (`RuleConfig.patterns`),
        # however its config was built; checkpoints from before say nothing.
        rules = self.model.rules
        if rules.patterns is None:
            patterns = (self.batch_min or self.batch_size, self.batch_size)
            model = replace(self.model, rules=replace(rules, patterns=patterns))
            object.__setattr__(self, "model", model)

    def sizes(self) -> list[int]:
        """The episode sizes of held-out evaluation: N, or four N spread
        geometrically over the range (its ends included), multiples of the shots."""
        return capacity_sizes(self.batch_min, self.batch_size, self.shots)

    model: ModelConfig
    data_root: str | None = None
    batch_size: int = 5
    batch_min: int | None = None
    shots: int | None = 1
    steps: int | None = None
    minutes: float | None = None
    lr: float = 1e-3
    rule_lr: float = 3e-2
    lr_floor: float = 0.1
    first_order: bool = False
    seed: int = 0
    device: str = "auto"
    eval_every: int = 25
    eval_episodes: int = 20
    checkpoint_minutes: float = 2.0
    episodes_per_step: int = 1
    cuda_graph: str = "auto"
    contrast: float = 0.0
    init: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        data["model"] = json.loads(self.model.to_json())
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """Parse `to_json`'s output. A run from before an option was removed resumes if
        it left that option at its neutral value; ValueError if it used it."""
        data = json.loads(text)
        for key, neutral in REMOVED_OPTIONS.items():
            if key in data and data.pop(key) != neutral:
                flag = "--" + key.replace("_", "-")
                raise ValueError(f"the run trained with {flag}, which ebmm no longer has")
        data["model"] = ModelConfig.from_json(json.dumps(data["model"]))
        return cls(**data)


REMOVED_OPTIONS: dict[str, object] = {
    "prior_minutes": 0.0, "recognition": 0.0, "completion": 0.0, "contrast_steps": 0,
    "identification": 0.0, "prior_penalty": 0.0, "penalty_memory": "unwritten",
    "refine": 0, "redraw": 0.0, "redraw_stored": 0.0,
}  # fmt: skip
"""`TrainConfig` fields of training terms and phases that did not help (docs/TRAINING.md)
and were removed, with the value that left each off: what older checkpoints may hold."""


def capacity_sizes(least: int | None, most: int, shots: int | None = None) -> list[int]:
    """`TrainConfig.sizes`: [most] for one size; over a range, four sizes spread
    geometrically from `least` to `most`, rounded to multiples of `shots`."""
    if least is None or least >= most:
        return [most]
    step = shots or 1
    points = [least * (most / least) ** (i / 3) for i in range(4)]
    return sorted({min(most, max(least, round(p / step) * step)) for p in points})


def parse_batch_size(text: str) -> tuple[int, int]:
    """`--batch-size`: `N`, or a range `LEAST-MOST` (e.g. 8-96). Returns (least, most)."""
    least, dash, most = text.strip().partition("-")
    try:
        values = (int(least), int(most)) if dash else (int(least), int(least))
    except ValueError:
        raise EbmmError(
            "--batch-size", f"expected a number or a range such as 8-96, got {text!r}"
        ) from None
    if min(values) < 1:
        raise EbmmError("--batch-size", f"must be at least 1, got {text}")
    if values[0] > values[1]:
        raise EbmmError("--batch-size", f"the range {text} is empty")
    return values


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_settings(texts: list[str]) -> dict[str, object]:
    """`ebmm train --set KEY=VALUE ...`: {keyword: value} of `choices.SETTINGS` (a key
    may be spelled with dashes), each value parsed by its type; checked further by
    `train_config`."""
    chosen: dict[str, object] = {}
    for text in texts:
        key, eq, value = text.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        if not eq or key not in SETTINGS:
            raise EbmmError(
                "--set", f"expected KEY=VALUE, KEY one of {', '.join(SETTINGS)}; got {text!r}"
            )
        kind = SETTINGS[key][0]
        try:
            if kind is bool:
                if value.lower() not in (*_TRUE, *_FALSE):
                    raise ValueError(value)
                chosen[key] = value.lower() in _TRUE
            else:
                chosen[key] = kind(value)
        except ValueError:
            raise EbmmError("--set", f"{key} takes a {kind.__name__}, got {value!r}") from None
    return chosen


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise EbmmError(option, f"unknown value {value!r}; use one of {', '.join(allowed)}")
    return value


def check_rate(option: str, value: float) -> None:
    """One bound for every step size a user gives (`train --set write_lr`, `read_lr`,
    the refinement's rates of `train`, `write` and `compare`): above 0 and at most 1e6, so
    a NaN, an infinity or a sign slip stops with a one-line error before any work."""
    if not 0 < value <= 1e6:  # NaN too
        raise EbmmError(option, f"must be in (0, 1e6], got {value:g}")


def rule_config(
    *,
    memory: str = "conv",
    schedule: str = "learned",
    write_steps: int = 5,
    read_steps: int | None = None,
    read: str = "gd",
    rekeys: int = 0,
    write_lr: float | None = None,
    read_lr: float | None = None,
    write_refine: int = 0,
    write_refine_lr: float | None = None,
) -> RuleConfig:
    """The write and read rules: the paper's learned schedule, or the report's fixed one
    (`RuleConfig.report`, whose write rate depends on the `memory`); `write_lr` and
    `read_lr` override the schedule's starting (or constant) values. `read_steps` and
    `read_lr` belong to the gradient read (default 5 steps); the `redraw` read takes no
    steps and refuses them, rather than ignore them.

    The `kv` memories write without the gradient-norm term (α = 0; with it, kv's
    meta-training diverged within five steps, docs/TRAINING.md, the kv family) and from a
    write rate of 1: each step is a delta-rule step with its rate in units of the
    episode's 1/λmax (`kv.delta_write`), so 1 solves the top direction in one step and
    every rate below 2 is stable (a start at 0.5, in absolute units then, made the
    written read worse than the unwritten one for its first 200 steps).

    `write_refine` and `write_refine_lr` are the model's own refinement of its written
    memories (`RuleConfig.refine`, `refine_lr`)."""
    _choice("--set schedule", schedule, SCHEDULES)
    _choice("--read", read, READS)
    for option, value in (("--write-steps", write_steps), ("--read-steps", read_steps)):
        if value is not None and value < 1:
            raise EbmmError(option, f"must be at least 1, got {value}")
    if read == "redraw":
        for option, value in (("--read-steps", read_steps), ("--set read_lr", read_lr)):
            if value is not None:
                raise EbmmError(
                    option, "is the gradient read's; the redraw read takes no steps (--rekeys)"
                )
    if rekeys < 0:
        raise EbmmError("--rekeys", f"must be at least 0, got {rekeys}")
    if rekeys and (memory not in KV_MEMORIES or read != "redraw"):
        raise EbmmError(
            "--rekeys", "needs --memory kv or kv-conv and its redraw read (a key to redraw by)"
        )
    if write_refine < 0:
        raise EbmmError("--write-refine", f"must be at least 0, got {write_refine}")
    if write_refine and read == "decoder":
        raise EbmmError("--write-refine", "needs a read through the energy, not --read decoder")
    chosen: dict[str, object] = {
        "write_steps": write_steps, "read_steps": read_steps or 5, "read": read,
        "rekeys": rekeys, "refine": write_refine,
    }  # fmt: skip
    if write_refine_lr is not None:
        check_rate("--set write_refine_lr", write_refine_lr)
        chosen["refine_lr"] = write_refine_lr
    if memory in KV_MEMORIES:
        chosen.update(alpha=0.0, write_lr=1.0)
    for key, value in (("write_lr", write_lr), ("read_lr", read_lr)):
        if value is not None:
            check_rate(f"--set {key}", value)
            chosen[key] = value
    if schedule == "fixed":
        return RuleConfig.report(memory, **chosen)
    return RuleConfig(**chosen)


def model_config(
    *,
    dataset: str = "omniglot",
    memory: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    dynamic: int | None = None,
    prior: bool = False,
    rules: RuleConfig | None = None,
    distortion: str | None = None,
    loss: str = "mse",
    invert: bool = False,
    binarize: bool = False,
) -> ModelConfig:
    """A model for `dataset`, every unset option taken from the dataset's defaults.

    Binary strings are 128 bits for the `rnn` (signed input), and only it takes them;
    images are `channels` x `image_size` x `image_size`. A folder's channel count must be
    given (`train_config` reads it from the folder's first image). `invert` marks a
    folder of dark-on-light images; Omniglot's files are always inverted. `binarize`
    thresholds images at 0.5 (`ModelConfig.binarize`).

    Raises:
        EbmmError: naming the option, for any value the model cannot take.
    """
    defaults = dataset_defaults(dataset)
    memory = _choice("--memory", memory or defaults.memory, MEMORIES)
    if (dataset == "binary") != (memory == "rnn"):
        raise EbmmError("--memory", "binary strings take --memory rnn, and rnn takes only them")
    _choice("--loss", loss, LOSSES)
    if loss == "ssim+mse" and memory == "rnn":
        raise EbmmError("--loss", "ssim+mse needs images; use mse for binary strings")
    if dynamic is not None and dynamic < 1:
        raise EbmmError("--dynamic", f"must be at least 1, got {dynamic}")
    if prior and memory != "kv":
        raise EbmmError("--set prior", "is a prior energy for --memory kv")
    if prior and rules is not None and rules.read != "gd":
        # the redraw and decoder reads do not descend the energy: R would train on nothing
        raise EbmmError("--set prior", "shapes the energy that --read gd descends")
    if invert and dataset in DATASETS:
        raise EbmmError(
            "--invert",
            "is for folders of dark-on-light images"
            + (" (Omniglot's files are always inverted)" if defaults.inverted else ""),
        )
    if binarize and memory == "rnn":
        raise EbmmError("--binarize", "is for images; binary strings are binary already")
    if rules is not None and rules.read == "redraw" and memory not in KV_MEMORIES:
        raise EbmmError("--read", "redraw needs --memory kv or kv-conv (an energy that draws)")
    if memory == "rnn":
        shape: tuple[int, ...] = (128,)
    else:
        size = image_size or defaults.image_size
        if size is None or size < 8:
            raise EbmmError("--image-size", f"must be at least 8, got {size}")
        shape = (channels or defaults.channels or 1, size, size)
    spec = distortion or defaults.distortion
    Distortion.parse(spec, shape)
    return ModelConfig(
        energy=EnergyConfig(memory, shape, dynamic, signed=memory == "rnn", prior=prior),
        rules=rules if rules is not None else rule_config(memory=memory),
        distortion=spec,
        loss=loss,
        dataset=dataset,
        invert_files=invert or defaults.inverted,
        binarize=binarize,
    )


def check_budget(steps: int | None, minutes: float | None) -> None:
    """A run stops at `steps` or after `minutes`: at least one, and minutes more than 0."""
    if steps is None and minutes is None:
        raise EbmmError("--steps", "give --steps and/or --minutes")
    if minutes is not None and not 0 < minutes < float("inf"):
        raise EbmmError("--minutes", f"must be a finite number more than 0, got {minutes:g}")


def train_config(
    *,
    dataset: str = "omniglot",
    memory: str | None = None,
    data_root: str | Path | None = None,
    image_size: int | None = None,
    invert: bool = False,
    binarize: bool = False,
    batch_size: int | tuple[int, int] = 5,
    shots: int = 1,
    write_steps: int = 5,
    read_steps: int | None = None,
    read: str | None = None,
    rekeys: int = 0,
    schedule: str = "learned",
    write_lr: float | None = None,
    read_lr: float | None = None,
    distortion: str | None = None,
    loss: str = "mse",
    dynamic: int | None = None,
    prior: bool = False,
    steps: int | None = None,
    minutes: float | None = None,
    first_order: bool = False,
    lr: float = 1e-3,
    rule_lr: float = 3e-2,
    seed: int = 0,
    device: str = "auto",
    eval_every: int = 25,
    eval_episodes: int = 20,
    checkpoint_minutes: float = 2.0,
    episodes_per_step: int = 1,
    cuda_graph: str = "auto",
    rates_see_n: bool = True,
    contrast: float = 0.0,
    write_refine: int = 0,
    write_refine_lr: float | None = None,
    init: str | None = None,
) -> TrainConfig:
    """A meta-training run from `ebmm train`'s options (the same names, keyword only).

    Every option is checked first; only then is a folder dataset's first image read for
    its channel count. `shots=0` ignores classes. `batch_size` is N, or (least, most)
    to train over a range of N; the model records the range (`RuleConfig.patterns`).
    `read` defaults to `redraw` for the `kv` memories (their energy draws what it recalls)
    and to the gradient read `gd` for every other.

    Raises:
        EbmmError: naming the option (as the command line spells it) or the folder.
    """
    check_budget(steps, minutes)
    memory = memory or dataset_defaults(dataset).memory
    read = read or ("redraw" if memory in KV_MEMORIES else "gd")
    least, most = batch_size if isinstance(batch_size, tuple) else (batch_size, batch_size)
    if least > most:
        raise EbmmError("--batch-size", f"the range {least}-{most} is empty")
    for option, value in (
        ("--batch-size", least),
        ("--eval-every", eval_every),
        ("--eval-episodes", eval_episodes),
        ("--set episodes_per_step", episodes_per_step),
    ):
        if value < 1:
            raise EbmmError(option, f"must be at least 1, got {value}")
    for key, value in (("shots", shots), ("checkpoint_minutes", checkpoint_minutes)):
        if not value >= 0:  # NaN too
            raise EbmmError(f"--set {key}", f"must be 0 or more, got {value}")
    if not contrast >= 0:  # NaN too
        raise EbmmError("--contrast", f"must be 0 or more, got {contrast}")
    check_dataset(dataset)
    _choice("--cuda-graph", cuda_graph, CUDA_GRAPHS)
    if cuda_graph == "on" and resolve_device(device).type != "cuda":
        raise EbmmError("--cuda-graph", "on needs a CUDA device (--device)")
    resolve_device(device)
    rules = rule_config(
        memory=memory,
        schedule=schedule,
        write_steps=write_steps,
        read_steps=read_steps,
        read=read,
        rekeys=rekeys,
        write_lr=write_lr,
        read_lr=read_lr,
        write_refine=write_refine,
        write_refine_lr=write_refine_lr,
    )
    rules = replace(rules, patterns=(least, most), rates_see_n=rates_see_n)
    options = dict(
        dataset=dataset,
        memory=memory,
        image_size=image_size,
        dynamic=dynamic,
        prior=prior,
        rules=rules,
        distortion=distortion,
        loss=loss,
        invert=invert,
        binarize=binarize,
    )
    model_config(**options)  # every check, before the folder is read
    if dataset_defaults(dataset).channels is None and memory != "rnn":
        options["channels"] = _folder_channels(Path(dataset))
    return TrainConfig(
        model_config(**options),
        data_root=str(data_root) if data_root else None,
        batch_size=most,
        batch_min=least if least < most else None,
        shots=shots or None,
        steps=steps,
        minutes=minutes,
        lr=lr,
        rule_lr=rule_lr,
        first_order=first_order,
        seed=seed,
        device=device,
        eval_every=eval_every,
        eval_episodes=eval_episodes,
        checkpoint_minutes=checkpoint_minutes,
        episodes_per_step=episodes_per_step,
        cuda_graph=cuda_graph,
        contrast=contrast,
        init=init,
    )


def _folder_channels(folder: Path) -> int:
    """Image channels of a folder dataset: its first image's (1 grayscale, 3 colour). The
    dataset only lists its files here; images are decoded when drawn."""
    return int(load_dataset(str(folder), "train", None, None)[0][0].shape[0])
