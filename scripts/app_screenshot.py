"""Take the README's screenshot of `cifarcam app`: start it on a run, upload an image in headless
Chromium (Debian's chromium + chromedriver), pick a layer, save a PNG.

    .venv/bin/python scripts/app_screenshot.py --runs-dir /tmp/app-runs --run quick \
        --image photo.jpg --layer layer3 --out docs/images/app-screenshot.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs-dir", type=Path, required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--out", type=Path, default=Path("docs/images/app-screenshot.png"))
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "cifarcam", "app", "--run", args.run, "--runs-dir", str(args.runs_dir)]
    server = subprocess.Popen([*command, "--port", str(port), "--device", "cpu"])
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "chromium"
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,1500",
        ):
            options.add_argument(argument)
        os.environ["SE_OFFLINE"] = "true"
        driver = webdriver.Chrome(
            service=Service(executable_path=shutil.which("chromedriver")), options=options
        )
        try:
            wait = WebDriverWait(driver, 60)
            driver.get(url)
            wait.until(lambda d: d.find_elements("css selector", "#upload input[type=file]"))
            driver.find_element("css selector", "#upload input[type=file]").send_keys(
                str(args.image.resolve())
            )
            wait.until(lambda d: d.find_elements("css selector", "#cam img"))
            first = driver.find_element("css selector", "#cam img").get_attribute("src")
            if args.layer != "layer4":
                driver.find_element(
                    "xpath", f"//*[@id='layer']//label[normalize-space()='{args.layer}']"
                ).click()
                wait.until(lambda d: d.find_element("css selector", "#cam img").get_attribute("src") != first)
            time.sleep(1.0)  # let the image fade-ins finish
            png = driver.get_screenshot_as_png()
        finally:
            driver.quit()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"Wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
