"""Any image file to the model's 32x32 input: decoding (Pillow or OpenCV), the documented
transform, and the enlarged overlays drawn on it."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cifarcam.data.datasets import IMAGE_SIZE
from cifarcam.errors import DataError
from cifarcam.report import figures

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
        return f"{width}x{height} {self.mode}{crop} -> {IMAGE_SIZE}x{IMAGE_SIZE}"


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


def decode_image(data: bytes, name: str) -> tuple[np.ndarray, str]:
    """Bytes of an image file -> (H, W, 3) uint8 RGB and a description of what the file held."""
    array = None
    if data:
        buffer = np.frombuffer(data, np.uint8)
        # OpenCV logs a warning of its own on a truncated file; the error below says it once.
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        try:
            array = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
            if data[:3] == b"\xff\xd8\xff" and array is not None and array.dtype == np.uint8:
                # The same pixels again, with the EXIF orientation applied (UNCHANGED ignores it)
                flag = cv2.IMREAD_GRAYSCALE if array.ndim == 2 else cv2.IMREAD_COLOR
                array = cv2.imdecode(buffer, flag)
        except cv2.error:
            array = None
        finally:
            cv2.utils.logging.setLogLevel(level)
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
        gray = _on_white(pixels[..., 0], pixels[..., 1])
        return np.repeat(gray[..., None], 3, axis=2), f"grayscale+alpha {depth}"
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
    interpolation = cv2.INTER_AREA if side >= IMAGE_SIZE else cv2.INTER_LINEAR
    pixels = cv2.resize(square, (IMAGE_SIZE, IMAGE_SIZE), interpolation=interpolation)
    return ImageInput((width, height), mode, (x, y, side), pixels)


def read_image(path: Path) -> ImageInput:
    """An image file of any common format, size and mode, ready for the model."""
    try:
        data = path.read_bytes()
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
    return figures.overlay(shown, heat, alpha)


def enlarge(pixels: np.ndarray, size: int = OVERLAY_SIZE) -> np.ndarray:
    """The 32x32 input at `size` with its pixels as blocks, to show what the model sees."""
    return cv2.resize(pixels, (size, size), interpolation=cv2.INTER_NEAREST)


def rgb_png_bytes(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
