"""The train command: options, resume, progress display and the SIGINT/SIGTERM handling."""

from __future__ import annotations

import functools
import inspect
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, get_args

import typer

from cifarcam.cli.base import RunsDirOpt, console, progress_bar, run_dir, signals_handled, user_errors
from cifarcam.config import (
    SIZED_TO_RUN,
    TrainConfig,
    build_config,
    config_to_yaml,
    merge_overrides,
    preset_values,
    read_config_file,
)
from cifarcam.errors import StoppedAtOnce, TrainingInterrupted, UsageError, interrupt_exit_code

# What --help shows as the default of the options whose default, None, says nothing.
_DEFAULTS_SHOWN = {
    "data_dir": "$CIFARCAM_DATA_DIR or ~/.cache/cifarcam",
    "subset": "all",
    "epoch_images": "all",
    "batch_size": "sized to the run",
    "lr": "sized to the run",
}


def _config_options() -> list[inspect.Parameter]:
    """One option per scalar field of TrainConfig, named after it, with its description as help
    and its default shown; left out, it is None and the preset, config file or default decides."""
    params = []
    for name, field in TrainConfig.model_fields.items():
        if name in ("augment", "albumentations"):  # nested settings: config files only
            continue
        dashed, annotation = name.replace("_", "-"), field.annotation
        kind = next((t for t in (bool, int, float) if t is annotation or t in get_args(annotation)), str)
        if kind is bool:
            flag, shown = f"--{dashed}/--no-{dashed}", dashed if field.default else f"no-{dashed}"
        else:
            flag, shown = f"--{dashed}", str(field.default)
        option = typer.Option(flag, help=field.description, show_default=_DEFAULTS_SHOWN.get(name, shown))
        typed: Any = Annotated[kind | None, option]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=typed))
    return params


def train(
    run: Annotated[
        str | None, typer.Option("--run", help="Run name: a folder under --runs-dir.", show_default=False)
    ] = None,
    runs_dir: RunsDirOpt = Path("runs"),
    preset: Annotated[
        list[str] | None,
        typer.Option(
            help="Start from a named preset: quick (CPU-sized) or seed-albumentations (repeatable: "
            "later ones override earlier ones).",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        list[Path] | None,
        typer.Option(
            "--config",
            help="JSON or YAML (.yaml, .yml) config file; it overrides --preset, command-line "
            "options override it (repeatable: later files override earlier ones).",
        ),
    ] = None,
    nproc_per_node: Annotated[
        int | None,
        typer.Option(
            "--nproc-per-node",
            help="Train in N processes on this machine (one per GPU, or gloo on the CPU), started "
            "through PyTorch's launcher like torchrun; several machines: torchrun (docs/distributed.md).",
            show_default="1",
        ),
    ] = None,
    print_config: Annotated[
        bool,
        typer.Option(
            "--print-config",
            help="Print the resolved configuration (presets, config files, then options) as YAML "
            "and exit; --run is not needed.",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier training of this run.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted run from its last saved state, with its own config (other "
            "options may be given if they equal it).",
        ),
    ] = False,
    **overrides: Any,
) -> None:
    """Train a model and write config, metrics and checkpoints into the run directory.

    Example: cifarcam train --run r1 --data ~/cifar10-folder --subset 2000 --width 16 --epochs 2
    """
    from cifarcam.training import run as pipeline
    from cifarcam.training.distributed import process_group

    with user_errors():
        if print_config:
            typer.echo(config_to_yaml(_resolve(preset, config, overrides)[0]), nl=False)
            return
        if run is None:  # optional for --print-config only; said as the other commands say it
            raise UsageError("Missing option '--run'.", hint="see 'cifarcam train --help'")
        if nproc_per_node is not None:
            if nproc_per_node < 1:
                raise UsageError(f"--nproc-per-node must be at least 1 (got {nproc_per_node})")
            if "WORLD_SIZE" in os.environ:
                raise UsageError("--nproc-per-node starts the processes itself; under torchrun leave it out")
    if nproc_per_node is not None and nproc_per_node > 1:
        from cifarcam.training.distributed import launch

        raise typer.Exit(launch(nproc_per_node, _without_nproc(sys.argv[1:])))
    command = shlex.join(["cifarcam", *sys.argv[1:]])
    with user_errors(), process_group() as group, user_errors(group.rank):
        rundir = run_dir(runs_dir, run)
        try:
            if resume:
                if overwrite:
                    raise UsageError("--resume continues a run and --overwrite replaces it; give one")
                if preset or config or any(value is not None for value in overrides.values()):
                    _check_same_as_run(rundir, *_resolve(preset, config, overrides))
                start = functools.partial(pipeline.resume, rundir)
            else:
                resolved = _resolve(preset, config, overrides)[0]
                start = functools.partial(pipeline.train, resolved, rundir, overwrite)
            with _stop_on_signals(group) as stop, _training_progress(group.is_main) as callbacks:
                records = start(command, callbacks, stop, group)
        except KeyboardInterrupt as stopped:  # StoppedAtOnce (a second signal) or Python's own
            code = interrupt_exit_code(stopped)
            stopped_at_once = f"stopped at once by a second {signal.Signals(code - 128).name}"
            if not rundir.state_path.exists():  # stopped before a first epoch was saved
                raise TrainingInterrupted(f"{stopped_at_once}; no epoch was saved", None, code) from None
            raise TrainingInterrupted(
                f"{stopped_at_once}; the last saved training state is kept",
                f"resume with 'cifarcam train --run {run} --resume'",
                code,
            ) from None
        if group.is_main:
            last = records[-1]
            console.print(
                f"Finished: test accuracy {last['test_acc']:.2%}, test loss {last['test_loss']:.4f}. "
                f"Run directory: {rundir.path}"
            )


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line each launched process runs: this one less --nproc-per-node."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            kept.append(arg)
    return kept


def _resolve(
    presets: list[str] | None, files: list[Path] | None, overrides: dict[str, Any]
) -> tuple[TrainConfig, set[str]]:
    """The configuration from presets, then config files, each over the ones before, then the
    options given; and the names of the fields they set."""
    layers = [preset_values(name) for name in presets or []]
    layers += [read_config_file(path) for path in files or []]
    base: dict[str, Any] = {}
    for layer in layers:
        base = merge_overrides(base, layer, given_none=True)
    merged = merge_overrides(base, overrides)
    return build_config(merged), set(merged)


def _check_same_as_run(rundir: Any, requested: TrainConfig, given: set[str]) -> None:
    """`--resume` with the options that started the run (the shell's up-arrow) is accepted; an
    option whose value differs from the run's config is refused, naming both values."""
    from cifarcam.evaluation.loading import read_config

    saved = read_config(rundir).model_dump(mode="json")
    wanted = requested.model_dump(mode="json")
    differing = [
        f"{_as_option(name, wanted[name])} (the run has {_as_option(name, saved[name])})"
        for name in TrainConfig.model_fields
        if name in given
        and wanted[name] != saved[name]
        and not (name in SIZED_TO_RUN and wanted[name] is None)  # sized when it was trained
    ]
    if differing:
        raise UsageError(
            "--resume continues with the run's own config; these differ from it: " + "; ".join(differing),
            hint="leave them out to resume, or train a new run with them",
        )


def _as_option(name: str, value: Any) -> str:
    """A config value as the option that sets it: --epochs 5, --no-nesterov, --augment {...}."""
    dashed = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{'no-' * (not value)}{dashed}"
    return f"--{dashed} {value if isinstance(value, int | float) else json.dumps(value)}"


_signature = inspect.signature(train, eval_str=True)
train.__signature__ = _signature.replace(  # type: ignore[attr-defined]
    parameters=[p for p in _signature.parameters.values() if p.kind != p.VAR_KEYWORD] + _config_options()
)


# Under torchrun a Ctrl-C reaches each worker twice: from the terminal and forwarded by torchrun.
_SAME_SIGNAL_S = 2.0


@contextmanager
def _stop_on_signals(group: Any = None) -> Iterator[Any]:
    """First SIGINT/SIGTERM: finish the step, save, exit 130/143. A second one: stop at once."""
    from cifarcam.training.distributed import SINGLE
    from cifarcam.training.run import StopSignal

    group = group or SINGLE
    stop = StopSignal()
    first_at = [0.0]
    owner = os.getpid()

    def handler(signum: int, _frame: object) -> None:
        if os.getpid() != owner:  # a forked DataLoader worker: its parent decides when to stop
            return
        if stop.signal is not None:
            if group.distributed and time.monotonic() - first_at[0] < _SAME_SIGNAL_S:
                return
            raise StoppedAtOnce(signum)
        stop.signal, first_at[0] = signum, time.monotonic()
        if group.is_main:
            again = "press Ctrl-C again" if signum == signal.SIGINT else "send SIGTERM again"
            typer.echo(f"Stopping after this step and saving ({again} to stop at once)...", err=True)

    with signals_handled(handler):
        yield stop


@contextmanager
def _training_progress(shown: bool = True) -> Iterator[Any]:
    from cifarcam.devices import cpu_supports_bf16
    from cifarcam.training.run import TrainCallbacks

    if not shown:  # another rank of a torchrun training reports
        yield TrainCallbacks()
        return

    progress = progress_bar("loss {task.fields[loss]}")
    task = progress.add_task("epoch 1", total=None, loss="-")
    epoch = {"n": 1, "total": 0}

    def on_start(meta: dict[str, Any]) -> None:
        epoch["n"], epoch["total"] = meta["start_epoch"], meta["epochs"]
        resumed = ""
        if epoch["n"] > epoch["total"]:
            resumed = f", all {epoch['total']} epochs trained: writing the last epoch's files again"
        elif epoch["n"] > 1:
            resumed = f", resuming at epoch {epoch['n']}"
        per_epoch = (
            f" ({meta['epoch_images']} per epoch)" if meta["epoch_images"] != meta["train_images"] else ""
        )
        console.print(
            f"Training on {meta['device']} ({meta['precision']}), {meta['train_images']} training images"
            f"{per_epoch}, {meta['test_images']} test images, data: {meta['data']}{resumed}"
        )
        if meta.get("sized_to_run") and epoch["n"] == 1:
            console.print(
                f"Batch size {meta['batch_size']} and peak lr {meta['lr']:g} for a run of "
                f"{meta['steps']} steps (set --batch-size and --lr to choose them)"
            )
        if not meta["tensorboard"] and epoch["n"] <= epoch["total"]:
            console.print(
                "TensorBoard logging is off: the tensorboard package is not installed "
                '(pip install "cifarcam[tensorboard]")'
            )
        if meta["device"] == "cpu" and meta["precision"] == "bfloat16" and not cpu_supports_bf16():
            console.print(
                "Note: this CPU has no native bf16 (AVX512-bf16 or AMX), so bf16 is emulated and "
                "slower than fp32; --precision auto trains in fp32 here"
            )

    def on_step(step: int, steps: int, loss: float | None) -> None:
        progress.update(task, completed=step, total=steps, description=f"epoch {epoch['n']}/{epoch['total']}")
        if loss is not None:
            progress.update(task, loss=f"{loss:.4f}")

    def on_epoch(record: dict[str, float]) -> None:
        line = (
            f"epoch {int(record['epoch']):>3}/{epoch['total']}  lr {record['lr']:.4f}  "
            f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.2%}  "
            f"test loss {record['test_loss']:.4f} acc {record['test_acc']:.2%}"
        )
        if "val_acc" in record:
            line += f"  val acc {record['val_acc']:.2%}"
        progress.console.print(line + f"  ({record['epoch_time_s']:.1f}s)")
        epoch["n"] = int(record["epoch"]) + 1
        progress.reset(task, total=None, loss="-")

    with progress:
        yield TrainCallbacks(on_start=on_start, on_step=on_step, on_epoch=on_epoch)
