"""Headless Chromium through Selenium, for testing and screenshotting the project's HTML pages.

Drives Debian's ``/usr/bin/chromium`` with its ``/usr/bin/chromedriver`` (``apt-get install chromium
chromium-driver``; ``scripts/_setup.sh`` installs them when root). Both paths are given to Selenium,
so Selenium Manager is never run and nothing is downloaded. Selenium is imported inside the
functions: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lineofsight.cli import UserError

__all__ = ["CHROMEDRIVER", "CHROMIUM", "FLAGS", "headless_chromium", "js_errors", "screenshot"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1280,900",
)
"""Headless, no sandbox (root in a container), and no traffic of the browser's own. File-URL rules stay as a
reader's browser has them (no --allow-file-access-from-files), so a page that only works over HTTP fails its test."""


def _require(path: Path, package: str) -> None:
    if not path.is_file():
        raise UserError(f"{path} not found: install Debian's {package} (apt-get install {package})")


@contextlib.contextmanager
def headless_chromium(chromium: Path | str = CHROMIUM, chromedriver: Path | str = CHROMEDRIVER) -> Iterator[Any]:
    """A Selenium ``WebDriver`` for headless Chromium, quit (and its temp profile removed) on exit.

    Browser console messages are recorded (``goog:loggingPrefs`` browser ALL): read them with
    :func:`js_errors`. A missing binary is a :class:`UserError` naming it.
    """
    chromium, chromedriver = Path(chromium), Path(chromedriver)
    _require(chromium, "chromium")
    _require(chromedriver, "chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="los-chromium-")
    try:
        options = webdriver.ChromeOptions()
        options.binary_location = str(chromium)
        for flag in (*FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(executable_path=str(chromedriver)), options=options)
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def js_errors(driver: Any) -> list[str]:
    """The SEVERE browser-log messages since the last call (uncaught exceptions, failed loads, console.error)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver: Any, url: str, path: Path | str, wait_for: str | None = None, timeout: float = 10.0) -> Path:
    """Open ``url``, wait until ``wait_for`` (a CSS selector) is present, save a PNG of the window to ``path``."""
    path = Path(path)
    driver.get(url)
    if wait_for:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, wait_for))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise UserError(f"could not write the screenshot {path}")
    return path
