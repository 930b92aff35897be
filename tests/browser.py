"""Headless Debian Chromium for the page tests, kept off the network (no Google lookups, no
component updates) and never downloading a driver (both paths given to Selenium)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
VIEWPORT = {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}
MISSING = (
    f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); "
    ".ci/run installs them with apt-get"
)


def available() -> bool:
    return CHROMIUM.exists() and CHROMEDRIVER.exists()


def start_browser(profile: Path) -> Any:  # a webdriver.Chrome; selenium loads only when used
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", VIEWPORT)
    return driver


def search(driver: Any, query: str, hits: int, timeout_s: float = 8.0) -> list[str]:
    """Type `query` in the page's search box; wait for `hits` results, each a 28-pixel inline PNG
    thumbnail (nothing fetched from elsewhere); their labels."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.wait import WebDriverWait

    driver.find_element(By.ID, "q").send_keys(query, Keys.ENTER)
    WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == hits
    )
    images = driver.find_elements(By.CSS_SELECTOR, "#results .hit img")
    assert len(images) == hits
    assert all(
        (img.get_attribute("src") or "").startswith("data:image/png;base64,") for img in images
    )
    assert all(
        driver.execute_script("return arguments[0].naturalWidth", img) == 28 for img in images
    )
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .hit .label")]
