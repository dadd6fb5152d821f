"""The Typer app: thin commands that parse options, call the library and print. This module
registers the commands of train.py, results.py and share.py; base.py holds what they share."""

from __future__ import annotations

from typing import Annotated

import typer

from cifarcam import __version__
from cifarcam.cli import results, share, train
from cifarcam.cli.base import app
from cifarcam.errors import EXIT_RUNTIME, EXIT_SIGINT, EXIT_USAGE

__all__ = ["app", "main"]

# Registered here, in the order `cifarcam --help` lists them: the order of a run's life.
for _command in (
    train.train,
    results.evaluate,
    results.misclassified,
    results.label_issues,
    results.gradcam,
    results.sanity,
    results.plot,
    share.report,
    share.compare,
    share.predict,
    share.export,
):
    app.command()(_command)
app.command(name="app")(share.app_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cifarcam {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """cifarcam: CIFAR-10 ResNet training, curves, mistakes and Grad-CAM over one run directory."""


def main() -> None:
    """The `cifarcam` command: a mistyped option (`--epochs abc`) is one 'Error:' line and exit 2,
    not click's boxed usage message. Typer may ship its own click, so exceptions are told by name."""
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="cifarcam", standalone_mode=False)
    except Exception as error:
        kinds = {kind.__name__ for kind in type(error).__mro__}
        if "NoArgsIsHelpError" in kinds:  # `cifarcam` alone: the help
            error.show()  # type: ignore[attr-defined]
            code = EXIT_USAGE
        elif "Abort" in kinds:  # a Ctrl-C outside any command's own handling
            typer.echo("Error: interrupted", err=True)
            code = EXIT_SIGINT
        elif "ClickException" in kinds:  # a UsageError among them: exit 2 and a hint
            typer.echo(f"Error: {error.format_message()}", err=True)  # type: ignore[attr-defined]
            if "UsageError" in kinds:
                context = getattr(error, "ctx", None)
                typer.echo(f"Hint: see '{context.command_path if context else 'cifarcam'} --help'", err=True)
            code = getattr(error, "exit_code", EXIT_RUNTIME)
        else:
            raise
    raise SystemExit(code if isinstance(code, int) else 0)
