"""The Typer app: thin commands that parse options, call the library (cifarcam.training.run,
cifarcam.evaluation.loading, ...) and print.

The commands live in cli/train.py (train), cli/results.py (evaluate, misclassified, gradcam,
sanity, plot) and cli/share.py (report, compare, predict, app); this module registers them on
`app`; cli/base.py holds what they share.
Exit codes: 0 ok, 1 runtime error, 2 usage or config error, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM).
"""

from __future__ import annotations

from typing import Annotated

import typer

from cifarcam import __version__
from cifarcam.cli import results, share, train
from cifarcam.cli.base import app

__all__ = ["app", "main"]

# Registered here, in the order `cifarcam --help` lists them: the order of a run's life.
for _command in (
    train.train,
    results.evaluate,
    results.misclassified,
    results.gradcam,
    results.sanity,
    results.plot,
    share.report,
    share.compare,
    share.predict,
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
    """The `cifarcam` command. A mistyped option (an unknown name, `--epochs abc`) is one line
    and exit 2 like every other bad input, not the boxed usage message. (Typer may ship its own
    copy of click, so its exceptions are told by name.)"""
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="cifarcam", standalone_mode=False)
    except Exception as error:
        kinds = {kind.__name__ for kind in type(error).__mro__}
        context = getattr(error, "ctx", None)
        if "NoArgsIsHelpError" in kinds:  # `cifarcam` alone: the help
            error.show()  # type: ignore[attr-defined]
            code = 2
        elif "UsageError" in kinds:
            name = context.command_path if context else "cifarcam"
            typer.echo(f"Error: {error.format_message()}", err=True)  # type: ignore[attr-defined]
            typer.echo(f"Hint: see '{name} --help'", err=True)
            code = 2
        elif "Abort" in kinds:  # a Ctrl-C outside any command's own handling
            typer.echo("Error: interrupted", err=True)
            code = 130
        elif "ClickException" in kinds:
            typer.echo(f"Error: {error.format_message()}", err=True)  # type: ignore[attr-defined]
            code = getattr(error, "exit_code", 1)
        else:
            raise
    raise SystemExit(code if isinstance(code, int) else 0)
