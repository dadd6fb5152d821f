"""The Typer app: thin commands that parse options, call the library (cifarcam.pipeline,
cifarcam.trained, ...) and print.

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
    app()
