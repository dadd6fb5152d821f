"""Commands that present runs: report, compare, predict, export and the app."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from cifarcam.cli.base import (
    CheckpointOpt,
    DeviceOpt,
    LayerOpt,
    RunOpt,
    RunsDirOpt,
    console,
    guarded,
    run_dir,
    signals_handled,
    user_errors,
)
from cifarcam.errors import EXIT_RUNTIME, CifarcamError


def report(run: RunOpt, runs_dir: RunsDirOpt = Path("runs")) -> None:
    """Write runs/NAME/report.html: one self-contained page with everything the run has produced.

    Example: cifarcam report --run r1
    """
    from cifarcam.report.page import write_report

    path = guarded(lambda: write_report(run_dir(runs_dir, run)))
    console.print(f"Wrote {path}")


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
    from cifarcam.report.compare import compare as compare_runs

    with user_errors():
        paths = compare_runs([run_dir(runs_dir, name) for name in runs], out or runs_dir / "compare.html")
    console.print("Wrote " + ", ".join(str(p) for p in paths))


def predict(
    images: Annotated[
        list[Path], typer.Argument(help="Image files: PNG, JPEG, WebP, BMP, TIFF, GIF...", show_default=False)
    ],
    run: RunOpt,
    runs_dir: RunsDirOpt = Path("runs"),
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k", help="How many classes to list per image.", show_default="3, or all if fewer"
        ),
    ] = None,
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

    from cifarcam.evaluation import predict as prediction

    request: prediction.CamRequest | None = None
    if cam or layer or method or class_names:
        request = prediction.CamRequest(out, method or ["gradcam"], layer or ["layer4"], class_names or [])
    results = []
    with user_errors():
        predictor = prediction.Predictor.from_run(run_dir(runs_dir, run), checkpoint, device)
        k = min(3, len(predictor.classes)) if top_k is None else top_k
        prediction.check_request(predictor, k, request)
        for result in prediction.predict_files(predictor, images, k, request):
            results.append(result)
            if result.image is None:  # the file could not be read
                typer.echo(f"Error: {result.error}", err=True)
            elif not as_json:
                console.print(f"{result.path}: {result.image.describe()}")
                table = Table("class", "confidence")
                for name, probability in result.top:
                    table.add_row(Text(name), f"{probability:.1%}")
                console.print(table)
                for overlay in result.overlays:
                    console.print(f"Wrote {overlay['path']}")
    if as_json:
        typer.echo(json.dumps(prediction.predict_document(predictor, results), indent=2))
    failed = sum(result.error is not None for result in results)
    if failed:
        if not as_json:
            typer.echo(f"{failed} of {len(results)} files failed", err=True)
        raise typer.Exit(EXIT_RUNTIME)


def export(
    run: RunOpt,
    runs_dir: RunsDirOpt = Path("runs"),
    checkpoint: CheckpointOpt = "last",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for model.onnx and MODEL_CARD.md.", show_default="RUN/export"),
    ] = None,
    check_images: Annotated[
        int, typer.Option("--check-images", help="Test images the ONNX model is checked on against PyTorch.")
    ] = 1000,
    device: DeviceOpt = "auto",
) -> None:
    """Export a checkpoint as ONNX (checked with onnxruntime) and write its MODEL_CARD.md.

    Needs the optional extra: pip install "cifarcam\\[export]".

    Example: cifarcam export --run r1 --checkpoint last
    """
    from cifarcam.export.commands import export as export_run

    outcome = guarded(lambda: export_run(run_dir(runs_dir, run), checkpoint, out, check_images, device))
    agreement = outcome.agreement
    console.print(
        f"Checked against PyTorch on {agreement.images} test images: largest logit difference "
        f"{agreement.max_difference:.2g}, top-1 agreement {agreement.top1_agreement:.2%}"
    )
    console.print("Wrote " + ", ".join(str(p) for p in outcome.paths))


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

    Needs the optional extra: pip install "cifarcam\\[app]". Nothing is fetched from the internet,
    nothing is written into the run directory; Ctrl-C or SIGTERM stops it (exit 0).

    Example: cifarcam app --run r1 --port 7860
    """
    import threading

    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with user_errors():
        try:
            from cifarcam.app import web as webapp
        except ImportError as error:
            if error.name is None or not error.name.startswith("gradio"):
                raise
            raise CifarcamError(
                "the app needs Gradio, which is not installed", hint='pip install "cifarcam[app]"'
            ) from None
        from cifarcam.app.explorer import RunExplorer, check_port_free

        check_port_free(host, port)
        demo = webapp.build(RunExplorer(run_dir(runs_dir, run), checkpoint, device))
        url = webapp.launch(demo, host, port)
    stop = threading.Event()
    with signals_handled(lambda *_: stop.set()):
        console.print(f"Serving run '{run}' at {url} (Ctrl-C to stop)")
        while not stop.wait(0.5):
            pass
        demo.close(verbose=False)
    console.print("Stopped")
