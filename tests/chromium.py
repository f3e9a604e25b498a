"""A real headless Chromium for the page tests (Debian's `chromium` and `chromedriver`; .ci/run installs them).

Without a browser the page tests skip, unless REQUIRE_BROWSER=1 (as .ci/run sets it): then they fail, so
that CI cannot pass without having run them.
"""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
HEADLESS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
            "--mute-audio")  # fmt: skip


def require_chromium():
    """selenium's webdriver module, once a browser and its driver are known to be there; else skip the test
    (fail it under REQUIRE_BROWSER=1)."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        missing("no chromium/chromedriver (CI installs them: apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
    except ImportError as e:
        missing(f"no selenium ({e})")
    return webdriver


def missing(what: str) -> None:
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail(f"{what}, and REQUIRE_BROWSER=1 requires the browser tests to run")
    pytest.skip(what)


def start_chromium(*flags: str, page_load_timeout: float = 60):
    """A selenium driver of a headless Chromium started with `flags` too (`require_chromium` first)."""
    webdriver = require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*HEADLESS, *flags):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(page_load_timeout)
    return driver
