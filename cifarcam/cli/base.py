"""What every command shares: the Typer app, the console, option types, the progress bar, and the
error handling that turns failures into one 'Error:' line and the exit code of cifarcam.errors."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cifarcam.errors import EXIT_RUNTIME, CifarcamError, PeerFailed, interrupt_exit_code
from cifarcam.runs.files import written_file

app = typer.Typer(
    name="cifarcam",
    help="Train a ResNet on CIFAR-10, plot its curves, find its mistakes and explain them with Grad-CAM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# No markup: what is printed holds paths and class names, in which '[b]' or '[/]' is text.
console = Console(highlight=False, soft_wrap=True, markup=False)

RunOpt = Annotated[
    str, typer.Option("--run", help="Run name: a folder under --runs-dir.", show_default=False)
]
RunsDirOpt = Annotated[
    Path, typer.Option("--runs-dir", envvar="CIFARCAM_RUNS_DIR", help="Folder holding the runs.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
CheckpointOpt = Annotated[
    str, typer.Option("--checkpoint", help="Which checkpoint: last or best (best needs --val-split).")
]
CountOpt = Annotated[int, typer.Option("--count", help="How many misclassified test images.")]
MethodOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--method",
        help="gradcam, gradcam++, xgradcam, layercam, hirescam, scorecam, eigencam, guided-backprop "
        "or guided-gradcam; repeat for several.",
        show_default="gradcam",
    ),
]
LayerOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--layer",
        help="Module to explain: layer1..layer4 or a dotted name like layer4.1.conv2; repeat for several.",
        show_default="layer4",
    ),
]

T = TypeVar("T")


@contextmanager
def user_errors(rank: int = 0) -> Iterator[None]:
    """Turn known failures into one 'Error: ...' line and the documented exit code. Under torchrun,
    ranks other than 0 (`rank`) name themselves, and a rank stopped by another one's failure
    (PeerFailed) prints nothing: the failing rank says why."""
    try:
        yield
        return
    except typer.Exit:
        raise
    except PeerFailed as error:
        raise typer.Exit(error.exit_code) from None
    except CifarcamError as error:
        message, hint, code = error.message, error.hint, error.exit_code
    except KeyboardInterrupt as error:
        message, hint, code = "interrupted", None, interrupt_exit_code(error)
    except OSError as error:
        where = f" ({written_file(str(error.filename))})" if error.filename else ""
        message, hint, code = f"{error.strerror or error}{where}", None, EXIT_RUNTIME
    except Exception as error:
        if os.environ.get("CIFARCAM_DEBUG"):
            raise
        code = EXIT_RUNTIME
        if _lost_peer(error):
            message = f"lost contact with the other processes of this run ({type(error).__name__})"
            hint = "the process that failed first printed the reason"
        else:
            message = f"unexpected {type(error).__name__}: {error}"
            hint = "set CIFARCAM_DEBUG=1 for the traceback, and please report it"
    typer.echo(f"Error: {f'rank {rank}: ' if rank else ''}{message}", err=True)
    if hint:
        typer.echo(f"Hint: {hint}", err=True)
    raise typer.Exit(code)


def _lost_peer(error: Exception) -> bool:
    """A collective failed because another rank is gone (it exited or was stopped)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_initialized():
        return False
    return isinstance(error, distributed.DistError) or "Connection closed by peer" in str(error)


@contextmanager
def signals_handled(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """`handler` answers SIGINT and SIGTERM for the block; the previous handlers are back after it."""
    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler_before in previous.items():
            signal.signal(number, handler_before)


def progress_bar(*fields: str) -> Progress:
    """A transient bar: the task's description, the bar, done/total, `fields`, the time left."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(field) for field in fields),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def guarded(action: Callable[[], T]) -> T:
    with user_errors():
        return action()


def run_dir(runs_dir: Path, run: str) -> Any:
    """The run directory; an invalid run name is one 'Error:' line (exit 2) wherever it is called."""
    from cifarcam.runs.rundir import RunDir

    return guarded(lambda: RunDir(runs_dir, run))
