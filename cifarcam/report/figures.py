"""Figures: training curves, the misclassified gallery, Grad-CAM galleries, the confusion heatmap
and run comparisons (Agg, no pyplot)."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cifarcam.runs.files import atomic_write_files
from cifarcam.runs.rundir import RunDir, reads_run

TILE_INCHES = 1.6
MARK_COLOUR = "#c00000"  # captions of likely label errors
CURVE_LABELS = {"loss": "loss (per-sample mean)", "acc": "accuracy (%)"}
# A decorator: draw with every text taken literally, so a class or run name like '$x_y$' is not
# mathtext (which would fail on '$x_y_z$').
_plain_text = matplotlib.rc_context({"text.parse_math": False})


def to_hwc(image: np.ndarray) -> np.ndarray:
    """(3, H, W) floats in [0, 1] -> (H, W, 3) uint8."""
    return (np.clip(image, 0.0, 1.0).transpose(1, 2, 0) * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0,1] map onto an RGB uint8 image with the JET colormap (red = high)."""
    heat_bgr = cv2.applyColorMap((np.clip(cam, 0, 1) * 255).round().astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat_bgr, cv2.COLOR_BGR2RGB)  # OpenCV colormaps are BGR
    blended = (1 - alpha) * image.astype(np.float32) + alpha * heat.astype(np.float32)
    return blended.round().clip(0, 255).astype(np.uint8)


@reads_run
def plot_run_curves(run: RunDir) -> list[Path]:
    """`cifarcam plot`: a run's curves from its metrics.json into plots/loss.png and accuracy.png."""
    loss, accuracy = plot_curves(run.read_epochs())
    files = {run.plots_dir / "loss.png": loss, run.plots_dir / "accuracy.png": accuracy}
    atomic_write_files(files)
    return list(files)


def _split_curves(
    epochs: Sequence[dict[str, Any]], metric: str, splits: Sequence[str] = ("train", "val", "test")
) -> dict[str, list[float]]:
    """Each split's `{split}_{metric}` per epoch, for the splits the records hold; accuracies in %."""
    scale = 100.0 if metric == "acc" else 1.0
    keys = {split: f"{split}_{metric}" for split in splits if f"{split}_{metric}" in epochs[0]}
    return {split: [record[key] * scale for record in epochs] for split, key in keys.items()}


def _epoch_axes(axes: Axes, ylabel: str) -> None:
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)


def _run_curves(axes: Axes, epochs: Sequence[dict[str, Any]], metric: str) -> None:
    xs = [record["epoch"] for record in epochs]
    for split, values in _split_curves(epochs, metric).items():
        axes.plot(xs, values, marker="o", label=split)
    axes.legend()
    _epoch_axes(axes, CURVE_LABELS[metric])


@_plain_text
def plot_curves(epochs: Sequence[dict[str, Any]]) -> tuple[bytes, bytes]:
    """Train/test (and validation, when present) loss on one figure, accuracy on another (PNGs)."""
    pngs = []
    for metric, title in (("loss", "Loss per epoch"), ("acc", "Accuracy per epoch")):
        figure = Figure(figsize=(6, 4))
        axes = figure.subplots()
        _run_curves(axes, epochs, metric)
        axes.set_title(title)
        pngs.append(png_bytes(figure))
    return pngs[0], pngs[1]


@_plain_text
def image_grid(
    images: np.ndarray, captions: Sequence[str], title: str, marked: Sequence[bool] | None = None
) -> bytes:
    """A grid (PNG) of (3,H,W) [0,1] images, five to a row, each under its caption; the captions
    of `marked` images (likely label errors) in red."""
    count = len(images)
    columns = min(5, count)
    rows = (count + columns - 1) // columns
    # constrained layout keeps the title just above the grid, however many rows there are
    figure = Figure(figsize=(columns * TILE_INCHES, rows * TILE_INCHES * 1.3 + 0.4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for index, ax in enumerate(axes):
        ax.axis("off")
        if index < count:
            colour = MARK_COLOUR if marked is not None and marked[index] else "black"
            _tile(ax, to_hwc(images[index]), captions[index], fontsize=8, colour=colour)
    figure.suptitle(textwrap.fill(title, 70), fontsize=9)
    return png_bytes(figure)


def _tile(ax: Axes, image: np.ndarray, title: str, fontsize: int, colour: str = "black") -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set_title(title, fontsize=fontsize, color=colour)
    ax.axis("off")


def attribution_image(attribution: np.ndarray) -> np.ndarray:
    """(3, H, W) input-space gradients -> (H, W, 3) uint8 for display: standardised per image,
    scaled by 0.1 around mid-grey (the usual guided-backpropagation rendering)."""
    centred = attribution - attribution.mean()
    shown = centred / (centred.std() + 1e-5) * 0.1 + 0.5
    return to_hwc(shown)


@dataclass(frozen=True)
class GalleryColumn:
    """One gallery column: per row, a heading and a (H, W) map in [0, 1] or a (3, H, W) attribution."""

    headings: Sequence[str]
    tiles: np.ndarray


@_plain_text
def cam_gallery(
    images: np.ndarray,
    columns: Sequence[GalleryColumn],
    row_labels: Sequence[str],
    title: str,
    marked: Sequence[bool] | None = None,
) -> bytes:
    """A PNG, one row per image: the input, then per column a map's JET overlay or an attribution;
    the labels of `marked` rows (likely label errors) in red."""
    count = len(images)
    width = 1 + len(columns)
    figure = Figure(figsize=(width * TILE_INCHES, count * TILE_INCHES * 1.2 + 0.8), layout="constrained")
    axes = figure.subplots(count, width, squeeze=False)
    for row, row_axes in enumerate(axes):
        picture = to_hwc(images[row])
        colour = MARK_COLOUR if marked is not None and marked[row] else "black"
        _tile(row_axes[0], picture, row_labels[row], fontsize=7, colour=colour)
        for ax, column in zip(row_axes[1:], columns, strict=True):
            tile = column.tiles[row]
            shown = attribution_image(tile) if tile.ndim == 3 else overlay(picture, tile)
            _tile(ax, shown, column.headings[row], fontsize=7, colour=colour)
    figure.suptitle(textwrap.fill(title, 18 * width), fontsize=9)
    return png_bytes(figure)


@_plain_text
def sanity_plot(rows: Sequence[dict[str, Any]], examples: Sequence[np.ndarray], title: str) -> bytes:
    """Spearman and SSIM to the trained maps per randomisation step (mean +- std), above one image's maps."""
    steps = [str(row["randomized"]) for row in rows]
    positions = np.arange(len(steps))
    figure = Figure(figsize=(max(8.0, 0.75 * len(steps)), 6.2))
    grid = figure.add_gridspec(2, len(steps), height_ratios=[3, 1])
    ax = figure.add_subplot(grid[0, :])
    for key, color in (("spearman", "tab:blue"), ("ssim", "tab:orange")):
        mean = np.array([row[key] for row in rows])
        spread = np.array([row[f"{key}_std"] for row in rows])
        ax.plot(positions, mean, marker="o", color=color, label=key.upper() if key == "ssim" else "Spearman")
        ax.fill_between(positions, mean - spread, mean + spread, color=color, alpha=0.15)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(positions, steps, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("similarity to the trained model's maps")
    ax.set_xlabel("randomised down to (cumulative, from the head)")
    ax.set_ylim(-0.3, 1.05)
    ax.legend()
    ax.grid(alpha=0.3)
    for index, example in enumerate(examples):
        tile_ax = figure.add_subplot(grid[1, index])
        tile_ax.imshow(example, cmap="jet", vmin=0, vmax=1, interpolation="nearest")
        tile_ax.axis("off")
    figure.suptitle(textwrap.fill(title, 110), fontsize=10)
    return png_bytes(figure)


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


@_plain_text
def report_curves(epochs: Sequence[dict[str, Any]]) -> bytes:
    """One row of panels for a run's report: loss, accuracy and the learning rate."""
    figure = Figure(figsize=(4.2 * 3, 3.4))
    loss_axes, acc_axes, lr_axes = figure.subplots(1, 3)
    _run_curves(loss_axes, epochs, "loss")
    _run_curves(acc_axes, epochs, "acc")
    xs = [record["epoch"] for record in epochs]
    lr_axes.plot(xs, [record["lr"] for record in epochs], marker="o", color="tab:purple")
    _epoch_axes(lr_axes, "learning rate (start of epoch)")
    figure.tight_layout()
    return png_bytes(figure)


@_plain_text
def confusion_heatmap(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> bytes:
    """Rows = true class, columns = predicted; colour = share of the row, numbers = counts."""
    counts = np.asarray(matrix, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(3.5, min(16.0, 0.42 * len(classes) + 1.6))  # CIFAR-100's 100 classes: 16 inches
    figure = Figure(figsize=(size + 0.9, size))
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = range(len(classes))
    labels = [textwrap.shorten(name, 24, placeholder="...") for name in classes]
    fontsize = 8 if len(classes) <= 30 else 5
    axes.set_xticks(ticks, labels, rotation=45 if len(classes) <= 30 else 90, ha="right", fontsize=fontsize)
    axes.set_yticks(ticks, labels, fontsize=fontsize)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if len(classes) <= 20:  # the counts, where they fit
        for (row, column), count in np.ndenumerate(counts):
            colour = "white" if shares[row, column] > 0.55 else "black"
            axes.text(column, row, f"{count:.0f}", ha="center", va="center", fontsize=7, color=colour)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    figure.tight_layout()
    return png_bytes(figure)


@_plain_text
def compare_curves(runs: Mapping[str, Sequence[dict[str, Any]]]) -> bytes:
    """Several runs on shared axes: one colour per run; test solid, train dashed; and the LR."""
    figure = Figure(figsize=(4.4 * 3, 3.8))
    loss_axes, acc_axes, lr_axes = figure.subplots(1, 3, sharex=True)
    for index, (name, epochs) in enumerate(runs.items()):
        colour = f"C{index % 10}"
        xs = [record["epoch"] for record in epochs]
        for axes, metric in ((loss_axes, "loss"), (acc_axes, "acc")):
            for split, values in _split_curves(epochs, metric, ("train", "test")).items():
                style = "--" if split == "train" else "-"
                axes.plot(xs, values, style, color=colour, label=f"{name} {split}")
        lr_axes.plot(xs, [record["lr"] for record in epochs], color=colour, label=name)
    labels = (CURVE_LABELS["loss"], CURVE_LABELS["acc"], "learning rate")
    for axes, label in zip((loss_axes, acc_axes, lr_axes), labels, strict=True):
        _epoch_axes(axes, label)
        axes.legend(fontsize=7)
    figure.tight_layout()
    return png_bytes(figure)
