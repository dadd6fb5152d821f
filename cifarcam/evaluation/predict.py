"""Predictions for image files of any size and mode (read by `images`): top-k classes and CAM
overlays. Shared by `cifarcam predict` and the app."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifarcam.data.datasets import normalize
from cifarcam.errors import DataError, UsageError
from cifarcam.evaluation.images import TRANSFORM, ImageInput, overlay_image, read_image, rgb_png_bytes
from cifarcam.evaluation.loading import LoadedRun, load_checkpoint
from cifarcam.explain.extractor import CamExtractor, check_layers
from cifarcam.explain.methods import check_methods
from cifarcam.runs.files import atomic_write_files
from cifarcam.runs.formats import CheckpointInfo
from cifarcam.runs.rundir import RunDir, enclosing_run


@dataclass
class Predictor:
    """A run's model in float32 on its device, with the checkpoint's classes and mean/std."""

    model: nn.Module
    info: CheckpointInfo
    device: torch.device
    run_name: str
    checkpoint: str

    @classmethod
    def from_run(cls, run: RunDir, checkpoint: str = "last", device_name: str = "auto") -> Predictor:
        """From the checkpoint alone: the run's data need not be present."""
        model, info, device = load_checkpoint(run, checkpoint, device_name)
        return cls(model.float().to(device).eval(), info, device, run.name, checkpoint)

    @classmethod
    def from_loaded(cls, loaded: LoadedRun, checkpoint: str = "last") -> Predictor:
        return cls(loaded.cam_model(), loaded.info, loaded.device, loaded.run.name, checkpoint)

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    def class_index(self, name: str) -> int:
        if name in self.classes:
            return self.classes.index(name)
        raise UsageError(f"unknown class '{name}'; classes: {', '.join(self.classes)}")

    def _batch(self, pixels: np.ndarray) -> torch.Tensor:
        images = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).unsqueeze(0)
        return normalize(images.to(self.device), self.info.mean, self.info.std)

    def probabilities(self, pixels: np.ndarray) -> torch.Tensor:
        """Softmax probabilities (C,) on the CPU for one (32, 32, 3) uint8 image."""
        with torch.no_grad():
            logits = self.model(self._batch(pixels)).float()
        return torch.softmax(logits, dim=1)[0].cpu()

    def top_k(self, probabilities: torch.Tensor, k: int) -> list[tuple[str, float]]:
        values, indices = torch.topk(probabilities, min(k, len(self.classes)))
        return [(self.classes[int(i)], float(v)) for v, i in zip(values, indices, strict=True)]

    def maps(
        self, pixels: np.ndarray, classes: Sequence[int], methods: Sequence[str], layers: Sequence[str]
    ) -> dict[tuple[int, str, str], np.ndarray]:
        """(32, 32) maps in [0, 1] keyed by (target class, method, layer); one forward pass per call."""
        targets = {str(c): torch.tensor([c], device=self.device) for c in dict.fromkeys(classes)}
        with CamExtractor(self.model, list(layers), list(methods)) as extractor:
            maps = extractor(self._batch(pixels), targets).maps
        return {
            (int(key), method, layer): maps[key][method][layer][0].detach().cpu().numpy()
            for key in targets
            for method in methods
            for layer in layers
        }


@dataclass(frozen=True)
class CamRequest:
    """What `predict --cam` draws: every method at every layer, for the predicted class and `classes`."""

    out_dir: Path
    methods: list[str] = field(default_factory=lambda: ["gradcam"])
    layers: list[str] = field(default_factory=lambda: ["layer4"])
    classes: list[str] = field(default_factory=list)
    alpha: float = 0.5

    def __post_init__(self) -> None:  # an option given twice draws its overlays once
        for name in ("methods", "layers", "classes"):
            object.__setattr__(self, name, list(dict.fromkeys(getattr(self, name))))


@dataclass
class FileResult:
    """One image file: its transform, top-k and overlays, or the error that stopped it."""

    path: Path
    image: ImageInput | None = None
    top: list[tuple[str, float]] = field(default_factory=list)
    overlays: list[dict[str, str]] = field(default_factory=list)  # as in `predict --json`
    error: str | None = None

    def record(self) -> dict[str, Any]:
        """This file's entry in `predict --json`."""
        if self.image is None:
            return {"path": str(self.path), "ok": False, "error": self.error}
        x, y, side = self.image.crop
        return {
            "path": str(self.path),
            "ok": True,
            "width": self.image.size[0],
            "height": self.image.size[1],
            "mode": self.image.mode,
            "crop": {"x": x, "y": y, "side": side},
            "transform": self.image.describe(),
            "top_k": [{"class": name, "probability": p} for name, p in self.top],
            "overlays": self.overlays,
        }


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


STEM_CHARS = 100  # of an input's name in its overlays' names (a file name holds 255 bytes)


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    """A distinct output name per input, its first STEM_CHARS characters: repeats get -2, -3,
    ... past any name already taken (a.png, a.jpg, a-2.png -> a, a-2, a-2-2)."""
    stems: list[str] = []
    for path in paths:
        base = _safe(path.stem)[:STEM_CHARS] or "image"
        stem, count = base, 1
        while stem in stems:
            count += 1
            stem = f"{base}-{count}"
        stems.append(stem)
    return stems


def check_request(predictor: Predictor, top_k: int, cam: CamRequest | None) -> None:
    """Every option checked before any image is read, so a typo fails fast and writes nothing."""
    if not 1 <= top_k <= len(predictor.classes):
        raise UsageError(f"--top-k must be between 1 and {len(predictor.classes)} (got {top_k})")
    if cam is None:
        return
    check_methods(cam.methods)
    check_layers(predictor.model, cam.layers)
    for name in cam.classes:
        predictor.class_index(name)
    run_folder = enclosing_run(cam.out_dir)  # this run, or any other
    if run_folder is not None:
        raise UsageError(
            f"--out '{cam.out_dir}' is inside run '{run_folder.name}'; predictions never write into a run"
        )
    given = cam.out_dir  # its nearest existing folder, named as the user named it ('.' exists)
    existing = next(folder for folder in (given, *given.parents) if folder.exists())
    if not existing.is_dir():
        raise UsageError(f"--out '{cam.out_dir}' cannot be a folder: '{existing}' is a file")


def _write_overlays(
    predictor: Predictor, image: ImageInput, stem: str, pred: int, cam: CamRequest
) -> list[dict[str, str]]:
    """The overlay PNGs of `image`, and a record of each: target, class, method, layer, path."""
    wanted = [("pred", pred)] + [("class", predictor.class_index(name)) for name in cam.classes]
    maps = predictor.maps(image.pixels, [c for _, c in wanted], cam.methods, cam.layers)
    overlays = []
    for target, index in wanted:
        name = predictor.classes[index]
        for method in cam.methods:
            for layer in cam.layers:
                path = cam.out_dir / f"{stem}_{method}_{layer}_{target}-{_safe(name)}.png"
                overlay = overlay_image(image.pixels, maps[(index, method, layer)], cam.alpha)
                atomic_write_files({path: rgb_png_bytes(overlay)})
                overlays.append(
                    {"target": target, "class": name, "method": method, "layer": layer, "path": str(path)}
                )
    return overlays


def predict_files(
    predictor: Predictor, paths: Sequence[Path], top_k: int = 3, cam: CamRequest | None = None
) -> Iterator[FileResult]:
    """Each file in turn; a file that cannot be read yields its error and the others go on."""
    for path, stem in zip(paths, _unique_stems(paths), strict=True):
        try:
            image = read_image(path)
        except DataError as error:
            yield FileResult(path, error=error.message)
            continue
        probabilities = predictor.probabilities(image.pixels)
        pred = int(probabilities.argmax())
        overlays = _write_overlays(predictor, image, stem, pred, cam) if cam else []
        yield FileResult(path, image, predictor.top_k(probabilities, top_k), overlays)


def predict_document(predictor: Predictor, results: Sequence[FileResult]) -> dict[str, Any]:
    """The one JSON document `predict --json` prints."""
    return {
        "run": predictor.run_name,
        "checkpoint": predictor.checkpoint,
        "epoch": predictor.info.epoch,
        "classes": predictor.classes,
        "transform": TRANSFORM,
        "images": [result.record() for result in results],
        "failed": sum(result.error is not None for result in results),
    }
