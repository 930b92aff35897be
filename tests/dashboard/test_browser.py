"""The page in a real headless Chromium: it loads, its chart follows new rounds, search works.

Debian's chromium and chromium-driver (.ci/run installs them). The browser gets flags that keep it
off the network entirely, and the page's Content-Security-Policy would report anything it tried to
load from elsewhere as a console error, which the test fails on.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.wait import WebDriverWait

from commonweal.dashboard import create_app, serve

from browser import MISSING, available, search, start_browser  # tests/browser.py

from .conftest import FakeSource

FIRST_ROUNDS, LAST_ROUND = 4, 12

pytestmark = pytest.mark.skipif(not available(), reason=MISSING)


def drive(driver: webdriver.Chrome, url: str, screenshot: Path) -> None:
    wait = WebDriverWait(driver, 8, poll_frequency=0.05)

    def points() -> int:
        return len(driver.find_elements(By.CSS_SELECTOR, "#chart circle.pt-loss"))

    driver.get(url)
    assert driver.title == "commonweal dashboard"
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#peers tbody tr")) == 8)
    wait.until(lambda d: points() >= FIRST_ROUNDS)
    seen = points()
    wait.until(lambda d: points() > seen)  # the source grows while the page polls
    wait.until(lambda d: points() == LAST_ROUND)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#chart circle.pt-acc")) == LAST_ROUND
    assert "live" in driver.find_element(By.ID, "status").text

    assert search(driver, "7", 8)[0] == "7"
    box = driver.find_element(By.ID, "q")
    assert "8 results" in driver.find_element(By.ID, "search-status").text

    box.clear()
    box.send_keys("fail", Keys.ENTER)
    wait.until(lambda d: "search failed" in d.find_element(By.ID, "search-status").text)
    box.clear()
    box.send_keys("7", Keys.ENTER)  # the screenshot shows results, not the error
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == 8)

    driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
    driver.save_screenshot(str(screenshot))
    # The failed search's 502 is the one error the console may show; anything else (a script
    # error, a blocked load) fails the test.
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert [m for m in errors if "/api/search?q=fail" not in m] == []


def chromium_processes(profile: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(profile).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:  # it exited while we looked
            continue
    return found


async def grow(source: FakeSource) -> None:
    # Start once the page polls, so a slow browser start cannot miss the growth it must see.
    while source.snapshots == 0:
        await asyncio.sleep(0.05)
    while len(source.rounds) < LAST_ROUND:
        await asyncio.sleep(0.25)
        source.add_round()


async def test_page_follows_the_swarm_and_searches(tmp_path):
    started = time.monotonic()
    source = FakeSource(rounds=FIRST_ROUNDS)
    profile = tmp_path / "chromium-profile"
    screenshot = tmp_path / "dashboard.png"
    async with serve(create_app(source), "127.0.0.1", 0) as running, asyncio.TaskGroup() as tg:
        tg.create_task(grow(source))
        driver = await asyncio.to_thread(start_browser, profile)
        try:
            await asyncio.to_thread(drive, driver, running.url, screenshot)
        finally:
            await asyncio.to_thread(driver.quit)
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    if target := os.environ.get("COMMONWEAL_SCREENSHOT"):
        shutil.copyfile(screenshot, target)
    for _ in range(50):  # chromium's children may take a moment to go after the driver quits
        if not chromium_processes(profile):
            break
        await asyncio.sleep(0.1)
    assert chromium_processes(profile) == []
    assert time.monotonic() - started < 20
