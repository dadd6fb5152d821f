"""What the app shows of a run (cifarcam.app.explorer), without Gradio: mistakes, curves, top-k and
CAM overlays for any image, and a run directory left exactly as it was."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_tree, snapshot

from cifarcam.app.explorer import GALLERY_SIZE, PREDICTED, RunExplorer, check_port_free
from cifarcam.errors import RunError, UsageError
from cifarcam.evaluation.images import OVERLAY_SIZE, enlarge
from cifarcam.runs.rundir import RunDir


@pytest.fixture(scope="module")
def explored(
    trained_runs: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[RunExplorer, Path, dict[str, str]]:
    runs = copy_tree(trained_runs, tmp_path_factory.mktemp("explored") / "runs")
    before = snapshot(runs)
    return RunExplorer(RunDir(runs, "tiny"), device_name="cpu"), runs, before


def test_mistakes_and_curves(explored: tuple[RunExplorer, Path, dict[str, str]]) -> None:
    explorer, _, _ = explored
    assert 0 < len(explorer.mistakes) <= GALLERY_SIZE
    confidences = [m.confidence for m in explorer.mistakes]
    assert confidences == sorted(confidences, reverse=True)
    for mistake in explorer.mistakes:
        assert mistake.true != mistake.pred and mistake.true == explorer.test_label(mistake.index)
    gallery = explorer.gallery()
    assert len(gallery) == len(explorer.mistakes) and gallery[0][1] == explorer.mistakes[0].caption()
    curves = explorer.curves()
    assert curves is not None and curves.ndim == 3 and curves.shape[2] == 3 and curves.std() > 10


def test_explanations_follow_the_controls(explored: tuple[RunExplorer, Path, dict[str, str]]) -> None:
    explorer, _, _ = explored
    image = explorer.test_image(0)
    assert image.size == (32, 32) and np.array_equal(
        image.pixels, explorer.test_images[0].numpy().transpose(1, 2, 0)
    )
    by_layer = {
        layer: explorer.explain(image, layer, "gradcam", PREDICTED, 0.5) for layer in ("layer3", "layer4")
    }
    first = by_layer["layer4"]
    assert first.overlay.shape == (OVERLAY_SIZE, OVERLAY_SIZE, 3)
    assert len(first.top) == 3 and first.target == first.top[0][0]
    assert not np.array_equal(by_layer["layer3"].overlay, first.overlay)
    other = next(name for name in explorer.classes if name != first.target)
    assert explorer.explain(image, "layer4", "gradcam", other, 0.5).target == other
    assert np.array_equal(
        explorer.explain(image, "layer4", "gradcam", PREDICTED, 0.0).overlay, enlarge(image.pixels)
    )
    with pytest.raises(UsageError, match="test image #100000 does not exist"):
        explorer.test_image(100000)


def test_the_run_directory_is_unchanged(explored: tuple[RunExplorer, Path, dict[str, str]]) -> None:
    explorer, runs, before = explored
    explorer.explain(explorer.test_image(1), "layer2", "scorecam", PREDICTED, 0.7)
    assert snapshot(runs) == before  # not even predictions.safetensors


def test_port_checks() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RunError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port_free("127.0.0.1", port)
    with pytest.raises(UsageError, match="--port must be between 1 and 65535"):
        check_port_free("127.0.0.1", 0)


def test_a_port_left_in_time_wait_by_a_stopped_server_is_free() -> None:
    """The server closes first (as an app stopped with a browser connected): its side of the
    connection stays in TIME_WAIT for a minute, and a new server may listen there."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server's side closes first: TIME_WAIT on the server's port
    client.close()
    check_port_free("127.0.0.1", port)
