"""What the app shows of a run, computed without writing to it: the model, the test images, the
most confident mistakes, the curves, and the top-k and CAM overlay of any image."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from cifarcam.errors import RunError, UsageError
from cifarcam.evaluation.commands import mistake_entries, select_misclassified
from cifarcam.evaluation.images import ImageInput, enlarge, overlay_image, to_model_input
from cifarcam.evaluation.loading import load_run, test_logits
from cifarcam.evaluation.predict import Predictor
from cifarcam.report import figures
from cifarcam.runs.rundir import RunDir

APP_LAYERS = ("layer1", "layer2", "layer3", "layer4")
PREDICTED = "predicted class"
GALLERY_SIZE = 24
TILE = 96  # gallery tiles: test images enlarged 3x


@dataclass(frozen=True)
class Mistake:
    index: int
    true: str
    pred: str
    confidence: float

    def caption(self) -> str:
        return f"#{self.index} {self.true} -> {self.pred} ({self.confidence:.0%})"


@dataclass(frozen=True)
class Explanation:
    top: list[tuple[str, float]]
    target: str  # the class the map explains
    overlay: np.ndarray  # (OVERLAY_SIZE, OVERLAY_SIZE, 3) uint8 RGB


class RunExplorer:
    """A trained run opened read-only: nothing is written into its directory, not even caches."""

    def __init__(self, run: RunDir, checkpoint: str = "last", device_name: str = "auto") -> None:
        loaded = load_run(run, checkpoint, device_name)
        logits = test_logits(loaded, write=False)  # the run directory stays as it was
        probabilities = torch.softmax(logits, dim=1)
        self.run = run
        self._last: tuple[tuple[bytes, str, str, str], torch.Tensor, int, np.ndarray] | None = None
        self.test_images = loaded.test.images.cpu()
        self.test_labels = loaded.test.labels.cpu()
        self.predictor = Predictor.from_loaded(loaded, checkpoint)
        correct = probabilities.argmax(1) == self.test_labels
        self.accuracy = float(correct.float().mean())
        wrong = int((~correct).sum())
        indices = select_misclassified(probabilities, self.test_labels, min(GALLERY_SIZE, wrong))
        self.mistakes = [
            Mistake(entry["index"], entry["true"], entry["pred"], entry["confidence"])
            for entry in mistake_entries(probabilities, self.test_labels, self.predictor.classes, indices)
        ]

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    def test_image(self, index: int) -> ImageInput:
        if not 0 <= index < len(self.test_images):
            raise UsageError(f"test image #{index} does not exist; there are {len(self.test_images)}")
        pixels = self.test_images[index].numpy().transpose(1, 2, 0)
        return to_model_input(np.ascontiguousarray(pixels))

    def test_label(self, index: int) -> str:
        return self.classes[int(self.test_labels[index])]

    def gallery(self) -> list[tuple[np.ndarray, str]]:
        """The most confident mistakes as (enlarged image, caption)."""
        return [(enlarge(self.test_image(m.index).pixels, TILE), m.caption()) for m in self.mistakes]

    def curves(self) -> np.ndarray | None:
        """Loss, accuracy and learning rate per epoch (the report's figure) as RGB; None before training."""
        try:
            epochs = self.run.read_epochs()
        except RunError:
            return None
        decoded = cv2.imdecode(np.frombuffer(figures.report_curves(epochs), np.uint8), cv2.IMREAD_COLOR)
        return None if decoded is None else cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)

    def explain(
        self, image: ImageInput, layer: str, method: str, target: str, alpha: float, top_k: int = 3
    ) -> Explanation:
        """Top-k of the image and the map of `target` (a class name, or PREDICTED) at `layer`."""
        predictor = self.predictor
        key = (image.pixels.tobytes(), layer, method, target)
        if self._last is None or self._last[0] != key:
            # Recomputed only when the image or the layer, method or target changes: moving the
            # opacity slider just blends the same map again.
            probabilities = predictor.probabilities(image.pixels)
            index = int(probabilities.argmax()) if target == PREDICTED else predictor.class_index(target)
            cam = predictor.maps(image.pixels, [index], [method], [layer])[(index, method, layer)]
            self._last = (key, probabilities, index, cam)
        _, probabilities, index, cam = self._last
        return Explanation(
            predictor.top_k(probabilities, top_k),
            predictor.classes[index],
            overlay_image(image.pixels, cam, alpha),
        )


def check_port_free(host: str, port: int) -> None:
    """Fail with one line before Gradio's own, longer, error when the port is taken."""
    if not 1 <= port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535 (got {port})")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As the server will: connections of an app just stopped, left in TIME_WAIT, do not
        # count (a listening socket still does)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise RunError(
                    f"port {port} on {host} is in use", hint="choose another with --port"
                ) from None
            raise RunError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
