"""Commands that read a trained run: evaluate, misclassified, label-issues, gradcam, sanity and
plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cifarcam.cli.base import (
    CheckpointOpt,
    CountOpt,
    DeviceOpt,
    LayerOpt,
    MethodOpt,
    RunOpt,
    RunsDirOpt,
    console,
    guarded,
    progress_bar,
    run_dir,
    user_errors,
)


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
    from cifarcam.evaluation import commands as evaluation

    result = guarded(lambda: evaluation.evaluate(run_dir(runs_dir, run), checkpoint, device, tta))
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
        table.add_row(name, "- (no test images)" if accuracy is None else f"{accuracy:.2%}")
    console.print(table)


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
    from cifarcam.evaluation import commands as evaluation

    rundir = run_dir(runs_dir, run)
    mistakes = guarded(lambda: evaluation.misclassified(rundir, count, checkpoint, device))
    table = Table("test index", "true", "predicted", "confidence", "label")
    for entry in mistakes.entries:
        mark = "likely wrong" if entry["likely_label_issue"] else ""
        table.add_row(str(entry["index"]), entry["true"], entry["pred"], f"{entry['confidence']:.1%}", mark)
    console.print(table)
    if mistakes.unmarked_because:
        console.print(f"Likely label errors are not marked: {mistakes.unmarked_because}")
    console.print(f"Wrote {rundir.misclassified_json} and {rundir.misclassified_png}")


def label_issues(
    run: RunOpt,
    runs_dir: RunsDirOpt = Path("runs"),
    count: Annotated[
        int, typer.Option("--count", help="How many to show in the gallery; the JSON lists all found.")
    ] = 20,
    checkpoint: CheckpointOpt = "last",
    device: DeviceOpt = "auto",
) -> None:
    """Find test images whose label is likely wrong (cleanlab); write label_issues.json and .png.

    Confident learning on the model's test-set probabilities, ranked by label quality (the
    probability of the given label). Needs the optional extra: pip install "cifarcam\\[labels]".

    Example: cifarcam label-issues --run r1 --count 20
    """
    from cifarcam.evaluation import commands as evaluation

    rundir = run_dir(runs_dir, run)
    entries = guarded(lambda: evaluation.label_issues(rundir, count, checkpoint, device))
    table = Table("test index", "given", "suggested", "quality", "confidence")
    for entry in entries[:count]:
        table.add_row(
            str(entry["index"]),
            entry["given"],
            entry["suggested"],
            f"{entry['quality']:.3f}",
            f"{entry['confidence']:.1%}",
        )
    console.print(table)
    console.print(f"{len(entries)} likely label errors in the test set")
    written = [rundir.label_issues_json] + ([rundir.label_issues_png] if entries else [])
    console.print("Wrote " + " and ".join(str(path) for path in written))


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
        bool, typer.Option("--metrics", help="Faithfulness: deletion/insertion AUC, average drop/increase.")
    ] = False,
    steps: Annotated[int, typer.Option(help="Deletion/insertion steps for --metrics.")] = 16,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 256,
    precision: Annotated[
        str,
        typer.Option(
            help="fp32 (exact maps, the default), or bf16/auto: forward passes under bfloat16 "
            "autocast, several times faster where supported, maps less exact: measured, most move "
            "by under 0.02 at layer4 but one in ten by over 0.1 at layer3 (docs/explanations.md)."
        ),
    ] = "fp32",
    checkpoint: CheckpointOpt = "last",
    device: DeviceOpt = "auto",
) -> None:
    """CAM maps for the most confident mistakes (or the whole test set) and their gallery.

    Example: cifarcam gradcam --run r1 --method gradcam --method scorecam --layer layer3 --layer layer4
    """
    from cifarcam.explain import commands as explain

    rundir = run_dir(runs_dir, run)
    with progress_bar() as progress, user_errors():
        task = progress.add_task("explaining", total=None)
        outcome = explain.gradcam(
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
            lambda done, total: progress.update(task, completed=done, total=total),
            precision,
        )
    if outcome.metrics:
        table = Table(
            "method", "layer", "deletion AUC (lower)", "insertion AUC (higher)", "avg drop %", "increase %"
        )
        for row in outcome.metrics:
            scores = [f"{row[key]:.4f}" for key in ("deletion_auc", "insertion_auc")]
            scores += [f"{row[key]:.2f}" for key in ("average_drop", "increase_in_confidence")]
            table.add_row(row["method"], row["layer"], *scores)
        console.print(table)
    if not outcome.gallery_rows:
        console.print("No test image is misclassified, so there is no gallery of mistakes.")
    console.print("Wrote " + ", ".join(str(p) for p in outcome.paths))


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
    from cifarcam.explain import commands as explain

    rundir = run_dir(runs_dir, run)
    outcome = guarded(lambda: explain.sanity(rundir, method, layer, count, checkpoint, device, seed))
    table = Table("randomised down to", "Spearman", "SSIM")
    for row in outcome.rows:
        spearman, ssim = (f"{row[key]:.3f} ± {row[f'{key}_std']:.3f}" for key in ("spearman", "ssim"))
        table.add_row(str(row["randomized"]), spearman, ssim)
    console.print(table)
    console.print("Wrote " + ", ".join(str(p) for p in outcome.paths))


def plot(run: RunOpt, runs_dir: RunsDirOpt = Path("runs")) -> None:
    """Plot train and test loss and accuracy per epoch into plots/.

    Example: cifarcam plot --run r1
    """
    from cifarcam.report import figures  # not torch: plot answers at once, also while a run trains

    paths = guarded(lambda: figures.plot_run_curves(run_dir(runs_dir, run)))
    console.print("Wrote " + ", ".join(str(p) for p in paths))
