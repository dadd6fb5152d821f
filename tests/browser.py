"""Headless Chromium for the browser tests: Debian's chromium and chromedriver driven by Selenium.

Selenium is given the system chromedriver and chromium, and SE_OFFLINE is set, so it never
downloads a browser or a driver. Outside CI the tests skip, saying why, when either is missing;
under CI=true they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = "chromium and chromedriver are not on PATH (Debian packages chromium, chromium-driver; .ci/run installs them)"

needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"), reason=MISSING
)


@contextmanager
def chrome(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A headless Chromium that logs console messages and network events."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail(f"CI must run the browser test, but {MISSING}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")  # belt and braces: Selenium Manager must not fetch anything
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def requested_urls(driver: Any) -> list[str]:
    """Every URL the browser asked for since the performance log was last read."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.append(message["params"]["url"])
    return urls


def leaves_loopback(url: str) -> bool:
    """True for a request to another host than this machine (data: and blob: URLs stay local)."""
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about", "chrome", "file"):
        return False
    return parts.hostname not in ("127.0.0.1", "localhost", "::1")
