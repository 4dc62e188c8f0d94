"""The `ebmm` command line: parse options, call the library, print results.

Results go to stdout (written paths, one per line, so commands compose in pipelines);
progress bars and errors go to stderr. Every failure is one line,
`ebmm <command>: <file or option>: <problem>`, with exit code 2 for bad usage or input
and 1 for a runtime failure (`ebmm --debug ...` shows the traceback instead).
torch is imported inside the commands that need it, so `ebmm --help` stays fast.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from ebmm_cli import __version__
from ebmm_cli.choices import (
    CUDA_GRAPHS,
    DISTORTIONS,
    LOSSES,
    MEMORIES,
    PENALTY_MEMORIES,
    READS,
    SCHEDULES,
)
from ebmm_cli.errors import EbmmError

if TYPE_CHECKING:  # torch loads only inside the commands that need it
    from ebmm_cli.meta import Trainer
    from ebmm_cli.model import Model


class _Failure(typer.TyperException):
    """A failure inside a command, carried out to `main` with the command's name."""

    def __init__(self, command: str | None, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.command = command
        self.exit_code = exit_code


class _Terminated(KeyboardInterrupt):
    """SIGTERM (from `timeout`, a batch scheduler, `docker stop`), raised where the program
    is, so that it unwinds as Ctrl-C does: temporaries removed, a training checkpoint saved;
    then exit 143 instead of 130."""


_TERMINATED = "terminated; no output was left half-written"


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated


def _terminated(error: BaseException | None) -> bool:
    """Whether `error` is, or was caused by, SIGTERM (Python wraps an exception raised
    while a class is being made, as during an import, in a RuntimeError)."""
    while error is not None:
        if isinstance(error, _Terminated):
            return True
        error = error.__cause__ or error.__context__
    return False


class _Group(TyperGroup):
    """The app's group: turns every failure into one line on stderr and an exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except EbmmError as e:
            raise _Failure(ctx.invoked_subcommand, str(e), e.exit_code) from e
        except _Terminated:
            raise _Failure(ctx.invoked_subcommand, _TERMINATED, 143) from None
        except (typer.TyperException, typer.Abort, typer.Exit, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            # The reader of our stdout went away (`ebmm distort ... | head`): stop quietly,
            # as Unix tools do, and keep Python from complaining when it flushes stdout.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except Exception as e:
            if _terminated(e):  # SIGTERM inside an import comes back wrapped
                raise _Failure(ctx.invoked_subcommand, _TERMINATED, 143) from None
            if ctx.params.get("debug"):
                raise
            raise _Failure(ctx.invoked_subcommand, f"{type(e).__name__}: {e}", 1) from e

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args, "ebmm", complete_var, standalone_mode=False, **extra)
        except _Failure as e:
            _fail(f"ebmm {e.command}" if e.command else "ebmm", e.message, e.exit_code)
        except typer.BadParameter as e:
            where = e.ctx.command_path if e.ctx else "ebmm"
            opts = getattr(e.param, "opts", None)
            subject = opts[0] if opts and e.param.param_type_name == "option" else None
            _fail(where, f"{subject}: {e.message}" if subject else e.format_message(), 2)
        except typer.TyperException as e:
            if not e.format_message():  # `ebmm` alone: the help was shown already
                sys.exit(e.exit_code)
            where = e.ctx.command_path if getattr(e, "ctx", None) else "ebmm"
            _fail(where, e.format_message(), e.exit_code)
        except typer.Abort:
            _fail("ebmm", "aborted", 130)
        code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def _check_refinable(net: Model, path: Path) -> None:
    """`--refine` of `write` and `compare`: a one-line error for a decoder-read model,
    whose memory `refine_memory` cannot fit."""
    if net.decoder is not None:
        raise EbmmError(path, "reads with a decoder; --refine needs a read through the energy")


def _check_refine_lr(refine_lr: float | None, steps: int, needs: str) -> None:
    """`--refine-lr` of `write` and `compare`: a rate in train's bounds, with `steps` of
    refinement to act on (else the error says what it `needs`)."""
    from ebmm_cli.runconfig import check_rate

    if refine_lr is None:
        return
    if not steps:
        raise EbmmError("--refine-lr", f"needs {needs}")
    check_rate("--refine-lr", refine_lr)


def _refinement(net: Model, path: Path, refine: int | None, refine_lr: float | None) -> int:
    """`--refine` and `--refine-lr` of `write`, checked against the model: the steps
    (`refine`, or the model's own when not given), refused for a decoder-read model."""
    steps = net.config.rules.refine if refine is None else refine
    _check_refine_lr(refine_lr, steps, "--refine above 0 (or a model that refines)")
    if steps:
        _check_refinable(net, path)
    return steps


def _hold(ctx: typer.Context, path: Path) -> None:
    """Keep other ebmm processes off `path` (an output) until this command ends."""
    from ebmm_cli.atomic import exclusive

    ctx.with_resource(exclusive(path))


def _fail(where: str, message: str, code: int) -> None:
    print(f"{where}: {message}", file=sys.stderr)
    sys.exit(code)


app = typer.Typer(
    cls=_Group,
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    help="Energy-based memory models: write images into a network's weights, read them back "
    "from distorted queries (Bartunov et al., ICLR 2020).",
)


def _version(value: bool) -> None:
    if value:
        print(f"ebmm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", help="Show tracebacks of runtime failures instead of a one-line message."
        ),
    ] = False,
) -> None:
    """Energy-based memory models from the shell."""


def _choices(name: str, values: tuple[str, ...]) -> type[StrEnum]:
    """A Typer choice type whose values are the library's names (`ebmm_cli.choices`)."""
    return StrEnum(name, [(v, v) for v in values])


Kind = _choices("Kind", DISTORTIONS)
Memory = _choices("Memory", MEMORIES)
ReadKind = _choices("ReadKind", READS)
Schedule = _choices("Schedule", SCHEDULES)
Loss = _choices("Loss", LOSSES)
CudaGraph = _choices("CudaGraph", CUDA_GRAPHS)
PenaltyMemory = _choices("PenaltyMemory", PENALTY_MEMORIES)

CudaGraphOption = Annotated[
    CudaGraph,
    typer.Option(
        "--cuda-graph",
        help="Replay each step from a CUDA graph instead of launching its thousands of "
        "kernels one by one: auto (on CUDA), on (CUDA required), off.",
    ),
]


# Seeds are offset (per process, held-out streams) and must stay within torch's int64.
SEED_LIMIT = 2**62


def _fill_value(text: str) -> float | None:
    """`--value`: a number in [0, 1], or `uniform` for random fill."""
    if text == "uniform":
        return None
    try:
        return float(text)
    except ValueError:
        raise EbmmError(
            "--value", f"expected a number in [0, 1] or 'uniform', got {text!r}"
        ) from None


RefineLr = Annotated[
    float | None,
    typer.Option(
        show_default=False,
        help="Adam's rate for the refinement (default: the model's own, 0.01 unless it "
        "was trained with --write-refine-lr).",
    ),
]
SkipBad = Annotated[
    bool,
    typer.Option(
        "--skip-bad",
        help="Skip images that cannot be read (or have the wrong channel count), with a "
        "warning each and a count, instead of stopping at the first.",
    ),
]


def _warn_skipped(command: str, errors: list[EbmmError]) -> None:
    for e in errors:
        print(f"ebmm {command}: {e} (skipped)", file=sys.stderr)


def _count_skipped(command: str, count: int) -> None:
    if count:
        print(f"ebmm {command}: skipped {count} bad file(s)", file=sys.stderr)


@app.command()
def distort(
    ctx: typer.Context,
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Image files and folders (searched recursively), in any mix; [bold]-[/] reads "
            "newline-separated paths from stdin.",
            show_default=False,
        ),
    ],
    kind: Annotated[
        Kind,
        typer.Option(
            help="[bold]noise[/]: an n x n block of Gaussian noise "
            "(first channel only on colour); [bold]occlude[/]: an n x n block set to --value; "
            "[bold]saltpepper[/]: pixels set to 0 or 1 with probability --prob; [bold]flip[/], "
            "[bold]erase[/] (to 0.5), [bold]randomize[/]: --bits pixels inverted, erased, "
            "randomised; [bold]eraseblock[/], [bold]randomizeblock[/]: a contiguous run of them."
        ),
    ] = Kind("noise"),
    block: Annotated[
        int,
        typer.Option(
            help="Side n of the square block (noise, occlude). "
            "The report uses 7 at 28x28, the paper 16 at 32x32."
        ),
    ] = 7,
    std: Annotated[float, typer.Option(help="Standard deviation of the noise block.")] = 1.0,
    value: Annotated[
        str,
        typer.Option(
            help="Fill of the occluded block: a number in [0, 1], "
            "or [bold]uniform[/] for random values."
        ),
    ] = "0",
    prob: Annotated[float, typer.Option(help="Probability that saltpepper hits a pixel.")] = 0.1,
    bits: Annotated[
        int,
        typer.Option(help="Pixels (bits) changed by flip, erase, randomize and their block forms."),
    ] = 64,
    size: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=4096,
            help="Resize to size x size before "
            "distorting (e.g. 28 or 32, a model's size; at most 4096). Default: keep each "
            "image's size.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            min=-SEED_LIMIT,
            max=SEED_LIMIT,
            help="Random seed; the same seed gives byte-identical "
            "outputs. Each image's draw depends on the seed and its relative path only.",
        ),
    ] = 0,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output folder; each file keeps its path relative to its input folder, as a PNG.",
        ),
    ] = Path("distorted"),
    force: Annotated[bool, typer.Option(help="Overwrite existing outputs (inputs never).")] = False,
    skip_bad: SkipBad = False,
) -> None:
    """Write distorted copies of images, to use as queries. Never touches its inputs.

    Prints each written path, so [bold]ebmm distort imgs/ | ebmm read --memory m.safetensors -[/]
    works.
    """
    from ebmm_cli.distort import Distortion, generator_for
    from ebmm_cli.imageio import collect_images, load_image, output_paths, save_image

    distortion = Distortion(
        kind=kind.value, block=block, std=std, value=_fill_value(value), prob=prob, bits=bits
    )
    distortion.validate()
    _hold(ctx, out)
    images = collect_images(inputs, sys.stdin, exclude=out)
    targets = output_paths(images, out, force)
    skipped = 0
    with _progress(len(images), "distorting") as advance:
        for image, target in zip(images, targets, strict=True):
            try:
                x = load_image(image.path, size)
            except EbmmError as e:
                if not skip_bad:
                    raise
                _warn_skipped("distort", [e])
                skipped += 1
                advance()
                continue
            try:
                distortion.check_shape(tuple(x.shape))
            except EbmmError as e:
                raise EbmmError(image.path, f"{e.subject} {e.problem}") from None
            query = distortion(x[None], generator_for(seed, image.rel.as_posix()))[0]
            save_image(query, target)
            print(target, flush=True)
            advance()
    _count_skipped("distort", skipped)


DataRoot = Annotated[
    Path | None,
    typer.Option(
        envvar="EBMM_DATA",
        show_default=False,
        help="Folder holding the datasets (official archive layout); default: the user "
        "cache, where missing datasets are downloaded.",
    ),
]
DatasetName = Annotated[
    str,
    typer.Option(
        help="omniglot, fc100, cifar10, imagenet64, binary, or a folder of images "
        "(class = sub-folder)."
    ),
]
Device = Annotated[str, typer.Option(help="auto (CUDA when available), cpu, or cuda[:i].")]


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the option `name` was given on the command line (not left at its default)."""
    return getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"


def _only_with_resume(ctx: typer.Context) -> None:
    """`--resume` continues a run as it was configured: refuse options it would ignore."""
    allowed = {"out", "resume", "steps", "minutes", "device", "cuda_graph", "profile", "ctx"}
    given = [p.opts[0] for p in ctx.command.params if p.name not in allowed and _given(ctx, p.name)]
    if given:
        raise EbmmError(
            given[0],
            "--resume continues the run as it was configured; it takes only --steps, "
            "--minutes, --device, --cuda-graph and --profile",
        )


# Files of a run folder: any of them means a run lives there.
_RUN_FILES = ("checkpoint.safetensors", "model.safetensors", "metrics.jsonl")


@app.command()
def train(
    ctx: typer.Context,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Run folder: model.safetensors, checkpoint.safetensors, metrics.jsonl, loss.png.",
        ),
    ] = Path("run"),
    recipe: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="Train by a built-in model's recipe (omniglot-28, omniglot-32 and "
            "omniglot-32-conv: the paper's protocol, binary-128): its options, unless given "
            "here too (README).",
        ),
    ] = None,
    memory: Annotated[
        Memory | None,
        typer.Option(
            show_default=False,
            help="Energy network: [bold]conv[/] (ResNet, "
            "convolutional memory; the default for images), [bold]conv-ae[/] (conv plus a "
            "term for how well the written layers redraw the image), [bold]conv-large[/] (the "
            "paper's 64x64 ImageNet network; the default for imagenet64), [bold]fc[/] "
            "(fully-connected memory), [bold]kv[/] (a key-value energy: the write stores "
            "key → value pairs in one matrix, the read draws the value a query's key "
            "recalls), [bold]kv-conv[/] (kv whose written layer is a 3x3 convolution over "
            "a map of keys, each from the whole image), [bold]rnn[/] (gated RNN for "
            "128-bit strings; the default for binary).",
        ),
    ] = None,
    dataset: DatasetName = "omniglot",
    data_root: DataRoot = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            min=8,
            max=1024,
            show_default=False,
            help="Image side: "
            "28 (the report) or 32 (the paper). Default: 28 for Omniglot and folders, 32 for "
            "CIFAR.",
        ),
    ] = None,
    invert: Annotated[
        bool,
        typer.Option(
            help="A folder of dark strokes on light (scans): train on ink = 1, and let the "
            "model invert image files on the way in and out. Omniglot always is.",
        ),
    ] = False,
    binarize: Annotated[
        bool,
        typer.Option(
            help="Threshold the images at 0.5 after resizing, and image files on the way "
            "in: the binary characters of the paper's Omniglot (32x32 resizing greys the "
            "strokes' edges).",
        ),
    ] = False,
    batch_size: Annotated[
        str,
        typer.Option(
            metavar="N|LEAST-MOST",
            help="N, patterns written per episode (the report 5, the paper 64), or a range "
            "such as 8-96: N drawn per step, log-uniformly, and held-out evaluation at four "
            "N (the capacity curve).",
        ),
    ] = "5",
    rates_see_n: Annotated[
        bool,
        typer.Option(
            help="With a range of --batch-size: scale the learned write rates by "
            "(N / N̄)^κ, one learned κ per term of the write loss (the default), or keep "
            "the same rates at every N.",
        ),
    ] = True,
    shots: Annotated[
        int,
        typer.Option(
            min=0,
            help="Images per class in an episode; 0 ignores "
            "classes (CIFAR-10 has too few for 64 distinct).",
        ),
    ] = 1,
    write_steps: Annotated[int, typer.Option(min=1, help="T, gradient steps of writing.")] = 5,
    read_steps: Annotated[int, typer.Option(min=1, help="K, gradient steps of reading.")] = 5,
    read: Annotated[
        ReadKind | None,
        typer.Option(
            show_default=False,
            help="[bold]gd[/]: descend the energy (the paper; the default but for kv and "
            "kv-conv); [bold]decoder[/]: a MAML-adapted decoder (the report); "
            "[bold]redraw[/]: the image the energy draws from what the memory recalls (the "
            "kv memories' default; kv, kv-conv or conv-ae).",
        ),
    ] = None,
    rekeys: Annotated[
        int,
        typer.Option(
            min=0,
            help="The kv memories' redraw read: this many more drawings, each recalled by "
            "the key of the drawing before (a completed drawing's key is nearer the stored "
            "one). 0: one.",
        ),
    ] = 0,
    schedule: Annotated[
        Schedule,
        typer.Option(
            help="[bold]learned[/]: meta-learn write rates, "
            "α, β, read steps and momenta (the paper); [bold]fixed[/]: the report's constants "
            "(write rate 0.5/0.05, α = 0.5 ×0.95, γ₁ = 500 halved)."
        ),
    ] = Schedule("learned"),
    write_lr: Annotated[
        float | None,
        typer.Option(
            show_default=False,
            help="Write rate η: the starting value of the learned rates, or the fixed one. "
            "Default: 0.01 learned, 0.5 (conv 0.05) fixed; binary strings need ~1. "
            "kv, kv-conv: 1, in units of 1/λmax of the episode's keys (below 2 is stable).",
        ),
    ] = None,
    read_lr: Annotated[
        float | None,
        typer.Option(
            show_default=False,
            help="First read step size γ(1), learned from there or fixed. Default: 2 learned, "
            "500 fixed.",
        ),
    ] = None,
    distortion: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="Query distortion "
            "KIND:N: noise:7 (default for images), occlude:16 (the paper), saltpepper:0.1, "
            "eraseblock:64 (default for binary).",
        ),
    ] = None,
    loss: Annotated[
        Loss,
        typer.Option(
            help="mse (the paper), ssim+mse = 0.5 MSE + 0.5 (1 - SSIM) (the report), l1: "
            "mean absolute error, the expected Hamming error of a randomly rounded read, or "
            "bce: binary cross-entropy, for binary images drawn through a sigmoid (kv)."
        ),
    ] = Loss("mse"),
    dynamic: Annotated[
        int | None,
        typer.Option(
            min=1,
            show_default=False,
            help="Written "
            "channels/units; sets the memory size (conv: 1,154 floats each; fc: 257; rnn: 129). "
            "Default: conv 4, fc 16, rnn 64.",
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, show_default=False, help="Stop after this many meta-steps.")
    ] = None,
    minutes: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            show_default=False,
            help="Stop after this much training time, more than 0 (whichever of "
            "--steps/--minutes comes first).",
        ),
    ] = None,
    first_order: Annotated[
        bool,
        typer.Option(
            help="Do not backpropagate through the write's own gradients (faster, less exact)."
        ),
    ] = False,
    prior_minutes: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Spend the first this many of --minutes on a prior phase: nothing is "
            "written, queries are read from the initial weights, so the energy learns to "
            "restore the data's patterns in cheap steps before meta-training proper. 0: none.",
        ),
    ] = 0.0,
    recognition: Annotated[
        float,
        typer.Option(
            help="Weight of a recognition term in the meta-loss: each written memory is "
            "also scored on lowering the energy of what it stored more than that of novel "
            "patterns (held-out metrics report it as `recognition`). 0: the paper's loss.",
        ),
    ] = 0.0,
    completion: Annotated[
        float,
        typer.Option(
            help="Weight of a completion term in the meta-loss: the write must lower the "
            "energy of each query completed (part of the way) with its own stored "
            "content more than with another stored pattern's, so that it pulls the read "
            "towards what it stored. 0: the paper's loss.",
        ),
    ] = 0.0,
    contrast: Annotated[
        float,
        typer.Option(
            help="Weight of a contrast term in the meta-loss: each stored pattern must have "
            "lower energy than the point where the read of its query ended, so that what "
            "was stored becomes the energy's minimum. 0: the paper's loss.",
        ),
    ] = 0.0,
    contrast_steps: Annotated[
        int,
        typer.Option(
            help="With --contrast: compare each stored pattern with where this many plain "
            "descent steps from the read's end lead instead (long descents end far below "
            "and away from what was stored). 0: the read's end.",
        ),
    ] = 0,
    identification: Annotated[
        float,
        typer.Option(
            help="Weight of an identification term in the meta-loss: the write's "
            "per-pattern gradients (kv: its unit keys) must tell each query's own stored "
            "pattern from the others (held-out metrics report the fraction that do as "
            "`identification`). "
            "0: the paper's loss.",
        ),
    ] = 0.0,
    prior_penalty: Annotated[
        float,
        typer.Option(
            help="Weight of a penalty in the meta-loss on the energy's prior repairing "
            "queries on its own: the queries are also read from the unwritten memory, and "
            "whatever that read improves on the query is penalised, so the prior gains "
            "nothing by repairing a query alone. Gradient read only. 0: the paper's loss.",
        ),
    ] = 0.0,
    penalty_memory: Annotated[
        PenaltyMemory,
        typer.Option(
            help="What --prior-penalty reads the queries from: the unwritten memory, or a "
            "foil: a memory written with another episode's patterns, so that a write that "
            "helps any batch alike gains nothing either. One more write and read per step.",
        ),
    ] = PenaltyMemory.unwritten,
    refine: Annotated[
        int,
        typer.Option(
            help="Train through refined memories: each episode's written memory is refined "
            "this many steps (as `ebmm write --refine` does) before the read whose loss "
            "trains the model, whose gradient there also reaches the write (held-out "
            "metrics add `refined_*`). Not with the decoder read. 0: off.",
        ),
    ] = 0,
    write_refine: Annotated[
        int,
        typer.Option(
            min=0,
            help="The model's own write refines its memory this many Adam steps after the "
            "learned steps (`ebmm write` and `ebmm compare` take them unless told --refine; "
            "training steps do not): far better recall where the learned write falls short, "
            "seconds per write. Not with the decoder read. 0: the learned write alone.",
        ),
    ] = 0,
    write_refine_lr: Annotated[
        float | None,
        typer.Option(
            show_default=False,
            help="Adam's rate for every refinement of the model's memories (its write's, "
            "--refine's). Default 0.01.",
        ),
    ] = None,
    redraw: Annotated[
        float,
        typer.Option(
            help="Weight of a redraw term in the meta-loss (--memory conv-ae): the image "
            "the written bottleneck redraws from each query must be its stored pattern "
            "(held-out metrics add `redrawn_*`). 0: off.",
        ),
    ] = 0.0,
    redraw_stored: Annotated[
        float,
        typer.Option(
            help="Weight of the same redraw term for the stored patterns (--memory "
            "conv-ae): what the written bottleneck redraws from each stored pattern must "
            "be that pattern, which teaches its decoder to draw characters at all "
            "(held-out metrics add `redrawn_stored_hamming`). 0: off.",
        ),
    ] = 0.0,
    init: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="Start from a trained model's weights (a file or a built-in's name) instead "
            "of a fresh initialisation: a curriculum's next stage (N = 1, then 8, then 64), "
            "or a built-in fine-tuned. Its network and rules must match this run's.",
        ),
    ] = None,
    lr: Annotated[
        float,
        typer.Option(
            help="AdamW learning rate of the network (the paper's "
            "5e-5 suits its 2e6 steps; this default suits runs of minutes to hours)."
        ),
    ] = 1e-3,
    rule_lr: Annotated[
        float,
        typer.Option(
            help="AdamW learning rate of the rule parameters (rates, α, β, step sizes, momenta)."
        ),
    ] = 3e-2,
    eval_every: Annotated[
        int, typer.Option(min=1, help="Held-out evaluation and model save every this many steps.")
    ] = 25,
    eval_episodes: Annotated[
        int, typer.Option(min=1, help="Held-out episodes per evaluation.")
    ] = 20,
    checkpoint_minutes: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Save a checkpoint at least this often (0: after every step). A killed run "
            "loses at most this much.",
        ),
    ] = 2.0,
    episodes_per_step: Annotated[
        int,
        typer.Option(
            min=1,
            help="Episodes written and read per meta-step (per process under torchrun); "
            "the step follows their mean loss.",
        ),
    ] = 1,
    seed: Annotated[
        int,
        typer.Option(
            min=-SEED_LIMIT, max=SEED_LIMIT, help="Seed of the initialisation and of all episodes."
        ),
    ] = 0,
    device: Device = "auto",
    cuda_graph: CudaGraphOption = CudaGraph.auto,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the run in --out from its checkpoint, with its own budget and "
            "schedule; a new --steps/--minutes (all that may change) replaces both."
        ),
    ] = False,
    profile: Annotated[
        bool,
        typer.Option(
            help="Profile meta-steps 3 to 5 with torch.profiler: the top operators in "
            "OUT/profile.txt, a trace for Perfetto or chrome://tracing in OUT/profile-trace.json.",
        ),
    ] = False,
) -> None:
    """Meta-train an energy-based memory: write episodes, read distorted queries, learn.

    Several processes: torchrun --nproc-per-node N -m ebmm_cli train ... (each process
    draws its own episodes; gradients are averaged; rank 0 writes the files).
    """
    from ebmm_cli import builtin
    from ebmm_cli.meta import Trainer, init_distributed
    from ebmm_cli.recipes import recipe_options
    from ebmm_cli.runconfig import check_budget, parse_batch_size, train_config

    if not resume or steps is not None or minutes is not None:
        check_budget(steps, minutes)  # a resumed run keeps its own budget unless given one
    if resume:
        _only_with_resume(ctx)
    if out.exists() and not out.is_dir():
        raise EbmmError(out, "is a file; --out takes a run folder")
    distributed = init_distributed(device)
    if int(os.environ.get("RANK", "0")) == 0:  # the process that writes the run's files
        _hold(ctx, out)
    if resume:
        # Under torchrun each process takes its own GPU, whatever the run used before;
        # otherwise an explicit --device moves the run (a GPU run resumed on a CPU).
        moved = distributed or (device if _given(ctx, "device") else None)
        graphs = cuda_graph.value if _given(ctx, "cuda_graph") else None
        trainer = Trainer.resume(out, steps, minutes, moved, graphs)
    else:
        if any((out / name).exists() for name in _RUN_FILES):
            raise EbmmError(out, "holds a run already; add --resume, or choose another --out")
        options = dict(
            dataset=dataset,
            memory=memory.value if memory else None,
            data_root=data_root,
            image_size=image_size,
            invert=invert,
            binarize=binarize,
            batch_size=parse_batch_size(batch_size),
            shots=shots,
            write_steps=write_steps,
            read_steps=read_steps,
            read=read.value if read else None,
            rekeys=rekeys,
            schedule=schedule.value,
            write_lr=write_lr,
            read_lr=read_lr,
            distortion=distortion,
            loss=loss.value,
            dynamic=dynamic,
            steps=steps,
            minutes=minutes,
            first_order=first_order,
            prior_minutes=prior_minutes,
            rates_see_n=rates_see_n,
            recognition=recognition,
            completion=completion,
            contrast=contrast,
            contrast_steps=contrast_steps,
            identification=identification,
            init=str(builtin.resolve(init).resolve()) if init is not None else None,
            prior_penalty=prior_penalty,
            penalty_memory=penalty_memory.value,
            refine=refine,
            write_refine=write_refine,
            write_refine_lr=write_refine_lr,
            redraw=redraw,
            redraw_stored=redraw_stored,
            lr=lr,
            rule_lr=rule_lr,
            seed=seed,
            device=distributed or device,
            eval_every=eval_every,
            eval_episodes=eval_episodes,
            checkpoint_minutes=checkpoint_minutes,
            episodes_per_step=episodes_per_step,
            cuda_graph=cuda_graph.value,
        )
        if recipe is not None:  # the recipe's options, where the command line is silent
            chosen = recipe_options(recipe)
            options.update({k: v for k, v in chosen.items() if not _given(ctx, k)})
        trainer = Trainer.create(train_config(**options), out)
    if trainer.rank > 0:  # rank 0 shows progress and the summary
        trainer.run()
        return
    try:
        with (
            _train_progress(trainer.config.steps, trainer.config.minutes) as update,
            _profiled(out, trainer.device, profile) as tick,
            _stop_between_steps(trainer) as stop_if_asked,
        ):
            path = trainer.run(lambda info: (update(info), tick(), stop_if_asked()))
    except KeyboardInterrupt as e:
        how = "terminated" if isinstance(e, _Terminated) else "interrupted"
        if trainer.stepping:
            saved = f"nothing saved; its checkpoint of step {trainer.checkpointed} stands"
            where = f"inside step {trainer.step + 1}"
        else:
            saved, where = "model and checkpoint saved", f"at step {trainer.step}"
        print(
            f"ebmm train: {how} {where}; {saved} in {out}; continue with --resume",
            file=sys.stderr,
        )
        raise typer.Exit(143 if isinstance(e, _Terminated) else 130) from None
    last = trainer.metrics[-1]
    print(path)
    summary = (
        f"step {last['step']}: held-out loss {last['heldout_loss']:.4f}, MSE "
        f"{last['heldout_mse']:.4f} (queries {last['heldout_query_mse']:.4f})"
    )
    print(summary, file=sys.stderr)


@contextlib.contextmanager
def _stop_between_steps(trainer: Trainer) -> Iterator[Callable[[], None]]:
    """While training, SIGTERM and a first Ctrl-C only ask to stop: the check it yields
    (called after each step, where the model, optimiser and random streams agree) then
    raises `_Terminated` or KeyboardInterrupt, so the checkpoint it leaves resumes
    exactly. A step on the CPU takes seconds, well within the grace period of `timeout`,
    batch schedulers or `docker stop`; a second Ctrl-C stops at once, inside the step,
    and then nothing is saved (`Trainer.run`). During an evaluation, which can take
    minutes, either stops at once: the resumed run evaluates that step again first."""
    asked: list[int] = []

    def stop(signum: int) -> None:
        raise _Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    def handle(signum: int, frame: Any) -> None:
        if trainer.evaluating or (signum == signal.SIGINT and signum in asked):
            stop(signum)
        if signum == signal.SIGINT:
            print(
                "ebmm train: stopping after this step (Ctrl-C again stops at once and loses it)",
                file=sys.stderr,
            )
        asked.append(signum)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def stop_if_asked() -> None:
        if asked:
            stop(signal.SIGTERM if signal.SIGTERM in asked else signal.SIGINT)

    try:
        yield stop_if_asked
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _profiled(out: Path, device: Any, enabled: bool) -> Iterator[Callable[[], None]]:
    """A per-step callback that drives torch.profiler over steps 3-5 (after one step of
    warm-up and one skipped), then writes its table and trace into `out`."""
    if not enabled:
        yield lambda: None
        return
    from torch.profiler import ProfilerActivity, profile, schedule

    def save(prof: Any) -> None:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        (out / "profile.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=30))
        prof.export_chrome_trace(str(out / "profile-trace.json"))

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(
        activities=activities, schedule=schedule(wait=1, warmup=1, active=3), on_trace_ready=save
    ) as prof:
        yield prof.step


def _train_progress(steps: int | None, minutes: float | None) -> Any:
    """Progress on stderr: a rich bar (step, loss, held-out loss, steps/s, ETA) on a
    terminal; otherwise (a log file, `nohup`) one plain line per held-out evaluation."""

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    def fields(info: dict[str, Any]) -> dict[str, str]:
        rate = info["steps_per_s"]
        left = []
        if info["steps"] is not None and rate > 0:
            left.append((info["steps"] - info["step"]) / rate)
        if info["minutes"] is not None:
            left.append(info["minutes"] * 60 - info["elapsed"])
        loss, held = info["loss"], info["heldout_loss"]
        return {
            "rate": f"{rate:.2f}",
            "eta": f"{max(min(left), 0) / 60:.1f} min" if left else "-",
            "loss": "-" if loss is None else f"{loss:.4f}",
            "heldout": "-" if held is None else f"{held:.4f}",
        }

    @contextlib.contextmanager
    def bar() -> Any:
        console = Console(stderr=True)
        if not console.is_terminal:

            def line(info: dict[str, Any]) -> None:
                if info["evaluated"]:
                    f = fields(info)
                    print(
                        f"ebmm train: step {info['step']}, {info['elapsed'] / 60:.1f} min: "
                        f"loss {f['loss']}, held-out {f['heldout']}, {f['rate']} steps/s, "
                        f"ETA {f['eta']}",
                        file=sys.stderr,
                        flush=True,
                    )

            yield line
            return
        columns = [
            TextColumn("step {task.completed}"),
            BarColumn(),
            TextColumn(
                "loss {task.fields[loss]}  held-out {task.fields[heldout]}  "
                "{task.fields[rate]} steps/s  ETA {task.fields[eta]}"
            ),
            TimeElapsedColumn(),
        ]
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("train", total=steps, loss="-", heldout="-", rate="-", eta="-")
            yield lambda info: progress.update(task, completed=info["step"], **fields(info))

    return bar()


def _note(command: str, notes: list[str]) -> None:
    for note in notes:
        print(f"ebmm {command}: note: {note}", file=sys.stderr)


@app.command()
def write(
    ctx: typer.Context,
    images: Annotated[
        list[str],
        typer.Argument(
            help="Images to store as one batch: files, folders, or - for paths on stdin.",
            show_default=False,
        ),
    ],
    model: Annotated[
        Path | None,
        typer.Option(
            help="A trained model: model.safetensors from ebmm train, or a built-in's name "
            "(ebmm models). Default: the built-in omniglot-28.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The memory file to create.")] = Path(
        "memory.safetensors"
    ),
    seed: Annotated[
        int,
        typer.Option(
            min=-SEED_LIMIT, max=SEED_LIMIT, help="Seed of the decoder read's adaptation queries."
        ),
    ] = 0,
    device: Device = "auto",
    force: Annotated[bool, typer.Option(help="Overwrite an existing memory file.")] = False,
    append: Annotated[
        bool,
        typer.Option(
            help="Add the images to the memory in --out (written by the same model): T more "
            "write steps from it, on the new images only. Models meta-trained on one-batch "
            "writes recall appended memories poorly (see the README).",
        ),
    ] = False,
    refine: Annotated[
        int | None,
        typer.Option(
            min=0,
            show_default=False,
            help="After the learned write, this many Adam steps on the written weights so "
            "that the model's read restores freshly distorted copies of the images (its "
            "training distortion): far better recall where the learned write falls short, "
            "at the cost of seconds per write (see the README). With --append it sees the "
            "new images only. Default: the model's own (0 unless trained with "
            "--write-refine, as omniglot-32 was); 0: the learned write alone.",
        ),
    ] = None,
    refine_lr: RefineLr = None,
    skip_bad: SkipBad = False,
) -> None:
    """Write images into a new memory file (T gradient steps from the meta-learned start;
    with --refine, then Adam steps on the model's own read of distorted copies).

    The memory file is self-contained: [bold]ebmm read[/] and [bold]ebmm energy[/] need nothing
    else.
    """
    import torch

    from ebmm_cli import builtin
    from ebmm_cli.device import resolve_device
    from ebmm_cli.imageio import check_outputs, collect_images, load_batch
    from ebmm_cli.model import refine_memory, same_model, write_memory
    from ebmm_cli.store import load_memory, load_model, save_memory

    if model is None:
        print(
            f"ebmm write: note: no --model given; using the built-in {builtin.DEFAULT} "
            "(Omniglot 28x28, the report's protocol)",
            file=sys.stderr,
        )
    model = builtin.resolve(model or builtin.DEFAULT)
    check_outputs({"--out": [] if append else out}, {"--model": [model]}, force=True)
    _hold(ctx, out)
    net = load_model(model)
    steps = _refinement(net, model, refine, refine_lr)
    stored = None
    if append:
        if force:
            raise EbmmError("--append", "adds to --out; it cannot be combined with --force")
        if not out.exists():
            raise EbmmError(out, "no memory file to append to; drop --append to create one")
        owner, stored = load_memory(out)
        if net.decoder is not None:
            raise EbmmError(out, "a decoder-read memory cannot be appended to")
        if not same_model(owner, net):
            raise EbmmError(out, f"was written by another model than {model}")
    elif out.exists() and not force:
        raise EbmmError(out, "exists; use --force to overwrite, or --append to add to it")
    shape = _image_shape(net, model)
    found = collect_images(images, sys.stdin)
    if any(img.path.resolve() == out.resolve() for img in found):
        raise EbmmError(out, "would overwrite an input")
    batch = load_batch(
        found, shape[0], shape[1], net.config.invert_files, skip_bad, net.config.binarize
    )
    _warn_skipped("write", batch.skipped)
    if not batch.kept:
        raise EbmmError(found[0].group, "no readable images to write")
    _note("write", batch.notes)
    trained = net.config.rules.patterns
    total = len(batch.images) + (0 if stored is None else stored.patterns)
    if trained is not None and total > trained[1]:
        print(
            f"ebmm write: warning: the memory would hold {total} images, more than the "
            f"{_range(trained)} patterns {model} was meta-trained to write; recall may be poor",
            file=sys.stderr,
        )
    dev = resolve_device(device)
    try:
        memory = write_memory(
            net.to(dev),
            batch.images.to(dev),
            generator=torch.Generator().manual_seed(seed),
            append_to=None if stored is None else stored.to(dev),
        )
        if steps:
            generator = torch.Generator().manual_seed(seed)
            memory = refine_memory(
                net, memory, batch.images.to(dev), steps, refine_lr, generator=generator
            )
    except FloatingPointError as e:
        raise EbmmError(model, str(e), exit_code=1) from None
    save_memory(net, memory.detach(), out)
    _count_skipped("write", len(batch.skipped))
    print(out)


def _range(patterns: tuple[int, int]) -> str:
    """A model's trained N: `64`, or `8-96` for a range."""
    least, most = patterns
    return str(most) if least == most else f"{least}-{most}"


def _image_shape(net: Any, path: Path) -> tuple[int, ...]:
    shape = net.config.energy.shape
    if len(shape) != 3:
        raise EbmmError(path, "is a binary-string model; write and read images with an image model")
    return shape


@app.command()
def read(
    ctx: typer.Context,
    queries: Annotated[
        list[str],
        typer.Argument(
            help="Query images: files, folders, or - for paths on stdin.", show_default=False
        ),
    ],
    memory: Annotated[
        Path, typer.Option(help="A memory file from ebmm write.", show_default=False)
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output folder; each retrieval keeps its query's relative path, as a PNG.",
        ),
    ] = Path("retrieved"),
    steps: Annotated[
        int | None,
        typer.Option(min=1, show_default=False, help="K, read steps (default: the model's)."),
    ] = None,
    save_iterates: Annotated[
        bool, typer.Option(help="Also write NAME.iterates.png: a strip of x(0) ... x(K).")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Queries read at once.")] = 64,
    device: Device = "auto",
    force: Annotated[bool, typer.Option(help="Overwrite existing outputs.")] = False,
    skip_bad: SkipBad = False,
) -> None:
    """Retrieve stored images from distorted queries; prints each written path."""
    import torch

    from ebmm_cli.device import resolve_device
    from ebmm_cli.imageio import collect_images, load_batch, output_paths, save_image, to_file
    from ebmm_cli.model import retrieve
    from ebmm_cli.store import load_memory

    _hold(ctx, out)
    net, mem = load_memory(memory)
    shape = _image_shape(net, memory)
    found = collect_images(queries, sys.stdin, exclude=out)
    targets = output_paths(found, out, force)
    strips = (
        output_paths(found, out.with_name(out.name + "-iterates"), force) if save_iterates else []
    )
    dev = resolve_device(device)
    net = net.to(dev)
    mem = mem.to(dev)
    invert = net.config.invert_files
    noted = set()
    skipped = 0
    with _progress(len(found), "reading") as advance:
        for start in range(0, len(found), batch_size):
            chunk = found[start : start + batch_size]
            batch = load_batch(chunk, shape[0], shape[1], invert, skip_bad, net.config.binarize)
            _warn_skipped("read", batch.skipped)
            skipped += len(batch.skipped)
            for _ in batch.skipped:
                advance()
            if not batch.kept:
                continue
            _note("read", sorted(set(batch.notes) - noted))
            noted.update(batch.notes)
            x = batch.images.to(dev)
            try:
                iterates = [x, *retrieve(net, mem, x, steps=steps)]
            except FloatingPointError as e:
                raise EbmmError(memory, f"{e} (queries from {chunk[0].path})", 1) from None
            for i, index in enumerate(batch.kept):
                frames = [to_file(it[i], invert, batch.channels[i]) for it in iterates]
                target = targets[start + index]
                save_image(frames[-1], target)
                if save_iterates:
                    save_image(torch.cat(frames, dim=2), strips[start + index])
                print(target, flush=True)
                advance()
    _count_skipped("read", skipped)


@app.command()
def energy(
    images: Annotated[
        list[str],
        typer.Argument(
            help="Images: files, folders, or - for paths on "
            "stdin. Each folder named here is a group.",
            show_default=False,
        ),
    ],
    memory: Annotated[
        Path, typer.Option(help="A memory file from ebmm write.", show_default=False)
    ],
    json_output: Annotated[
        bool,
        typer.Option(
            "--json", help="Print JSON: {images: [{path, energy}], groups: [{path, count, mean}]}."
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images evaluated at once.")] = 64,
    device: Device = "auto",
    skip_bad: SkipBad = False,
) -> None:
    """Energy of each image under a written memory, and the mean per input folder.

    Compare originals, queries and retrievals: [bold]ebmm energy --memory m.safetensors
    originals/ queries/ retrieved/[/] (the report's Table 1).
    """
    import json

    import torch

    from ebmm_cli.device import resolve_device
    from ebmm_cli.imageio import collect_images, group_table, load_batch
    from ebmm_cli.memory import energy as energy_of
    from ebmm_cli.store import load_memory

    net, mem = load_memory(memory)
    shape = _image_shape(net, memory)
    found = collect_images(images, sys.stdin)
    dev = resolve_device(device)
    net = net.to(dev)
    params = mem.to(dev).params
    values: list[float] = []
    measured = []
    noted: set[str] = set()
    skipped = 0
    for start in range(0, len(found), batch_size):
        chunk = found[start : start + batch_size]
        batch = load_batch(
            chunk, shape[0], shape[1], net.config.invert_files, skip_bad, net.config.binarize
        )
        _warn_skipped("energy", batch.skipped)
        skipped += len(batch.skipped)
        measured.extend(chunk[i] for i in batch.kept)
        _note("energy", sorted(set(batch.notes) - noted))
        noted.update(batch.notes)
        if batch.kept:
            with torch.no_grad():
                values.extend(energy_of(net.energy, params, batch.images.to(dev)).tolist())
    _count_skipped("energy", skipped)
    if not measured:
        raise EbmmError(found[0].group, "no readable images")
    result = group_table(measured, values, "energy")
    if json_output:
        print(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("image", "energy")
    for row in result["images"]:
        table.add_row(row["path"], f"{row['energy']:.4f}")
    summary = Table("folder", "images", "mean energy")
    for row in result["groups"]:
        summary.add_row(row["path"], str(row["count"]), f"{row['mean']:.4f}")
    console = Console()
    console.print(table)
    console.print(summary)


@app.command()
def compare(
    ctx: typer.Context,
    model: Annotated[
        list[Path] | None,
        typer.Option(
            help="A trained model, or a built-in's name (repeatable).", show_default=False
        ),
    ] = None,
    baselines: Annotated[
        str,
        typer.Option(
            help="Comma-separated: identity, nearest, "
            "nearest-pca:K, hopfield-hebb, hopfield-storkey, hopfield-pinv, modern-hopfield."
        ),
    ] = ("identity,nearest,hopfield-pinv"),
    unwritten: Annotated[
        bool,
        typer.Option(
            help="Add a row per model that writes nothing and reads every query from its "
            "initial weights: the gap to the model's own row is what its memory stores (its "
            "slow weights alone may already beat the query).",
        ),
    ] = False,
    refine: Annotated[
        int | None,
        typer.Option(
            min=0,
            show_default=False,
            help="Add a row per model whose learned write is refined by this many Adam "
            "steps on its own read of freshly distorted copies of the stored patterns (see "
            "ebmm write --refine), beside its own write (which a model trained with "
            "--write-refine refines already); 0 adds its learned write alone.",
        ),
    ] = None,
    refine_lr: RefineLr = None,
    dataset: DatasetName = "omniglot",
    data_root: DataRoot = None,
    split: Annotated[str, typer.Option(help="Split the episodes come from.")] = "test",
    image_size: Annotated[
        int | None,
        typer.Option(
            min=8,
            max=1024,
            show_default=False,
            help="Image side (default: the first model's, else the dataset's).",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Patterns written per episode (the paper: 64).")
    ] = 64,
    patterns: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="Sweep the number "
            "of written patterns, e.g. 16,32,48,64,96 (overrides --batch-size).",
        ),
    ] = None,
    shots: Annotated[int, typer.Option(min=0, help="Images per class (0: ignore classes).")] = 1,
    binarize: Annotated[
        bool | None,
        typer.Option(
            "--binarize/--no-binarize",
            show_default=False,
            help="Threshold the images at 0.5 after resizing (the paper's binary "
            "Omniglot). Default: as the first model was trained, else not.",
        ),
    ] = None,
    distortion: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="Query distortion KIND:N (the paper: occlude:16 for images; see README for "
            "binary strings). Default: the first model's training distortion, else the "
            "dataset's (noise:7 for images, eraseblock:64 for binary).",
        ),
    ] = None,
    episodes: Annotated[int, typer.Option(min=1, help="Episodes per setting.")] = 20,
    seed: Annotated[
        int, typer.Option(min=-SEED_LIMIT, max=SEED_LIMIT, help="Seed of the episodes and queries.")
    ] = 0,
    device: Device = "auto",
    cuda_graph: CudaGraphOption = CudaGraph.auto,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON {config, rows}.")] = False,
    markdown: Annotated[
        Path | None, typer.Option(show_default=False, help="Also write a markdown table.")
    ] = None,
    grid: Annotated[
        Path | None,
        typer.Option(
            show_default=False,
            help="Also write a PNG: original / query / each method's retrieval, first episode.",
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            show_default=False,
            help="Also write a PNG of "
            "the error against memory size, or against --patterns when sweeping.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Overwrite existing --markdown, --grid and --plot files.")
    ] = False,
) -> None:
    """Run models and baselines on the same seeded episodes and queries; one table."""
    import json

    from ebmm_cli import builtin
    from ebmm_cli import compare as harness
    from ebmm_cli.atomic import atomic_path
    from ebmm_cli.choices import dataset_defaults
    from ebmm_cli.device import resolve_device
    from ebmm_cli.distort import Distortion
    from ebmm_cli.imageio import check_outputs
    from ebmm_cli.store import load_model

    model = [builtin.resolve(m) for m in model or []]
    check_outputs(
        {"--markdown": markdown, "--grid": grid, "--plot": plot}, {"--model": model}, force
    )
    for path in (markdown, grid, plot):
        if path is not None:
            _hold(ctx, path)
    counts = _int_list(patterns, "--patterns") if patterns else (batch_size,)
    _check_refine_lr(refine_lr, refine or 0, "--refine above 0")
    methods: list[Any] = harness.methods_from(baselines.split(","))
    dev = resolve_device(device)
    loaded = [(path, load_model(path).to(dev)) for path in model or []]
    for _, each in loaded:  # episodes of one shape: replayed from CUDA graphs
        each.use_cuda_graphs(cuda_graph.value)
    first = loaded[0][1].config if loaded else None
    if distortion is None:
        distortion = first.distortion if first else dataset_defaults(dataset).distortion
    Distortion.parse(distortion)
    shape = first.energy.shape if first else None
    config = harness.CompareConfig(
        dataset=dataset,
        data_root=str(data_root) if data_root else None,
        split=split,
        image_size=image_size,
        patterns=counts,
        shots=shots or None,
        distortion=distortion,
        episodes=episodes,
        seed=seed,
        invert=bool(first and first.invert_files),
        binarize=bool(first and first.binarize) if binarize is None else binarize,
    )
    if config.binarize and dataset == "binary":
        raise EbmmError("--binarize", "is for images; binary strings are binary already")
    eps = harness.make_episodes(config, shape)
    data_shape = next(iter(eps.values()))[0].shape
    for (path, net), name in zip(loaded, _model_labels([p for p, _ in loaded]), strict=True):
        harness.check_model(net, path, data_shape)
        own = net.config.rules.refine  # the model's own write, refined or not
        if own or refine:
            _check_refinable(net, path)
        methods.append(harness.ModelMethod(net, f"ebmm:{name}", dev, refine=own))
        if unwritten:
            methods.append(harness.ModelMethod(net, f"ebmm:{name} unwritten", dev, unwritten=True))
        if refine is not None:
            label = f"ebmm:{name} refined {refine}"
            if refine_lr is not None:
                label += f" at {refine_lr:g}"
            method = harness.ModelMethod(net, label, dev, refine=refine, refine_lr=refine_lr)
            methods.append(method)
    if not methods:
        raise EbmmError("--baselines", "nothing to compare: give --model or baselines")
    rows = harness.run(methods, eps)
    if markdown:
        with atomic_path(markdown) as tmp:
            tmp.write_text(harness.markdown(rows))
    if plot:
        metric = "hamming" if dataset == "binary" else "sq_error"
        harness.plot(rows, plot, metric)
    if grid:
        harness.grid(methods, next(iter(eps.values()))[0], grid)
    if json_output:
        print(json.dumps(harness.report(config, rows), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{dataset} ({split}), {distortion}, {episodes} episodes: "
        "mean ±its standard error [5th, 95th percentile of the episodes]"
    )
    for col in ("method", "patterns", "floats", *harness.METRICS):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(
            r["method"],
            str(r["patterns"]),
            f"{r['memory_floats']:,}",
            *(harness.format_metric(r[k]) for k in harness.METRICS),
        )
    Console(width=250).print(table)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise EbmmError(option, f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise EbmmError(option, f"expected positive integers, got {text!r}")
    return values


@app.command()
def models(
    json_output: Annotated[
        bool, typer.Option("--json", help="Print a JSON list, one object per model.")
    ] = False,
) -> None:
    """List the trained models that ship with ebmm: a name works wherever --model does."""
    import json

    from ebmm_cli import builtin

    found = [builtin.describe(builtin.FOLDER / f"{n}.safetensors") for n in builtin.names()]
    if json_output:
        print(json.dumps(found, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"built-in models ({builtin.FOLDER})", title_justify="left")
    for column in ("name", "protocol", "pattern", "memory floats", "N", "held-out", "trained"):
        table.add_column(column)
    for m in found:
        shape = "x".join(str(v) for v in m["shape"])
        held = m.get("heldout", {})
        table.add_row(
            m["name"],
            f"{m['dataset']}{' binarized' if m['binarize'] else ''}, {m['memory']}, "
            f"{m['distortion']}, {m['read']} read"
            + (f", write refined {m['refine']} steps" if m["refine"] else ""),
            shape,
            f"{m['memory_floats']:,}" if m["memory_floats"] else "-",
            _range(m["patterns"]) if m["patterns"] else "-",
            _held_out(held),
            f"{m.get('steps', '?')} steps, {m.get('minutes', '?')} min, {m.get('machine', '?')}",
        )
    Console(width=200).print(table)


def _held_out(held: dict[str, Any]) -> str:
    """A built-in's held-out metrics in a table cell: the ratios to the query's; for a
    model whose write refines, its write's (`refined_*`), then the learned steps'."""
    if not held:
        return "-"
    refined = "refined_mse" in held
    key = "refined_" if refined else ""
    parts = [f"MSE {held[key + 'mse'] / held['query_mse']:.3f} of the query's"]
    if "hamming" in held:
        parts.append(f"Hamming {held[key + 'hamming']:.1f} (query {held['query_hamming']:.1f})")
    if "ssim" in held:
        parts.append(f"SSIM {held[key + 'ssim']:.3f} (query {held['query_ssim']:.3f})")
    if refined and "hamming" in held:
        parts.append(f"learned steps alone: Hamming {held['hamming']:.1f}")
    return ", ".join(parts)


def _model_labels(paths: list[Path]) -> list[str]:
    """One row label per `--model`: a run's model (`model.safetensors`) by its run
    folder, a built-in or any other file by its own name (a file kept as
    `exports/best.safetensors` is `best`, not `exports`). Files whose labels would clash
    are told apart by folder and file name, and the same file given twice by its place."""
    from ebmm_cli import builtin

    def short(path: Path) -> str:
        in_run = path.stem == "model" and path.parent != builtin.FOLDER
        return (path.parent.name or path.stem) if in_run else path.stem

    names = [short(p) for p in paths]
    names = [
        f"{p.parent.name}/{p.stem}" if names.count(n) > 1 and p.parent.name else n
        for p, n in zip(paths, names, strict=True)
    ]
    return [
        f"{n} #{names[:i].count(n) + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)
    ]


def _progress(total: int, label: str) -> Any:
    """A transient rich progress bar on stderr; yields a function that advances it.

    stdout is left alone when it is a pipe, so printed paths reach the next command.
    """

    from rich.console import Console
    from rich.progress import Progress

    @contextlib.contextmanager
    def bar() -> Any:
        console = Console(stderr=True)
        progress = Progress(
            console=console,
            transient=True,
            redirect_stdout=sys.stdout.isatty(),
            disable=total < 10 or not console.is_terminal,
        )
        with progress:
            task = progress.add_task(label, total=total)
            yield lambda: progress.advance(task)

    return bar()


def main() -> None:
    """Console-script entry point: SIGTERM stops as cleanly as Ctrl-C, and paths whose
    names are not UTF-8 print as the bytes they are."""
    signal.signal(signal.SIGTERM, _terminate)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(errors="surrogateescape")
    app()
