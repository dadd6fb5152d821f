"""Predictions for image files of any size and mode: decoding, the documented transform to the
model's 32x32 input, top-k classes and CAM overlays. Shared by `cifarcam predict` and the app.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from cifarcam import viz
from cifarcam.cam import CamExtractor, check_layers, check_methods
from cifarcam.data import normalize
from cifarcam.errors import DataError, UsageError
from cifarcam.fileio import atomic_write_bytes, read_file, written_file
from cifarcam.formats import CheckpointInfo
from cifarcam.rundir import RunDir, enclosing_run
from cifarcam.trained import LoadedRun, load_checkpoint

INPUT_SIZE = 32
OVERLAY_SIZE = 256  # overlays are drawn at 8x the model input: image pixels as blocks, the map smooth
TRANSFORM = (
    "decode to 8-bit RGB (grayscale repeated to 3 channels, 16-bit divided by 257, transparency "
    "composited on white, JPEG EXIF orientation applied); centre-crop to a square of the shorter "
    "side; resize to 32x32 (OpenCV INTER_AREA, bilinear when enlarging); normalise with the "
    "checkpoint's mean/std"
)


@dataclass(frozen=True)
class ImageInput:
    """An image file decoded and transformed to the model's input."""

    size: tuple[int, int]  # width, height of the decoded image
    mode: str  # what the file held, e.g. "RGBA 8-bit"
    crop: tuple[int, int, int]  # x, y and side of the centred square that was kept
    pixels: np.ndarray  # (32, 32, 3) uint8 RGB: what the model sees

    def describe(self) -> str:
        """'640x480 RGB 8-bit -> crop 480x480 at (80, 0) -> 32x32'."""
        width, height = self.size
        x, y, side = self.crop
        crop = "" if width == height else f" -> crop {side}x{side} at ({x}, {y})"
        return f"{width}x{height} {self.mode}{crop} -> {INPUT_SIZE}x{INPUT_SIZE}"


def _decode_with_pillow(data: bytes) -> np.ndarray | None:
    """Formats OpenCV does not read (PCX, ICO, TGA...): the first frame in OpenCV's layout, with
    the channels the file holds: gray, gray + alpha, BGR or BGRA (or 16-bit gray)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(image, dtype=np.uint16)
            alpha = "A" in image.getbands() or "transparency" in image.info
            if image.mode in ("1", "L", "LA"):
                return np.asarray(image.convert("LA" if alpha else "L"))
            colour = np.asarray(image.convert("RGBA" if alpha else "RGB"))
    except Exception:  # Pillow's decoders raise many types (OSError, EOFError, SyntaxError...): unreadable
        return None
    return cv2.cvtColor(colour, cv2.COLOR_RGBA2BGRA if alpha else cv2.COLOR_RGB2BGR)


def _to_uint8(array: np.ndarray, name: str) -> tuple[np.ndarray, str]:
    if array.dtype == np.uint8:
        return array, "8-bit"
    if array.dtype == np.uint16:
        return (array.astype(np.float32) / 257.0).round().astype(np.uint8), "16-bit"
    if array.dtype in (np.float32, np.float64):
        finite = np.nan_to_num(array, nan=0.0)  # a NaN pixel shows as black (0), not as a cast warning
        return (np.clip(finite, 0.0, 1.0) * 255.0).round().astype(np.uint8), "float"
    raise DataError(f"'{name}' holds {array.dtype} pixels; cifarcam reads 8-bit, 16-bit and float images")


def _on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    weight = alpha.astype(np.float32)[..., None] / 255.0
    return (colour.astype(np.float32) * weight + 255.0 * (1.0 - weight)).round().astype(np.uint8)


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _decoders_silenced() -> Iterator[None]:
    """OpenCV's log lines, Pillow's warnings (corrupt EXIF, a decompression-bomb size) and what
    libpng and libtiff print to the process's stderr themselves are dropped while decoding."""
    level = cv2.utils.logging.getLogLevel()
    with _STDERR_LOCK, warnings.catch_warnings(), open(os.devnull, "wb") as devnull:
        warnings.simplefilter("ignore")
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            cv2.utils.logging.setLogLevel(level)


def decode_image(data: bytes, name: str) -> tuple[np.ndarray, str]:
    """Bytes of an image file -> (H, W, 3) uint8 RGB and a description of what the file held."""
    array = None
    if data:
        buffer = np.frombuffer(data, np.uint8)
        with _decoders_silenced():  # a broken file gets our one line, not the decoders' own
            try:
                array = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
                if data[:3] == b"\xff\xd8\xff" and array is not None and array.dtype == np.uint8:
                    # The same pixels again, with the EXIF orientation applied (UNCHANGED ignores it)
                    flag = cv2.IMREAD_GRAYSCALE if array.ndim == 2 else cv2.IMREAD_COLOR
                    array = cv2.imdecode(buffer, flag)
            except cv2.error:
                array = None
            if array is None:
                array = _decode_with_pillow(data)
    if array is None or array.size == 0:
        raise DataError(f"'{name}' is not a readable image")
    pixels, depth = _to_uint8(array, name)
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if channels == 1:
        gray = pixels.reshape(pixels.shape[:2])
        return np.repeat(gray[..., None], 3, axis=2), f"grayscale {depth}"
    if channels == 2:  # gray + alpha
        return np.repeat(
            _on_white(pixels[..., 0], pixels[..., 1])[..., None], 3, axis=2
        ), f"grayscale+alpha {depth}"
    if channels == 3:
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB), f"RGB {depth}"
    if channels == 4:
        rgb = cv2.cvtColor(pixels[..., :3], cv2.COLOR_BGR2RGB)
        return _on_white(rgb, pixels[..., 3]), f"RGBA {depth}"
    raise DataError(f"'{name}' has {channels} channels; cifarcam reads 1 to 4")


def to_model_input(rgb: np.ndarray, mode: str = "RGB 8-bit") -> ImageInput:
    """The documented transform: centre-crop to a square of the shorter side, resize to 32x32."""
    height, width = rgb.shape[:2]
    side = min(height, width)
    x, y = (width - side) // 2, (height - side) // 2
    square = np.ascontiguousarray(rgb[y : y + side, x : x + side])
    interpolation = cv2.INTER_AREA if side >= INPUT_SIZE else cv2.INTER_LINEAR
    pixels = cv2.resize(square, (INPUT_SIZE, INPUT_SIZE), interpolation=interpolation)
    return ImageInput((width, height), mode, (x, y, side), pixels)


def read_image(path: Path) -> ImageInput:
    """An image file of any common format, size and mode, ready for the model."""
    try:
        data = read_file(path)
    except IsADirectoryError:
        raise DataError(f"'{path}' is a directory, not an image") from None
    except FileNotFoundError:
        raise DataError(f"'{path}' does not exist") from None
    except OSError as error:
        raise DataError(f"cannot read '{path}': {error.strerror or error}") from None
    return to_model_input(*decode_image(data, str(path)))


def overlay_image(
    pixels: np.ndarray, cam: np.ndarray, alpha: float = 0.5, size: int = OVERLAY_SIZE
) -> np.ndarray:
    """A 32x32 input and its map, enlarged to `size` (image: nearest neighbour, map: bilinear)."""
    shown = enlarge(pixels, size)
    heat = cv2.resize(cam.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    return viz.overlay(shown, heat, alpha)


def enlarge(pixels: np.ndarray, size: int = OVERLAY_SIZE) -> np.ndarray:
    """The 32x32 input at `size` with its pixels as blocks, to show what the model sees."""
    return cv2.resize(pixels, (size, size), interpolation=cv2.INTER_NEAREST)


def rgb_png_bytes(rgb: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise DataError("could not encode a PNG")
    return encoded.tobytes()


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
        model, info, _, device = load_checkpoint(run, checkpoint, device_name)
        return cls(model.float().to(device).eval(), info, device, run.name, checkpoint)

    @classmethod
    def from_loaded(cls, loaded: LoadedRun, checkpoint: str = "last") -> Predictor:
        return cls(loaded.cam_model(), loaded.info, loaded.device, loaded.run.name, checkpoint)

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    def check_layers(self, layers: Sequence[str]) -> None:
        check_layers(self.model, list(layers))

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
        with CamExtractor(self.model, list(layers), check_methods(list(methods))) as extractor:
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


@dataclass(frozen=True)
class Overlay:
    target: str  # "pred" or "class"
    class_name: str
    method: str
    layer: str
    path: Path


@dataclass
class FileResult:
    """One image file: its transform, top-k and overlays, or the error that stopped it."""

    path: Path
    image: ImageInput | None = None
    top: list[tuple[str, float]] = field(default_factory=list)
    overlays: list[Overlay] = field(default_factory=list)
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
            "overlays": [
                {
                    "target": o.target,
                    "class": o.class_name,
                    "method": o.method,
                    "layer": o.layer,
                    "path": str(o.path),
                }
                for o in self.overlays
            ],
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


def check_request(predictor: Predictor, run: RunDir, top_k: int, cam: CamRequest | None) -> None:
    """Every option checked before any image is read, so a typo fails fast and writes nothing."""
    if not 1 <= top_k <= len(predictor.classes):
        raise UsageError(f"--top-k must be between 1 and {len(predictor.classes)} (got {top_k})")
    if cam is None:
        return
    check_methods(cam.methods)
    predictor.check_layers(cam.layers)
    for name in cam.classes:
        predictor.class_index(name)
    out = cam.out_dir.resolve()
    if out == run.path.resolve() or run.path.resolve() in out.parents:
        raise UsageError(f"--out '{cam.out_dir}' is inside the run directory; predictions never write there")
    other = enclosing_run(out)
    if other is not None:  # nor into another run
        raise UsageError(
            f"--out '{cam.out_dir}' is inside run '{other.name}'; predictions never write into a run"
        )
    given = cam.out_dir  # its nearest existing folder, named as the user named it
    existing = next((folder for folder in (given, *given.parents) if folder.exists()), Path("."))
    if existing == given and not given.is_dir():
        raise UsageError(f"--out '{cam.out_dir}' is a file, not a folder")
    if not existing.is_dir():
        raise UsageError(f"--out '{cam.out_dir}' cannot be a folder: '{existing}' is a file")


def _write_overlays(
    predictor: Predictor, image: ImageInput, stem: str, pred: int, cam: CamRequest
) -> list[Overlay]:
    wanted = [("pred", pred)] + [("class", predictor.class_index(name)) for name in cam.classes]
    maps = predictor.maps(image.pixels, [c for _, c in wanted], cam.methods, cam.layers)
    overlays = []
    for target, index in wanted:
        name = predictor.classes[index]
        for method in cam.methods:
            for layer in cam.layers:
                path = cam.out_dir / f"{stem}_{method}_{layer}_{target}-{_safe(name)}.png"
                atomic_write_bytes(
                    path, rgb_png_bytes(overlay_image(image.pixels, maps[(index, method, layer)], cam.alpha))
                )
                overlays.append(Overlay(target, name, method, layer, path))
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
        top = predictor.top_k(probabilities, top_k)
        pred = int(probabilities.argmax())
        try:
            overlays = _write_overlays(predictor, image, stem, pred, cam) if cam else []
        except OSError as error:  # a full disk, or a folder in the overlay's way
            where = written_file(str(error.filename)) if error.filename else "its folder"
            message = f"cannot write a CAM overlay of '{path}' ({where}): {error.strerror or error}"
            yield FileResult(path, error=message)
            continue
        yield FileResult(path, image, top, overlays)


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
