"""Open a page in headless Chromium (Debian's chromium + chromium-driver, through selenium) and report what a
person would see: console errors, images that did not load, the tables and figures, a screenshot.

CI installs the browser (``.ci/run``); elsewhere the tests that need it skip when it is absent, except under
``CI=true``, where a missing browser is a failure (a green run must not hide a skipped browser check).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def browser_paths() -> tuple[str, str] | None:
    """(browser, chromedriver) executables, or None when either is missing."""
    browser = next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def require_browser() -> tuple[str, str]:
    paths = browser_paths()
    if paths is None:
        message = "headless Chromium not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message + ": .ci/run should have installed it")
        pytest.skip(message)
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("selenium is not installed: it is in pyproject.toml; rebuild the environment (make venv)")
    return paths


@dataclass
class PageCheck:
    """What the browser saw: console messages at level SEVERE, broken images, counts, and the screenshot."""
    errors: list[str]
    broken_images: list[str]
    images: int
    tables: int
    headings: list[str]
    screenshot: Path


def open_page(page: Path, screenshot: Path, width: int = 1280) -> PageCheck:
    """Load ``page`` (a file) in headless Chromium, wait for it, and collect a `PageCheck`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = require_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(Path(page).resolve().as_uri())
        errors = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        broken = driver.execute_script(
            "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
            ".map(i => i.alt || i.src.slice(0, 60));")
        counts = driver.execute_script(
            "return [document.images.length, document.querySelectorAll('table').length,"
            " Array.from(document.querySelectorAll('h2, h3')).map(h => h.textContent)];")
        height = driver.execute_script("return document.body.scrollHeight;")
        driver.set_window_size(width, min(max(int(height), 600), 16000))
        driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    return PageCheck(errors, broken, counts[0], counts[1], counts[2], Path(screenshot))
