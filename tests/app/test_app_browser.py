"""`cifarcam app` as a user meets it: started in a subprocess on a free loopback port, driven in
headless Chromium (tests/browser.py), stopped with SIGTERM.

Upload an image, see the top-k and a CAM image appear, change the layer and see the CAM change,
pick a test image; the browser asks nothing of any other host, the run directory is unchanged,
and the server exits 0 within seconds of SIGTERM. Also: the one-line errors of a missing Gradio
and a port already in use.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from browser import chrome, leaves_loopback, needs_browser, requested_urls
from conftest import copy_tree, snapshot
from typer.testing import CliRunner

import cifarcam.app
from cifarcam.cli import app
from cifarcam.data.datasets import synthetic_dataset

CLASSES = [f"class{i}" for i in range(10)]
START_TIMEOUT_S = 90  # importing torch and gradio on a busy 2-core machine
WAIT_S = 30


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str
    runs: Path
    log: Path


@pytest.fixture(scope="module")
def server(trained_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("app")
    runs = copy_tree(trained_runs, base / "runs")
    port = free_port()
    log = base / "app.log"
    env = os.environ | {"OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(base / "gradio-tmp")}
    command = [sys.executable, "-m", "cifarcam", "app", "--run", "tiny", "--runs-dir", str(runs)]
    command += ["--port", str(port), "--device", "cpu"]
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"the app exited with {process.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the app did not answer on {url} within {START_TIMEOUT_S} s: {log.read_text()}")
        time.sleep(0.5)
    try:
        yield Server(process, url, runs, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def an_upload(folder: Path) -> Path:
    """A 60x90 RGBA PNG (odd size, transparency) made from a synthetic test image."""
    rgb = synthetic_dataset(1, 1, seed=11).test.images[0].numpy().transpose(1, 2, 0)
    bgra = np.dstack([cv2.resize(rgb[:, :, ::-1], (60, 90)), np.full((90, 60), 255, np.uint8)])
    bgra[:8, :, 3] = 0
    path = folder / "upload.png"
    assert cv2.imwrite(str(path), bgra)
    return path


def wait_for(driver: Any, condition: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(condition, message=f"waiting for {what}")


def cam_source(driver: Any) -> str | None:
    images = driver.find_elements("css selector", "#cam img")
    return images[0].get_attribute("src") if images else None


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        data: bytes = response.read()
    return data


@needs_browser
def test_the_app_in_a_browser(server: Server, tmp_path: Path) -> None:
    before = snapshot(server.runs)
    with chrome() as driver:
        driver.get(server.url)
        upload = wait_for(
            driver, lambda d: d.find_elements("css selector", "#upload input[type=file]"), "the upload field"
        )
        upload[0].send_keys(str(an_upload(tmp_path)))

        top = wait_for(
            driver,
            lambda d: (
                any(name in d.find_element("id", "topk").text for name in CLASSES)
                and d.find_element("id", "topk")
            ),
            "the top-k classes",
        )
        assert "%" in top.text
        first = wait_for(driver, cam_source, "a CAM image")
        assert (
            "60x90 RGBA 8-bit -> crop 60x60 at (0, 15) -> 32x32"
            in driver.find_element("id", "transform").text
        )
        first_png = fetch(first)
        shown = cv2.imdecode(np.frombuffer(first_png, np.uint8), cv2.IMREAD_COLOR)
        assert shown is not None and shown.shape == (256, 256, 3)

        driver.find_element("xpath", "//*[@id='layer']//label[normalize-space()='layer2']").click()
        second = wait_for(
            driver, lambda d: (s := cam_source(d)) not in (None, first) and s, "a new CAM image"
        )
        assert fetch(second) != first_png
        assert "layer2" in driver.find_element("id", "cam").text

        driver.find_element("id", "pick-test").click()
        wait_for(
            driver,
            lambda d: "Test image #0, true class: class" in d.find_element("id", "transform").text,
            "test image #0",
        )
        wait_for(driver, lambda d: (s := cam_source(d)) not in (None, second) and s, "the test image's CAM")

        urls = requested_urls(driver)
        assert any(url.startswith(server.url) for url in urls)  # the log did record the page's requests
        assert [url for url in urls if leaves_loopback(url)] == []
    assert snapshot(server.runs) == before

    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=15) == 0
    log = server.log.read_text()
    assert "Serving run 'tiny' at http://127.0.0.1:" in log and log.rstrip().endswith("Stopped")
    assert "Traceback" not in log


runner = CliRunner()


def test_without_gradio_the_app_says_how_to_install_it(
    trained_runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # what `import gradio` meets when it is not installed
    monkeypatch.delitem(sys.modules, "cifarcam.app.web", raising=False)
    monkeypatch.delattr(cifarcam.app, "web", raising=False)
    result = runner.invoke(app, ["app", "--run", "tiny", "--runs-dir", str(trained_runs)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: the app needs Gradio, which is not installed",
        'Hint: pip install "cifarcam[app]"',
    ]


def test_a_port_in_use_is_one_error_line(trained_runs: Path) -> None:
    if importlib.util.find_spec("gradio") is None:
        if os.environ.get("CI"):
            pytest.fail('CI must test the app, but gradio is not installed (pip install ".[dev,app]")')
        pytest.skip('the app extra is not installed (pip install ".[app]")')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(
            app,
            ["app", "--run", "tiny", "--runs-dir", str(trained_runs), "--port", str(port), "--device", "cpu"],
        )
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"Error: port {port} on 127.0.0.1 is in use",
        "Hint: choose another with --port",
    ]
