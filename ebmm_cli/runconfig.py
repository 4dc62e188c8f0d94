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
    PENALTY_MEMORIES,
    READS,
    SCHEDULES,
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

    `prior_minutes` of training time come first as a prior phase: nothing is written,
    every query is read from θ̄ and the loss is the same, so the slow weights learn what
    the data look like (an energy whose descent restores a distorted pattern) at a
    fraction of a meta-step's cost, before they learn to be written (issue 17).

    `recognition` weighs an auxiliary term of the meta-loss: each step draws one more
    episode of novel patterns, and each written memory pays softplus(ΔE(xi) − ΔE(yj))
    over every pair of a stored xi and a novel yj (`memory.recognition_margins`). It
    rewards a write that lowers the energy of what it stored more than that of anything
    else, a signal the read's loss gives only weakly while the energy's prior alone can
    repair a query (issue 17). 0: the paper's loss alone.

    `completion` weighs another: each query, completed part of the way with its own
    stored pattern's content, must have had its energy lowered by the write more than
    the same query completed with another stored pattern's
    (`memory.completion_margins`): the write must pull the read towards what it stored,
    not only recognise it. Its positions come from the distortion
    (`Distortion.with_mask`). 0: off.

    `contrast` weighs a third: softplus(E(xi) − E(x̂i)) under the written memory, x̂i
    where the read of xi's query ended (`memory.endpoint_margins`): each stored pattern
    must lie lower in the energy than where its read stopped, so that the stored
    patterns become the energy's minima rather than points a short read passes on the
    way to a lower fill (issue 17). It needs nothing but the read, so the step keeps
    its CUDA graph. 0: off. `contrast_steps` L > 0 takes x̂i further: L plain descent
    steps from where the read ended, under the written memory, without a graph
    (`memory.long_descent`), since long descents on trained Omniglot memories end far
    below and away from the stored character where the K-step read does not yet show
    it. 0: the read's own end.

    `identification` weighs another: the write's per-pattern gradients over the written
    weights (`memory.write_features`; kv: its unit keys) must tell each query's own
    stored pattern from the episode's others, a cross-entropy over their cosines
    (`memory.identification_logits`). To first order a write is a kernel memory with
    those features, and meta-training otherwise makes them parallel: every query then
    pulls towards what all stored patterns share (issue 17). 0: off.

    `prior_penalty` weighs a fourth: the same queries are also read from θ̄, the memory
    before any write, and the penalty is how much that read improves on the queries
    themselves (the loss summed over the read's iterates; nothing where it does not).
    The energy's prior alone then gains nothing by repairing a query: it takes away the
    shortcut every Omniglot run takes first (a faint average fill; issue 17), though a
    write that switches the same fill on for any batch is still rewarded (trial 20 in
    `docs/TRAINING.md`). A model's unwritten read may be worse than the query, as a
    binary model's is. Gradient read only. 0: off.

    `penalty_memory` is what the penalty reads the queries from: `unwritten` (θ̄, above)
    or `foil`, a memory written with another episode's patterns (the recognition term's
    foils, drawn every step). Against a foil a write that switches a generic fill on for
    any batch gains nothing either (trial 20's way around the unwritten control); only
    what the write stored of the queries' own patterns can lower the loss.

    `refine` R > 0 trains through refined memories: each episode's written memory is
    refined R steps (`model.refine_memory`, detached) before the read whose loss trains
    the model, and the loss's gradient at the refined memory reaches the write as if it
    had written that memory (a straight-through, first-order bilevel step). Why: on the
    paper's Omniglot protocol no memory of a default-trained energy restores the block,
    however it is found (issue 17); this trains the slow weights for what the best
    memory the read can use does, and the write towards it. Held-out metrics add the
    refined memory's (`refined_*`). 0: off.

    `redraw` weighs a term for `conv-ae`: the image its written bottleneck redraws from
    each query (`memory.redrawn`) must be the stored pattern, by the run's loss. The
    reconstruction in the energy is otherwise trained only through the read, and on
    Omniglot it stayed far from any character (squared error ~250 of 1,024 pixels after
    1,500 steps), so its pull was noise; this asks the written bottleneck directly to
    restore what the query lacks, which is the memory's whole job. Held-out metrics add
    the redrawn image's errors (`redrawn_*`). 0: off.

    `redraw_stored` weighs the same term for the stored patterns themselves: what the
    written bottleneck redraws from each stored pattern must be that pattern. With
    `redraw` alone the decoder learned to draw characters only from queries with a hole
    (trial 49: its redraw erred 54.7 pixels, worse than the query's 45.3), so it never
    drew even the visible strokes exactly; clean patterns teach it to draw at all, at no
    extra write. Held-out metrics add `redrawn_stored_hamming`. 0: off.

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
    prior_minutes: float = 0.0
    recognition: float = 0.0
    completion: float = 0.0
    contrast: float = 0.0
    contrast_steps: int = 0
    identification: float = 0.0
    prior_penalty: float = 0.0
    penalty_memory: str = "unwritten"
    refine: int = 0
    redraw: float = 0.0
    redraw_stored: float = 0.0
    init: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        data["model"] = json.loads(self.model.to_json())
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data = json.loads(text)
        data["model"] = ModelConfig.from_json(json.dumps(data["model"]))
        return cls(**data)


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


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise EbmmError(option, f"unknown value {value!r}; use one of {', '.join(allowed)}")
    return value


def check_rate(option: str, value: float) -> None:
    """One bound for every step size a user gives (`--write-lr`, `--read-lr`, the
    refinement's rates of `train`, `write` and `compare`): above 0 and at most 1e6, so
    a NaN, an infinity or a sign slip stops with a one-line error before any work."""
    if not 0 < value <= 1e6:  # NaN too
        raise EbmmError(option, f"must be in (0, 1e6], got {value:g}")


def rule_config(
    *,
    memory: str = "conv",
    schedule: str = "learned",
    write_steps: int = 5,
    read_steps: int = 5,
    read: str = "gd",
    rekeys: int = 0,
    write_lr: float | None = None,
    read_lr: float | None = None,
    write_refine: int = 0,
    write_refine_lr: float | None = None,
) -> RuleConfig:
    """The write and read rules: the paper's learned schedule, or the report's fixed one
    (`RuleConfig.report`, whose write rate depends on the `memory`); `write_lr` and
    `read_lr` override the schedule's starting (or constant) values.

    The `kv` memories write without the gradient-norm term (α = 0; with it, kv's
    meta-training diverged within five steps, docs/TRAINING.md trial 54) and from a write
    rate of 1: each step is a delta-rule step with its rate in units of the episode's
    1/λmax (`memory.write`), so 1 solves the top direction in one step and
    every rate below 2 is stable (a start at 0.5, in absolute units then, made the
    written read worse than the unwritten one for its first 200 steps, docs/TRAINING.md
    trial 54).

    `write_refine` and `write_refine_lr` are the model's own refinement of its written
    memories (`RuleConfig.refine`, `refine_lr`)."""
    _choice("--schedule", schedule, SCHEDULES)
    _choice("--read", read, READS)
    for option, value in (("--write-steps", write_steps), ("--read-steps", read_steps)):
        if value < 1:
            raise EbmmError(option, f"must be at least 1, got {value}")
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
        "write_steps": write_steps, "read_steps": read_steps, "read": read, "rekeys": rekeys,
        "refine": write_refine,
    }  # fmt: skip
    if write_refine_lr is not None:
        check_rate("--write-refine-lr", write_refine_lr)
        chosen["refine_lr"] = write_refine_lr
    if memory in KV_MEMORIES:
        chosen.update(alpha=0.0, write_lr=1.0)
    for option, value in (("--write-lr", write_lr), ("--read-lr", read_lr)):
        if value is not None:
            check_rate(option, value)
            chosen[option[2:].replace("-", "_")] = value
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
        raise EbmmError("--loss", "ssim+mse needs images; use mse or l1 for binary strings")
    if dynamic is not None and dynamic < 1:
        raise EbmmError("--dynamic", f"must be at least 1, got {dynamic}")
    if invert and dataset in DATASETS:
        raise EbmmError(
            "--invert",
            "is for folders of dark-on-light images"
            + (" (Omniglot's files are always inverted)" if defaults.inverted else ""),
        )
    if binarize and memory == "rnn":
        raise EbmmError("--binarize", "is for images; binary strings are binary already")
    if rules is not None and rules.read == "redraw" and memory not in (*KV_MEMORIES, "conv-ae"):
        raise EbmmError(
            "--read", "redraw needs --memory kv, kv-conv or conv-ae (an energy that draws)"
        )
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
        energy=EnergyConfig(memory, shape, dynamic, signed=memory == "rnn"),
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
        raise EbmmError("--minutes", f"must be more than 0, got {minutes:g}")


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
    read_steps: int = 5,
    read: str | None = None,
    rekeys: int = 0,
    schedule: str = "learned",
    write_lr: float | None = None,
    read_lr: float | None = None,
    distortion: str | None = None,
    loss: str = "mse",
    dynamic: int | None = None,
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
    prior_minutes: float = 0.0,
    rates_see_n: bool = True,
    recognition: float = 0.0,
    completion: float = 0.0,
    contrast: float = 0.0,
    contrast_steps: int = 0,
    identification: float = 0.0,
    prior_penalty: float = 0.0,
    penalty_memory: str = "unwritten",
    refine: int = 0,
    write_refine: int = 0,
    write_refine_lr: float | None = None,
    redraw: float = 0.0,
    redraw_stored: float = 0.0,
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
        ("--episodes-per-step", episodes_per_step),
    ):
        if value < 1:
            raise EbmmError(option, f"must be at least 1, got {value}")
    check_prior(prior_minutes, minutes, read)
    for option, weight in (
        ("--recognition", recognition),
        ("--completion", completion),
        ("--contrast", contrast),
        ("--identification", identification),
        ("--prior-penalty", prior_penalty),
        ("--redraw", redraw),
        ("--redraw-stored", redraw_stored),
    ):
        if not weight >= 0:  # NaN too
            raise EbmmError(option, f"must be 0 or more, got {weight}")
    if prior_penalty > 0 and read != "gd":
        raise EbmmError("--prior-penalty", "needs the gradient read (--read gd)")
    if contrast_steps < 0:
        raise EbmmError("--contrast-steps", f"must be 0 or more, got {contrast_steps}")
    if contrast_steps > 0 and not contrast > 0:
        raise EbmmError("--contrast-steps", "needs --contrast above 0")
    if refine < 0:
        raise EbmmError("--refine", f"must be 0 or more, got {refine}")
    if refine > 0 and read == "decoder":
        raise EbmmError("--refine", "needs a read through the energy, not --read decoder")
    for option, weight in (("--redraw", redraw), ("--redraw-stored", redraw_stored)):
        if weight > 0 and memory != "conv-ae":
            raise EbmmError(option, "needs --memory conv-ae (the energy that redraws its input)")
    _choice("--penalty-memory", penalty_memory, PENALTY_MEMORIES)
    if penalty_memory != "unwritten" and not prior_penalty > 0:
        raise EbmmError("--penalty-memory", f"{penalty_memory} needs --prior-penalty above 0")
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
        prior_minutes=prior_minutes,
        recognition=recognition,
        completion=completion,
        contrast=contrast,
        contrast_steps=contrast_steps,
        identification=identification,
        prior_penalty=prior_penalty,
        penalty_memory=penalty_memory,
        refine=refine,
        redraw=redraw,
        redraw_stored=redraw_stored,
        init=init,
    )


def check_prior(prior_minutes: float, minutes: float | None, read: str) -> None:
    """`--prior-minutes`: not negative, shorter than the budget, and only for the
    gradient read (the prior trains the energy's descent; a decoder read has none)."""
    if prior_minutes < 0:
        raise EbmmError("--prior-minutes", f"must be 0 or more, got {prior_minutes}")
    if prior_minutes > 0 and read != "gd":
        raise EbmmError("--prior-minutes", "needs the gradient read (--read gd)")
    if prior_minutes > 0 and minutes is not None and prior_minutes >= minutes:
        raise EbmmError(
            "--prior-minutes", f"{prior_minutes:g} leaves no time of --minutes {minutes:g}"
        )


def _folder_channels(folder: Path) -> int:
    """Image channels of a folder dataset: its first image's (1 grayscale, 3 colour). The
    dataset only lists its files here; images are decoded when drawn."""
    return int(load_dataset(str(folder), "train", None, None)[0][0].shape[0])
