"""The Typer app: thin commands that parse options, call cifarcam.pipeline and print.

Exit codes: 0 ok, 1 runtime error, 2 usage or config error, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from cifarcam import __version__
from cifarcam.errors import (
    EXIT_RUNTIME,
    EXIT_SIGINT,
    CifarcamError,
    PeerFailed,
    TrainingInterrupted,
    UsageError,
)

app = typer.Typer(
    name="cifarcam",
    help="Train a ResNet on CIFAR-10, plot its curves, find its mistakes and explain them with Grad-CAM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(highlight=False, soft_wrap=True)

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

T = TypeVar("T")


def fail(message: str, hint: str | None, code: int) -> typer.Exit:
    typer.echo(f"Error: {message}", err=True)
    if hint:
        typer.echo(f"Hint: {hint}", err=True)
    return typer.Exit(code)


@contextmanager
def user_errors(rank: int = 0) -> Iterator[None]:
    """Turn known failures into one 'Error: ...' line and the documented exit code.

    `rank`: this process's rank under torchrun; other ranks than 0 name themselves. A rank that
    stops because another one failed (PeerFailed) prints nothing: the failing rank says why.
    """
    who = f"rank {rank}: " if rank else ""
    try:
        yield
    except typer.Exit:
        raise
    except PeerFailed as error:
        raise typer.Exit(error.exit_code) from None
    except CifarcamError as error:
        raise fail(who + error.message, error.hint, error.exit_code) from None
    except KeyboardInterrupt:
        raise fail(who + "interrupted", None, EXIT_SIGINT) from None
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        raise fail(f"{who}{error.strerror or error}{where}", None, EXIT_RUNTIME) from None
    except Exception as error:
        if os.environ.get("CIFARCAM_DEBUG"):
            raise
        if _lost_peer(error):
            raise fail(
                f"{who}lost contact with the other processes of this run ({type(error).__name__})",
                "the process that failed first printed the reason",
                EXIT_RUNTIME,
            ) from None
        raise fail(
            f"{who}unexpected {type(error).__name__}: {error}",
            "set CIFARCAM_DEBUG=1 for the traceback, and please report it",
            EXIT_RUNTIME,
        ) from None


def _lost_peer(error: Exception) -> bool:
    """A collective failed because another rank is gone (it exited or was stopped)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_initialized():
        return False
    return isinstance(error, distributed.DistError) or "Connection closed by peer" in str(error)


def guarded(action: Callable[[], T]) -> T:
    with user_errors():
        return action()


def _rundir(runs_dir: Path, run: str) -> Any:
    from cifarcam.rundir import RunDir

    return RunDir(runs_dir, run)


@app.command()
def train(
    run: RunOpt,
    runs_dir: RunsDirOpt = Path("runs"),
    data: Annotated[
        str | None,
        typer.Option(
            help="'cifar10' (torchvision download) or PATH of an image-folder tree "
            "(PATH/train/<class>/*, PATH/test/<class>/*).",
            show_default="cifar10",
        ),
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(
            help="Where CIFAR-10 is downloaded and decoded images are cached.",
            show_default="$CIFARCAM_DATA_DIR or ~/.cache/cifarcam",
        ),
    ] = None,
    model: Annotated[str | None, typer.Option(help="resnet18 or resnet34.", show_default="resnet18")] = None,
    width: Annotated[
        int | None,
        typer.Option(
            help="Channels of layer1 (64 = standard ResNet; 16 trains ~10x faster).", show_default="64"
        ),
    ] = None,
    norm: Annotated[
        str | None,
        typer.Option(
            help="batch (BatchNorm) or group (GroupNorm: no statistics across images).", show_default="batch"
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.", show_default="20")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.", show_default="512")] = None,
    lr: Annotated[
        float | None, typer.Option(help="Peak learning rate of the one-cycle schedule.", show_default="0.4")
    ] = None,
    subset: Annotated[
        int | None,
        typer.Option(
            help="Train on a class-balanced, seeded subset of N training images.", show_default="all"
        ),
    ] = None,
    val_split: Annotated[
        int | None,
        typer.Option(
            help="Hold out N class-balanced training images for validation; keeps best.safetensors.",
            show_default="0",
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.", show_default="auto")] = None,
    precision: Annotated[
        str | None,
        typer.Option(help="auto (bf16 autocast where supported), bf16 or fp32.", show_default="auto"),
    ] = None,
    sync_bn: Annotated[
        bool | None,
        typer.Option(
            "--sync-bn/--no-sync-bn",
            help="Under torchrun on CUDA: BatchNorm statistics over the whole global batch.",
            show_default="no-sync-bn",
        ),
    ] = None,
    label_smoothing: Annotated[
        float | None,
        typer.Option(help="Label smoothing of the training loss (0 = off).", show_default="0.1"),
    ] = None,
    compile_model: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the training step's model (CUDA; costs a compile at the start).",
            show_default="no-compile",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Random seed (init, data order, augmentation, subsets).", show_default="0"),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Start from a named preset: quick (CPU-sized) or seed-albumentations.", show_default=False
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="JSON config file; it overrides --preset, command-line options override it."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier training of this run.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue an interrupted run from its last saved state, with its own config."
        ),
    ] = False,
) -> None:
    """Train a model and write config, metrics and checkpoints into the run directory.

    Example: cifarcam train --run r1 --data ~/cifar10-folder --subset 2000 --width 16 --epochs 2
    """
    from cifarcam import pipeline
    from cifarcam.config import build_config, merge_overrides, preset_values, read_config_file

    overrides = {
        "data": data,
        "data_dir": data_dir,
        "model": model,
        "width": width,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "subset": subset,
        "val_split": val_split,
        "device": device,
        "precision": precision,
        "seed": seed,
        "norm": norm,
        "sync_bn": sync_bn,
        "compile": compile_model,
        "label_smoothing": label_smoothing,
    }

    def action(group: Any) -> None:
        rundir = _rundir(runs_dir, run)
        try:
            train_or_resume(rundir, group)
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                "stopped at once by a second interrupt; the last saved epoch, if any, is kept",
                hint=f"resume with 'cifarcam train --run {run} --resume'",
                exit_code=EXIT_SIGINT,
            ) from None

    def train_or_resume(rundir: Any, group: Any) -> None:
        command = shlex.join(["cifarcam", *sys.argv[1:]])
        if resume:
            given = [f"--{k.replace('_', '-')}" for k, v in overrides.items() if v is not None]
            given += ["--preset"] * bool(preset) + ["--config"] * bool(config) + ["--overwrite"] * overwrite
            if given:
                raise UsageError(
                    f"--resume continues with the run's own config.json; leave out {', '.join(given)}"
                )
            with _stop_on_signals(group) as stop, _training_progress(group.is_main) as callbacks:
                records = pipeline.resume(rundir, command, callbacks, stop, group)
        else:
            base = merge_overrides(
                preset_values(preset) if preset else {}, read_config_file(config) if config else {}
            )
            resolved = build_config(merge_overrides(base, overrides))
            with _stop_on_signals(group) as stop, _training_progress(group.is_main) as callbacks:
                records = pipeline.train(resolved, rundir, overwrite, command, callbacks, stop, group)
        if not group.is_main:
            return
        last = records[-1]
        console.print(
            f"Finished: test accuracy {last['test_acc']:.2%}, test loss {last['test_loss']:.4f}. "
            f"Run directory: {rundir.path}"
        )

    from cifarcam.distributed import process_group

    with user_errors(), process_group() as group, user_errors(group.rank):
        action(group)


# Under torchrun a Ctrl-C reaches each worker twice: from the terminal and forwarded by torchrun.
_SAME_SIGNAL_S = 2.0


@contextmanager
def _stop_on_signals(group: Any = None) -> Iterator[Any]:
    """First SIGINT/SIGTERM: finish the step, save, exit 130/143. A second one: stop at once."""
    from cifarcam.distributed import SINGLE
    from cifarcam.pipeline import StopSignal

    group = group or SINGLE
    stop = StopSignal()
    first_at = [0.0]

    def handler(signum: int, _frame: object) -> None:
        if stop.signal is not None:
            if group.distributed and time.monotonic() - first_at[0] < _SAME_SIGNAL_S:
                return
            raise KeyboardInterrupt
        stop.signal, first_at[0] = signum, time.monotonic()
        if group.is_main:
            typer.echo(
                "Stopping after this step and saving (press Ctrl-C again to stop at once)...", err=True
            )

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _training_progress(shown: bool = True) -> Iterator[Any]:
    from cifarcam.pipeline import TrainCallbacks

    if not shown:  # another rank of a torchrun training reports
        yield TrainCallbacks()
        return

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    task = progress.add_task("epoch 1", total=None, loss="-")
    epoch = {"n": 1, "total": 0}

    def on_start(meta: dict[str, Any]) -> None:
        epoch["n"], epoch["total"] = meta["start_epoch"], meta["epochs"]
        resumed = f", resuming at epoch {epoch['n']}" if epoch["n"] > 1 else ""
        console.print(
            f"Training on {meta['device']} ({meta['precision']}), {meta['train_images']} training images, "
            f"{meta['test_images']} test images, data: {meta['data']}{resumed}"
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


@app.command()
def evaluate(
    run: RunOpt,
    runs_dir: RunsDirOpt = Path("runs"),
    checkpoint: CheckpointOpt = "last",
    device: DeviceOpt = "auto",
    tta: Annotated[
        bool,
        typer.Option("--tta/--no-tta", help="Also score with 6-view test-time augmentation (flip, shifts)."),
    ] = True,
) -> None:
    """Score a checkpoint on the test set and write evaluation.json.

    Example: cifarcam evaluate --run r1 --checkpoint last
    """
    from cifarcam import pipeline

    result = guarded(lambda: pipeline.evaluate(_rundir(runs_dir, run), checkpoint, device, tta))
    console.print(
        f"Test accuracy {result['accuracy']:.2%}, mean loss {result['loss']:.4f} "
        f"({result['num_images']} images, {checkpoint} checkpoint, epoch {result['epoch']})"
    )
    if tta:
        console.print(
            f"With test-time augmentation: {result['accuracy_tta']:.2%}, loss {result['loss_tta']:.4f}"
        )
    table = Table("class", "accuracy")
    for name, accuracy in result["per_class_accuracy"].items():
        table.add_row(name, f"{accuracy:.2%}")
    console.print(table)


@app.command()
def misclassified(
    run: RunOpt,
    runs_dir: RunsDirOpt = Path("runs"),
    count: CountOpt = 10,
    checkpoint: CheckpointOpt = "last",
    device: DeviceOpt = "auto",
) -> None:
    """Find the most confident mistakes on the test set; write misclassified.json and .png.

    Example: cifarcam misclassified --run r1 --count 10
    """
    from cifarcam import pipeline

    rundir = _rundir(runs_dir, run)
    entries = guarded(lambda: pipeline.misclassified(rundir, count, checkpoint, device))
    table = Table("test index", "true", "predicted", "confidence")
    for entry in entries:
        table.add_row(str(entry["index"]), entry["true"], entry["pred"], f"{entry['confidence']:.1%}")
    console.print(table)
    console.print(f"Wrote {rundir.misclassified_json} and {rundir.misclassified_png}")


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


@contextmanager
def _image_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    progress = Progress(
        TextColumn(f"[bold]{description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    task = progress.add_task(description, total=None)

    def on_progress(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    with progress:
        yield on_progress


@app.command()
def gradcam(
    run: RunOpt,
    runs_dir: RunsDirOpt = Path("runs"),
    method: MethodOpt = None,
    layer: LayerOpt = None,
    target: Annotated[
        str, typer.Option(help="Class to explain: pred, true, both, or a class name or index.")
    ] = "both",
    count: CountOpt = 10,
    all_images: Annotated[
        bool,
        typer.Option("--all", help="Explain the whole test set (maps to safetensors); gallery of --count."),
    ] = False,
    metrics: Annotated[
        bool,
        typer.Option("--metrics", help="Faithfulness: deletion/insertion AUC, average drop/increase."),
    ] = False,
    steps: Annotated[int, typer.Option(help="Deletion/insertion steps for --metrics.")] = 16,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 256,
    precision: Annotated[
        str,
        typer.Option(
            help="fp32 (exact maps, the default), or bf16/auto: forward passes under bfloat16 "
            "autocast, several times faster where supported, maps less exact: measured, most move "
            "by under 0.02 at layer4 but one in ten by over 0.1 at layer3 (see README)."
        ),
    ] = "fp32",
    checkpoint: CheckpointOpt = "last",
    device: DeviceOpt = "auto",
) -> None:
    """CAM maps for the most confident mistakes (or the whole test set) and their gallery.

    Example: cifarcam gradcam --run r1 --method gradcam --method scorecam --layer layer3 --layer layer4
    """
    from cifarcam import explain

    rundir = _rundir(runs_dir, run)
    with _image_progress("explaining") as on_progress:
        outcome = guarded(
            lambda: explain.gradcam(
                rundir,
                method,
                layer,
                target,
                count,
                all_images,
                metrics,
                checkpoint,
                device,
                batch_size,
                steps,
                on_progress,
                precision,
            )
        )
    if outcome.metrics:
        table = Table(
            "method", "layer", "deletion AUC (lower)", "insertion AUC (higher)", "avg drop %", "increase %"
        )
        for row in outcome.metrics:
            table.add_row(
                row["method"],
                row["layer"],
                f"{row['deletion_auc']:.4f}",
                f"{row['insertion_auc']:.4f}",
                f"{row['average_drop']:.2f}",
                f"{row['increase_in_confidence']:.2f}",
            )
        console.print(table)
    console.print("Wrote " + ", ".join(str(p) for p in outcome.paths))


@app.command()
def sanity(
    run: RunOpt,
    runs_dir: RunsDirOpt = Path("runs"),
    method: Annotated[str, typer.Option(help="CAM method (see gradcam --help).")] = "gradcam",
    layer: Annotated[str, typer.Option(help="Module to explain.")] = "layer4",
    count: Annotated[int, typer.Option(help="Test images (evenly spaced over the test set).")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the re-initialisation.")] = 0,
    checkpoint: CheckpointOpt = "last",
    device: DeviceOpt = "auto",
) -> None:
    """Cascading randomisation sanity check (Adebayo et al. 2018) of a CAM method.

    Re-initialises the model block by block from the head down and reports how similar the maps
    stay (Spearman, SSIM). A trustworthy method decorrelates as randomisation goes deeper.

    Example: cifarcam sanity --run r1 --method gradcam --layer layer4
    """
    from cifarcam import explain

    rundir = _rundir(runs_dir, run)
    outcome = guarded(lambda: explain.sanity(rundir, method, layer, count, checkpoint, device, seed))
    table = Table("randomised down to", "Spearman", "SSIM")
    for row in outcome.rows:
        table.add_row(
            str(row["randomized"]),
            f"{row['spearman']:.3f} ± {row['spearman_std']:.3f}",
            f"{row['ssim']:.3f} ± {row['ssim_std']:.3f}",
        )
    console.print(table)
    console.print("Wrote " + ", ".join(str(p) for p in outcome.paths))


@app.command()
def plot(run: RunOpt, runs_dir: RunsDirOpt = Path("runs")) -> None:
    """Plot train and test loss and accuracy per epoch into plots/.

    Example: cifarcam plot --run r1
    """
    from cifarcam import pipeline

    paths = guarded(lambda: pipeline.plot(_rundir(runs_dir, run)))
    console.print("Wrote " + ", ".join(str(p) for p in paths))


@app.command()
def report(run: RunOpt, runs_dir: RunsDirOpt = Path("runs")) -> None:
    """Write runs/NAME/report.html: one self-contained page with everything the run has produced.

    Example: cifarcam report --run r1
    """
    from cifarcam.report import write_report

    path = guarded(lambda: write_report(_rundir(runs_dir, run)))
    console.print(f"Wrote {path}")


@app.command()
def compare(
    runs: Annotated[list[str], typer.Argument(help="Two or more run names.", show_default=False)],
    runs_dir: RunsDirOpt = Path("runs"),
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="The HTML page to write; the PNG goes next to it.",
            show_default="RUNS_DIR/compare.html",
        ),
    ] = None,
) -> None:
    """Compare runs: curves on shared axes (PNG) and a page of final metrics and config differences.

    Example: cifarcam compare r1 r2 --out comparison.html
    """
    from cifarcam.compare import compare as compare_runs

    paths = guarded(
        lambda: compare_runs([_rundir(runs_dir, name) for name in runs], out or runs_dir / "compare.html")
    )
    console.print("Wrote " + ", ".join(str(p) for p in paths))


@app.command()
def predict(
    images: Annotated[
        list[Path], typer.Argument(help="Image files: PNG, JPEG, WebP, BMP, TIFF, GIF...", show_default=False)
    ],
    run: RunOpt,
    runs_dir: RunsDirOpt = Path("runs"),
    top_k: Annotated[int, typer.Option("--top-k", help="How many classes to list per image.")] = 3,
    cam: Annotated[
        bool,
        typer.Option("--cam", help="Write CAM overlay PNGs (predicted class, and each --class) to --out."),
    ] = False,
    layer: LayerOpt = None,
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help="gradcam, gradcam++, xgradcam, layercam, hirescam, scorecam or eigencam; repeatable.",
            show_default="gradcam",
        ),
    ] = None,
    class_names: Annotated[
        list[str] | None,
        typer.Option(
            "--class", help="Also draw the map of this class; repeat for several.", show_default=False
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the overlays (never inside the run directory).")
    ] = Path("predictions"),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document instead of tables.")
    ] = False,
    checkpoint: CheckpointOpt = "last",
    device: DeviceOpt = "auto",
) -> None:
    """Classify your own images (any size and mode) with a run's model; optionally draw CAM overlays.

    Each image is centre-cropped to a square and resized to 32x32 (the table shows how). A file
    that cannot be read is reported on one line and the others are still processed; the exit
    code is then 1.

    Example: cifarcam predict --run r1 cat.jpg dog.png --top-k 3 --cam --layer layer3
    """
    import json

    from cifarcam.predict import CamRequest, Predictor, check_request, predict_document, predict_files

    wants_cam = cam or bool(layer or method or class_names)
    request = (
        CamRequest(out, method or ["gradcam"], layer or ["layer4"], class_names or []) if wants_cam else None
    )

    def prepare() -> Any:
        rundir = _rundir(runs_dir, run)
        predictor = Predictor.from_run(rundir, checkpoint, device)
        check_request(predictor, rundir, top_k, request)
        return predictor

    predictor = guarded(prepare)
    results = []
    with user_errors():
        for result in predict_files(predictor, images, top_k, request):
            results.append(result)
            if result.error is not None:
                typer.echo(f"Error: {result.error}", err=True)
            elif not as_json:
                _print_prediction(result)
    if as_json:
        typer.echo(json.dumps(predict_document(predictor, results), indent=2))
    failed = sum(result.error is not None for result in results)
    if failed:
        if not as_json:
            typer.echo(f"{failed} of {len(results)} files could not be read", err=True)
        raise typer.Exit(EXIT_RUNTIME)


def _print_prediction(result: Any) -> None:
    console.print(f"{result.path}: {result.image.describe()}", markup=False)
    table = Table("class", "confidence")
    for name, probability in result.top:
        table.add_row(Text(name), f"{probability:.1%}")
    console.print(table)
    for overlay in result.overlays:
        console.print(f"Wrote {overlay.path}", markup=False)


@app.command(name="app")
def app_command(
    run: RunOpt,
    runs_dir: RunsDirOpt = Path("runs"),
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (loopback: only this machine can connect).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 7860,
    checkpoint: CheckpointOpt = "last",
    device: DeviceOpt = "auto",
) -> None:
    """A local web app over a run: your images or test images, top-k, CAM controls, mistakes, curves.

    Needs the optional extra: pip install "cifarcam[app]". Nothing is fetched from the internet,
    nothing is written into the run directory; Ctrl-C or SIGTERM stops it (exit 0).

    Example: cifarcam app --run r1 --port 7860
    """
    import threading

    from cifarcam.errors import CifarcamError

    def start() -> tuple[Any, str]:
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from cifarcam import app as webapp
        except ImportError as error:
            if error.name is None or not error.name.startswith("gradio"):
                raise
            raise CifarcamError(
                "the app needs Gradio, which is not installed", hint='pip install "cifarcam[app]"'
            ) from None
        from cifarcam.explorer import RunExplorer, check_port_free

        check_port_free(host, port)
        explorer = RunExplorer(_rundir(runs_dir, run), checkpoint, device)
        demo = webapp.build(explorer)
        return demo, webapp.launch(demo, host, port)

    demo, url = guarded(start)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        console.print(f"Serving run '{run}' at {url} (Ctrl-C to stop)")
        while not stop.wait(0.5):
            pass
        demo.close(verbose=False)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    console.print("Stopped")


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
