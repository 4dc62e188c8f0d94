"""The `ebmm` command line: parse options, call the library, print results.

Results go to stdout (written paths, one per line, so commands compose in pipelines);
progress bars and errors go to stderr. Every failure is one line,
`ebmm <command>: <file or option>: <problem>`, with exit code 2 for bad usage or input
and 1 for a runtime failure (`ebmm --debug ...` shows the traceback instead).
torch is imported inside the commands that need it, so `ebmm --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from ebmm_cli import __version__
from ebmm_cli.errors import EbmmError


class _Failure(typer.TyperException):
    """A failure inside a command, carried out to `main` with the command's name."""

    def __init__(self, command: str | None, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.command = command
        self.exit_code = exit_code


class _Group(TyperGroup):
    """The app's group: turns every failure into one line on stderr and an exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except EbmmError as e:
            raise _Failure(ctx.invoked_subcommand, str(e), 2) from e
        except (typer.TyperException, typer.Abort, typer.Exit, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            # The reader of our stdout went away (`ebmm distort ... | head`): stop quietly,
            # as Unix tools do, and keep Python from complaining when it flushes stdout.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except Exception as e:
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


class Kind(StrEnum):
    """Distortion kinds (the same names as `ebmm_cli.distort.KINDS`)."""

    noise = "noise"
    occlude = "occlude"
    saltpepper = "saltpepper"
    flip = "flip"


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


@app.command()
def distort(
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
            "[bold]saltpepper[/]: pixels set to 0 or 1 with probability --prob; [bold]flip[/]: "
            "--bits pixels inverted."
        ),
    ] = Kind.noise,
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
    bits: Annotated[int, typer.Option(help="Number of pixels (bits) that flip inverts.")] = 64,
    size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Resize to size x size before "
            "distorting (e.g. 28 or 32, a model's size). Default: keep each image's size.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            help="Random seed; the same seed gives byte-identical "
            "outputs. Each image's draw depends on the seed and its relative path only."
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
    images = collect_images(inputs, sys.stdin, exclude=out)
    targets = output_paths(images, out, force)
    with _progress(len(images), "distorting") as advance:
        for image, target in zip(images, targets, strict=True):
            x = load_image(image.path, size)
            try:
                distortion.check_shape(tuple(x.shape))
            except EbmmError as e:
                raise EbmmError(image.path, f"{e.subject} {e.problem}") from None
            query = distortion(x[None], generator_for(seed, image.rel.as_posix()))[0]
            save_image(query, target)
            print(target, flush=True)
            advance()


def _progress(total: int, label: str) -> Any:
    """A transient rich progress bar on stderr; yields a function that advances it.

    stdout is left alone when it is a pipe, so printed paths reach the next command.
    """
    import contextlib

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
    """Console-script entry point."""
    app()
