"""The report and compare pages opened in headless Chromium (Debian's chromium + chromedriver via Selenium).

Checks what a reader would see: the page loads with no console error and no network request,
every section is in the DOM, every image decodes, the page fits a laptop screen's width and a
screenshot is not blank; hostile names show as text and run nothing. Selenium is given the
system chromedriver and chromium, so it never downloads a browser or a driver.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from browser import chrome, needs_browser, requested_urls
from conftest import HOSTILE_CLASS

from cifarcam.report.page import SECTIONS

pytestmark = needs_browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chrome() as driver:
        yield driver


def open_page(driver: Any, path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Load a page; return its console messages and the URLs it asked for (besides itself and data:)."""
    driver.get_log("browser")
    driver.get_log("performance")  # drop what earlier pages logged
    url = path.as_uri()
    driver.get(url)
    assert driver.execute_script("return document.readyState") == "complete"
    # Wait until every image is decoded or has failed (a failure shows in images() as naturalWidth 0).
    driver.execute_script(
        "return Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))"
    )
    console = driver.get_log("browser")
    requests = [
        requested
        for requested in requested_urls(driver)
        if requested != url and not requested.startswith("data:")
    ]
    return console, requests


def images(driver: Any) -> list[dict[str, Any]]:
    script = "return Array.from(document.images).map(i => ({src: i.src.slice(0, 22), complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))"
    result: list[dict[str, Any]] = driver.execute_script(script)
    return result


def assert_not_blank(driver: Any) -> None:
    screenshot = cv2.imdecode(np.frombuffer(driver.get_screenshot_as_png(), np.uint8), cv2.IMREAD_COLOR)
    assert screenshot is not None and screenshot.shape[1] >= 1200
    colours = np.unique(screenshot.reshape(-1, 3), axis=0)
    assert len(colours) > 50 and screenshot.std() > 10, "the screenshot is (nearly) one flat colour"


def fits_the_width(driver: Any) -> bool:
    return bool(driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"))


def test_report_in_a_browser(browser: Any, reported_runs: Path) -> None:
    console, requests = open_page(browser, reported_runs / "tiny" / "report.html")
    assert console == []  # not even a CSP violation: the page asks for nothing
    assert requests == []
    for section, title in SECTIONS.items():
        element = browser.find_element("id", section)
        assert element.tag_name == "section" and element.is_displayed()
        assert element.find_element("tag name", "h2").text == title
    shown = images(browser)
    assert len(shown) == 6  # curves, confusion, mistakes, label issues, Grad-CAM, sanity
    for image in shown:
        assert image["src"] == "data:image/png;base64,"
        assert image["complete"] and image["width"] > 100 and image["height"] > 100, image
    assert fits_the_width(browser)
    assert_not_blank(browser)


def test_hostile_names_in_a_browser(browser: Any, hostile_runs: Path) -> None:
    console, requests = open_page(browser, hostile_runs / "hostile" / "report.html")
    assert console == [] and requests == []
    assert browser.find_elements("tag name", "script") == []
    assert all(image["src"] == "data:image/png;base64," and image["width"] > 0 for image in images(browser))
    body = browser.find_element("tag name", "body").text
    assert (
        HOSTILE_CLASS in body and "<script>alert(1)</script>" in body and "<script>alert(3)</script>" in body
    )
    assert browser.execute_script("return document.title") == "cifarcam report: hostile"


def test_compare_in_a_browser(browser: Any, reported_runs: Path, hostile_runs: Path, tmp_path: Path) -> None:
    from cifarcam.report.compare import compare
    from cifarcam.runs.rundir import RunDir

    runs = tmp_path / "runs"
    shutil.copytree(reported_runs / "tiny", runs / "tiny")
    shutil.copytree(hostile_runs / "hostile", runs / "hostile")
    html, _ = compare([RunDir(runs, "tiny"), RunDir(runs, "hostile")], tmp_path / "compare.html")
    console, requests = open_page(browser, html)
    assert console == [] and requests == []
    assert browser.find_elements("tag name", "script") == []
    [image] = images(browser)
    assert image["complete"] and image["width"] > 600
    assert "<script>alert(1)</script>" in browser.find_element("id", "config").text
    assert fits_the_width(browser)
    assert_not_blank(browser)
