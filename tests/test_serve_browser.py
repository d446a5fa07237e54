"""The search page in a real browser: headless Chromium (Debian's chromium + chromium-driver,
driven by selenium) against `finegrain serve` started as a user starts it, from the command line.

The page loads with nothing from elsewhere, a demo photo picked with the file input finds
itself first in the grid (coloured as the same class, since the server knows the photo), the
classifier's top classes appear, a photo dropped on the page is searched too, the file input is
reachable with the keyboard, and a phone-sized window needs no sideways scrolling.
Screenshots are saved under pytest's tmp path (printed with -s); docs/serve.png is one of them.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver import ActionChains
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from test_serve import build_demo_index, item_ids, small_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="chromium and chromedriver not found on PATH: "
                                       "apt-get install -y chromium chromium-driver (.ci/run does)")
K = 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("browser")
    found = build_demo_index(root)
    classes = sorted(folder.name for folder in found["photos"].iterdir())
    found["classifier"] = small_model(root / "classifier.safetensors", classes=classes)
    return found


@pytest.fixture(scope="module")
def server_url(demo):
    """`finegrain serve --port 0` in its own process; the port is read from uvicorn's start-up line."""
    log = demo["root"] / "server.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "finegrain", "serve", "--index", str(demo["index"]),
                                    "--classifier", str(demo["classifier"]), "--port", "0"],
                                   stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline, found = time.monotonic() + 180, None
        while found is None:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()}"
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:[0-9]+)", log.read_text())
            time.sleep(0.1)
        yield found.group(1)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, log.read_text()  # a clean shutdown on Ctrl-C


@pytest.fixture(scope="module")
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait(driver, condition, seconds: float = 60):
    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(lambda _: condition())


def first_neighbour(driver):
    cells = driver.find_elements(By.CSS_SELECTOR, "#neighbours li")
    return cells[0] if cells else None


def thumbnails_loaded(driver) -> bool:
    return driver.execute_script("const images = [...document.querySelectorAll('#neighbours img')];"
                                 "return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0);")


def test_a_picked_photo_finds_itself_first_with_its_class_and_the_top_classes(demo, server_url, browser, tmp_path):
    browser.get(server_url)
    wait(browser, lambda: "images" in browser.find_element(By.ID, "facts").text)
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys(str(K))
    photo = sorted(demo["photos"].glob("*/*.jpg"))[10]
    expected = item_ids(demo["index"])[str(photo.resolve())]
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait(browser, lambda: (cell := first_neighbour(browser)) is not None
         and cell.get_attribute("data-id") == str(expected))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#neighbours li")) == K
    first = first_neighbour(browser)
    assert "match" in first.get_attribute("class").split()  # the server knows this photo's class
    assert first.find_element(By.CLASS_NAME, "label").text == photo.parent.name
    assert first.find_element(By.CLASS_NAME, "score").text == "1.0000"
    assert photo.parent.name in browser.find_element(By.ID, "query-caption").text
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#class-list li")) == 5)
    wait(browser, lambda: thumbnails_loaded(browser))
    shot = tmp_path / "serve-desktop.png"
    browser.save_screenshot(str(shot))
    print(f"\nscreenshot: {shot}")
    assert shot.stat().st_size > 10_000


def test_a_dropped_photo_is_searched(demo, server_url, browser):
    browser.get(server_url)
    wait(browser, lambda: "images" in browser.find_element(By.ID, "facts").text)
    photo = sorted(demo["photos"].glob("*/*.jpg"))[30]
    expected = item_ids(demo["index"])[str(photo.resolve())]
    # A real File object for the drop event: selenium can only hand files to a file input.
    browser.execute_script("const input = document.createElement('input'); input.type = 'file';"
                           "input.id = 'drop-source'; document.body.append(input);")
    browser.find_element(By.ID, "drop-source").send_keys(str(photo))
    browser.execute_script("const transfer = new DataTransfer();"
                           "transfer.items.add(document.getElementById('drop-source').files[0]);"
                           "document.getElementById('drop').dispatchEvent(new DragEvent('drop', "
                           "{dataTransfer: transfer, bubbles: true, cancelable: true}));")
    wait(browser, lambda: (cell := first_neighbour(browser)) is not None
         and cell.get_attribute("data-id") == str(expected))


def test_the_file_input_is_reachable_by_keyboard_and_a_phone_window_needs_no_sideways_scroll(
        demo, server_url, browser, tmp_path):
    browser.get(server_url)
    wait(browser, lambda: "images" in browser.find_element(By.ID, "facts").text)
    reached = []
    for _ in range(3):  # the file input is the first thing Tab reaches
        ActionChains(browser).send_keys(Keys.TAB).perform()
        reached.append(browser.execute_script("return document.activeElement.id"))
    assert reached[0] == "file" and "k" in reached, reached
    outline = browser.execute_script("return getComputedStyle(document.getElementById('drop')).outlineStyle")
    assert reached[-1] != "file" or outline != "none"
    browser.set_window_size(390, 844)
    try:
        browser.find_element(By.ID, "file").send_keys(str(sorted(demo["photos"].glob("*/*.jpg"))[0]))
        wait(browser, lambda: first_neighbour(browser) is not None and thumbnails_loaded(browser))
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        grid = browser.find_element(By.ID, "neighbours").rect
        assert grid["width"] <= 390
        shot = tmp_path / "serve-phone.png"
        browser.save_screenshot(str(shot))
        print(f"\nscreenshot: {shot}")
    finally:
        browser.set_window_size(1280, 1000)
