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
    READS,
    SETTINGS,
)
from ebmm_cli.errors import EbmmError

if TYPE_CHECKING:  # torch loads only inside the commands that need it
    from ebmm_cli.meta import Trainer
    from ebmm_cli.model import Model
    from ebmm_cli.runconfig import TrainConfig


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
_INTERRUPTED = "interrupted; no output was left half-written"
# Signals that stop a command as SIGTERM does: a closed terminal or dropped ssh (SIGHUP).
_STOPS = (signal.SIGTERM, signal.SIGHUP)


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
        except KeyboardInterrupt:
            raise _Failure(ctx.invoked_subcommand, _INTERRUPTED, 130) from None
        except (typer.TyperException, typer.Abort, typer.Exit):
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
Loss = _choices("Loss", LOSSES)
CudaGraph = _choices("CudaGraph", CUDA_GRAPHS)

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
Seed = Annotated[
    int,
    typer.Option(
        min=-SEED_LIMIT,
        max=SEED_LIMIT,
        help="Random seed of every draw the command makes: the same seed and inputs give "
        "the same outputs, byte for byte.",
    ),
]
Force = Annotated[bool, typer.Option(help="Overwrite existing outputs (inputs never).")]


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
        "was trained with --set write_refine_lr).",
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


Null = Annotated[
    bool,
    typer.Option(
        "--null",
        "-0",
        help="With -: the paths on stdin are NUL-separated (find -print0), for names that "
        "hold newlines. Without it, one path a line (spaces are part of the name).",
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
            help="Fill of the occluded block in the file's own values: a number in [0, 1], "
            "or [bold]uniform[/] for random values. 0 is black: on dark-on-light files "
            "(Omniglot's PNGs, scans) a block of ink, not the paper's blank, which is 1 "
            "there; --model picks the fill a model was trained with."
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
    seed: Seed = 0,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output folder; each file keeps its path relative to its input folder, as a PNG.",
        ),
    ] = Path("distorted"),
    force: Force = False,
    model: Annotated[
        str | None,
        typer.Option(
            help="Distort as this model was trained (a model file or a built-in's name): "
            "its distortion, image size, polarity and thresholding, so that the queries are "
            "the ones its read expects; files are written in the inputs' own polarity. "
            "Replaces --kind, --block, --std, --value, --prob, --bits and --size.",
            show_default=False,
        ),
    ] = None,
    skip_bad: SkipBad = False,
    null: Null = False,
) -> None:
    """Write distorted copies of images, to use as queries. Never touches its inputs.
    Each image's draw depends on --seed and its path relative to its input only.

    Prints each written path, so [bold]ebmm distort imgs/ | ebmm read --memory m.safetensors -[/]
    works. [bold]ebmm distort --model M chars/ -o q && ebmm write --model M chars/ -o m &&
    ebmm read --memory m q[/] is the paper's protocol on your own files.
    """
    from ebmm_cli.distort import Distortion, generator_for
    from ebmm_cli.imageio import collect_images, load_image, output_paths, save_image

    if model is None:
        distortion = Distortion(
            kind=kind.value, block=block, std=std, value=_fill_value(value), prob=prob, bits=bits
        )
        distortion.validate()
        as_trained = None
    else:
        given = [n for n in _DISTORT_KNOBS if _given(ctx, n)]
        if given:
            raise EbmmError(
                f"--{given[0].replace('_', '-')}", "not with --model, which sets it as trained"
            )
        as_trained = _trained_queries(model)
        distortion, size = as_trained.distortion, as_trained.size
    _hold(ctx, out)
    images = collect_images(inputs, sys.stdin, exclude=out, null=null)
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
            generator = generator_for(seed, image.rel.as_posix())
            try:
                distortion.check_shape(tuple(x.shape))
                if as_trained is None:
                    query = distortion(x[None], generator)[0]
                else:
                    query = as_trained(x, generator)
            except EbmmError as e:
                raise EbmmError(image.path, f"{e.subject} {e.problem}") from None
            save_image(query, target)
            print(target, flush=True)
            advance()
    _count_skipped("distort", skipped)


_DISTORT_KNOBS = ("kind", "block", "std", "value", "prob", "bits", "size")
"""`ebmm distort`'s options that `--model` sets from the model instead."""


def _trained_queries(model: str) -> Any:
    """The queries `model` was trained on, as a function of one image file's tensor
    (`distort.AsTrained`), from its header alone (no weights loaded)."""

    from ebmm_cli import builtin
    from ebmm_cli.distort import AsTrained, Distortion
    from ebmm_cli.model import ModelConfig
    from ebmm_cli.store import read_header

    path = builtin.resolve(model)
    meta = read_header(path)
    try:
        config = ModelConfig.from_json(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise EbmmError(path, f"not an ebmm model file ({e})") from None
    shape = config.energy.shape
    if len(shape) != 3:
        raise EbmmError(path, f"a model of {config.dataset} patterns, not of images")
    return AsTrained(
        distortion=Distortion.parse(config.distortion, shape),
        channels=shape[0],
        size=shape[-1],
        invert=config.invert_files,
        binarize=config.binarize,
    )


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


_SETTINGS_HELP = "; ".join(f"[bold]{key}[/]: {what}" for key, (_, what) in SETTINGS.items())


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
            help="Energy network: [bold]conv[/] (ResNet, convolutional memory; the default "
            "for images), [bold]conv-large[/] (the paper's 64x64 ImageNet network; the "
            "default for imagenet64), [bold]fc[/] (fully-connected memory), [bold]kv[/] (a "
            "key-value energy: the write stores key → value pairs in one matrix, the read "
            "draws the value a query's key recalls), [bold]kv-conv[/] (kv whose written "
            "layer is a 3x3 convolution over a map of keys, each from the whole image), "
            "[bold]rnn[/] (gated RNN for 128-bit strings; the default for binary).",
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
            help="Image side: 28 (the report) or 32 (the paper). Default: 28 for Omniglot "
            "and folders, 32 for CIFAR.",
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
            "such as 8-96: N drawn per step, log-uniformly, the learned write rates scaled "
            "with N, and held-out evaluation at four N (the capacity curve).",
        ),
    ] = "5",
    write_steps: Annotated[int, typer.Option(min=1, help="T, gradient steps of writing.")] = 5,
    read_steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            show_default=False,
            help="K, gradient steps of the gradient read (default 5; the redraw read takes none).",
        ),
    ] = None,
    read: Annotated[
        ReadKind | None,
        typer.Option(
            show_default=False,
            help="[bold]gd[/]: descend the energy (the paper; the default but for kv and "
            "kv-conv); [bold]decoder[/]: a MAML-adapted decoder (the report); "
            "[bold]redraw[/]: the image the energy draws from what the memory recalls (kv "
            "and kv-conv, their default).",
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
    distortion: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="Query distortion KIND:N: noise:7 (default for images), occlude:16 (the "
            "paper), saltpepper:0.1, eraseblock:64 (default for binary).",
        ),
    ] = None,
    loss: Annotated[
        Loss,
        typer.Option(
            help="mse (the paper), ssim+mse = 0.5 MSE + 0.5 (1 - SSIM) (the report), or "
            "bce: binary cross-entropy, for binary images drawn through a sigmoid (kv)."
        ),
    ] = Loss("mse"),
    dynamic: Annotated[
        int | None,
        typer.Option(
            min=1,
            show_default=False,
            help="Written channels/units; sets the memory size (conv: 1,154 floats each; fc: "
            "257; rnn: 129). Default: conv 4, fc 16, rnn 64.",
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
    contrast: Annotated[
        float,
        typer.Option(
            help="Weight of the contrast term of the meta-loss: each stored pattern must have "
            "lower energy than the point where the read of its query ended, so that what "
            "was stored becomes the energy's minimum. 0: the paper's loss.",
        ),
    ] = 0.0,
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
    init: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="Start from a trained model's weights (a file or a built-in's name) instead "
            "of a fresh initialisation: a curriculum's next stage (N = 1, then 8, then 64), "
            "or a built-in fine-tuned. Its network and rules must match this run's.",
        ),
    ] = None,
    eval_every: Annotated[
        int, typer.Option(min=1, help="Held-out evaluation and model save every this many steps.")
    ] = 25,
    eval_episodes: Annotated[
        int, typer.Option(min=1, help="Held-out episodes per evaluation.")
    ] = 20,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            show_default=False,
            help="Rates and run mechanics few runs change, repeatable: " + _SETTINGS_HELP + ".",
        ),
    ] = None,
    seed: Seed = 0,
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
    from ebmm_cli.data import dataset_sources
    from ebmm_cli.device import resolve_device
    from ebmm_cli.meta import Trainer, init_distributed
    from ebmm_cli.runconfig import check_budget
    from ebmm_cli.safety import check_new_run

    if not resume or steps is not None or minutes is not None:
        check_budget(steps, minutes)  # a resumed run keeps its own budget unless given one
    if resume:
        _only_with_resume(ctx)
    if out.exists() and not out.is_dir():
        raise EbmmError(out, "is a file; --out takes a run folder")
    resolve_device(device)
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
        start = builtin.resolve(init) if init is not None else None
        check_new_run(out, start, dataset_sources(dataset, data_root))
        options = {k: v for k, v in ctx.params.items() if k not in _NOT_TRAIN_CONFIG}
        # absolute, so that the run resumes from any folder
        options.update(device=distributed or device, data_root=data_root and data_root.absolute())
        trainer = Trainer.create(_train_config(ctx, options, recipe, settings or []), out)
    _run_training(trainer, out, profile)


_NOT_TRAIN_CONFIG = ("out", "recipe", "settings", "resume", "profile")
"""`train`'s parameters that are not `runconfig.train_config` keywords."""


def _train_config(
    ctx: typer.Context, options: dict[str, Any], recipe: str | None, settings: list[str]
) -> TrainConfig:
    """The run's `TrainConfig` from `train`'s parameters (`options`, enums as their
    values), its `--set` settings, and the `recipe`'s options where neither was given."""
    from ebmm_cli import builtin
    from ebmm_cli.recipes import recipe_options
    from ebmm_cli.runconfig import parse_batch_size, parse_settings, train_config

    options = {k: v.value if isinstance(v, StrEnum) else v for k, v in options.items()}
    options["batch_size"] = parse_batch_size(options["batch_size"])
    if options["init"] is not None:
        options["init"] = str(builtin.resolve(options["init"]).resolve())
    chosen = parse_settings(settings)
    options.update(chosen)
    if recipe is not None:  # the recipe's options, where the command line is silent
        given = {k for k in options if _given(ctx, k)} | set(chosen)
        options.update({k: v for k, v in recipe_options(recipe).items() if k not in given})
    return train_config(**options)


def _run_training(trainer: Trainer, out: Path, profile: bool) -> None:
    """Run `trainer` with progress, profiling and a clean stop on Ctrl-C or SIGTERM (rank
    0; other ranks just run), then print the model's path and the last held-out loss."""
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
        raise _Terminated if signum in _STOPS else KeyboardInterrupt

    def handle(signum: int, frame: Any) -> None:
        if trainer.evaluating or (signum == signal.SIGINT and signum in asked):
            stop(signum)
        if signum == signal.SIGINT:
            print(
                "ebmm train: stopping after this step (Ctrl-C again stops at once and loses it)",
                file=sys.stderr,
            )
        asked.append(signum)

    previous = {s: signal.signal(s, handle) for s in (*_STOPS, signal.SIGINT)}

    def stop_if_asked() -> None:
        if asked:
            stop(signal.SIGTERM if set(_STOPS) & set(asked) else signal.SIGINT)

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
            "(ebmm models). Default: the built-in omniglot-32.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The memory file to create.")] = Path(
        "memory.safetensors"
    ),
    seed: Seed = 0,
    device: Device = "auto",
    force: Force = False,
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
    null: Null = False,
) -> None:
    """Write images into a new memory file (T gradient steps from the meta-learned start;
    with --refine, then Adam steps on the model's own read of distorted copies).

    The memory file is self-contained: [bold]ebmm read[/] and [bold]ebmm energy[/] need nothing
    else.
    """
    import torch

    from ebmm_cli import builtin
    from ebmm_cli.device import resolve_device
    from ebmm_cli.imageio import collect_images, load_batch
    from ebmm_cli.model import refine_memory, same_model, write_memory
    from ebmm_cli.safety import check_not_inputs, check_output_path
    from ebmm_cli.store import load_memory, load_model, save_memory

    check_output_path(out, "--out")
    dev = resolve_device(device)
    if model is None:
        print(
            f"ebmm write: note: no --model given; using the built-in {builtin.DEFAULT} "
            "(Omniglot 32x32, 64 characters per memory, the paper's protocol)",
            file=sys.stderr,
        )
    model = builtin.resolve(model or builtin.DEFAULT)
    check_not_inputs({"--out": [] if append else [out]}, {"--model": [model]})
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
    found = collect_images(images, sys.stdin, null=null)
    check_not_inputs({"--out": [out]}, {"an input": [f.path for f in found]})
    batch = load_batch(
        found, shape[0], shape[1], net.config.invert_files, skip_bad, net.config.binarize
    )
    _warn_skipped("write", batch.skipped)
    if not batch.kept:
        raise EbmmError(found[0].group, "no readable images to write")
    _note("write", batch.notes)
    trained = net.config.rules.patterns
    total = len(batch.images) + (0 if stored is None else stored.patterns)
    if trained is not None and not trained[0] <= total <= trained[1]:
        side = "more" if total > trained[1] else "fewer"
        print(
            f"ebmm write: warning: the memory would hold {total} images, {side} than the "
            f"{_range(trained)} patterns {model} was meta-trained to write; recall may be poor",
            file=sys.stderr,
        )
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
        typer.Option(
            min=1,
            max=10_000,
            show_default=False,
            help="K, steps of the gradient read (default: the model's; other reads take none).",
        ),
    ] = None,
    save_iterates: Annotated[
        bool, typer.Option(help="Also write NAME.iterates.png: a strip of x(0) ... x(K).")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Queries read at once.")] = 64,
    device: Device = "auto",
    force: Force = False,
    skip_bad: SkipBad = False,
    null: Null = False,
) -> None:
    """Retrieve stored images from distorted queries; prints each written path.

    --save-iterates writes the strips to the folder OUT-iterates beside OUT, marked as
    ebmm's: a later run over a folder holding it does not take the strips for queries."""
    import torch

    from ebmm_cli.device import resolve_device
    from ebmm_cli.imageio import (
        collect_images,
        iterates_folder,
        load_batch,
        mark_iterates,
        output_paths,
        save_image,
        to_file,
    )
    from ebmm_cli.model import retrieve
    from ebmm_cli.store import load_memory

    dev = resolve_device(device)
    strips_to = iterates_folder(out) if save_iterates else None
    for folder in (out, strips_to):
        if folder is not None:
            _hold(ctx, folder)
    net, mem = load_memory(memory)
    shape = _image_shape(net, memory)
    if steps is not None and net.config.rules.read != "gd":  # it would be ignored
        raise EbmmError("--steps", f"is the gradient read's; {memory} reads by its model's "
                        f"{net.config.rules.read} read, which takes no steps")  # fmt: skip
    found = collect_images(queries, sys.stdin, exclude=out, null=null)
    targets = output_paths(found, out, force, also=[memory])
    strips = output_paths(found, strips_to, force, also=[memory]) if strips_to else []
    if strips_to is not None:
        mark_iterates(strips_to)
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
    null: Null = False,
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

    dev = resolve_device(device)
    net, mem = load_memory(memory)
    shape = _image_shape(net, memory)
    found = collect_images(images, sys.stdin, null=null)
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
            help="A row per model that writes nothing and reads every query from its "
            "initial weights (the control, on by default): the gap to the model's own row is "
            "what its memory stores; a model whose unwritten row reads as well is a denoiser, "
            "not a memory.",
        ),
    ] = True,
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
    episodes: Annotated[int, typer.Option(min=1, max=1_000_000, help="Episodes per setting.")] = 20,
    seed: Seed = 0,
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
    force: Force = False,
) -> None:
    """Run models and baselines on the same seeded episodes and queries; one table."""
    import json

    from ebmm_cli import builtin
    from ebmm_cli import compare as harness
    from ebmm_cli.atomic import atomic_path
    from ebmm_cli.choices import dataset_defaults
    from ebmm_cli.device import resolve_device
    from ebmm_cli.distort import Distortion
    from ebmm_cli.store import load_model

    dev = resolve_device(device)
    model = [builtin.resolve(m) for m in model or []]
    outputs = {"--markdown": markdown, "--grid": grid, "--plot": plot}
    _check_compare_outputs(ctx, outputs, model, force, dataset, data_root)
    counts = _int_list(patterns, "--patterns") if patterns else (batch_size,)
    _check_refine_lr(refine_lr, refine or 0, "--refine above 0")
    methods: list[Any] = harness.methods_from(baselines.split(","))
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


def _check_compare_outputs(
    ctx: typer.Context,
    outputs: dict[str, Path | None],
    models: list[Path],
    force: bool,
    dataset: str,
    data_root: Path | None,
) -> None:
    """`compare`'s files (`--markdown`, `--grid`, `--plot`), before any work: each a
    usable path, new unless `--force`, never a model or the dataset it reads, and held
    against another process writing it."""
    from ebmm_cli.data import dataset_sources
    from ebmm_cli.safety import check_new_outputs, check_not_inputs, check_output_path

    given = {option: path for option, path in outputs.items() if path is not None}
    for option, path in given.items():
        check_output_path(path, option)
    check_not_inputs(
        {option: [path] for option, path in given.items()},
        {"--model": models, "--dataset": dataset_sources(dataset, data_root)},
    )
    check_new_outputs(given, force)
    for path in given.values():
        _hold(ctx, path)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
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
    for column in ("name", "protocol", "memory", "read", "write", "held-out: written", "unwritten"):
        table.add_column(column)
    for m in found:
        shape = "x".join(str(v) for v in m["shape"])
        floats = f", {m['memory_floats']:,} floats" if m["memory_floats"] else ""
        table.add_row(
            m["name"],
            f"{m['dataset']} {shape}{' binarized' if m['binarize'] else ''}, "
            f"{m['distortion']}, N {_range(m['patterns']) if m['patterns'] else '?'}",
            f"{m['memory']}{floats}",
            _READS.get(m["read"], m["read"]),
            _write_cost(m),
            _held_out(m.get("heldout", {})),
            _unwritten(m.get("heldout", {})),
        )
    Console(width=200).print(table)


_READS = {"gd": "energy descent", "redraw": "decoder (kv draw)", "decoder": "decoder (MAML)"}
"""What each `--read` is, in the words of `ebmm models`: only `gd` is the paper's read."""


def _write_cost(m: dict[str, Any]) -> str:
    """A built-in's write: its learned steps, any refining Adam steps, and the seconds
    one write of N patterns took where `examples/builtin_models.py controls` timed it."""
    text = f"{m['write_steps']} learned steps" + (
        f" + {m['refine']} Adam steps" if m["refine"] else ""
    )
    if "write" in m:
        text += f"; {m['write']['seconds']:.2g} s for {m['write']['patterns']}"
    return text


def _held_out(held: dict[str, Any]) -> str:
    """A built-in's held-out numbers from its own write (its refined write's, for a
    model whose write refines, then the learned steps'): Hamming error for binary
    patterns, else squared error as a fraction of the query's."""
    if not held:
        return "-"
    key = "refined_" if "refined_mse" in held else ""
    if "hamming" in held:
        text = f"Hamming {held[key + 'hamming']:.1f} (query {held['query_hamming']:.1f})"
        return text + (f"; learned steps {held['hamming']:.1f}" if key else "")
    return f"MSE {held[key + 'mse'] / held['query_mse']:.2f} of the query's"


def _unwritten(held: dict[str, Any]) -> str:
    """The same held-out queries read with nothing written, in `_held_out`'s units."""
    if "unwritten_mse" not in held:
        return "-"
    if "hamming" in held:
        return f"Hamming {held['unwritten_hamming']:.1f}"
    return f"MSE {held['unwritten_mse'] / held['query_mse']:.2f} of the query's"


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
    """Console-script entry point: SIGTERM and SIGHUP stop as cleanly as Ctrl-C, and paths whose
    names are not UTF-8 print as the bytes they are."""
    for stop in _STOPS:
        signal.signal(stop, _terminate)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(errors="surrogateescape")
    app()
