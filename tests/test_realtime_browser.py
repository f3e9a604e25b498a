"""realtime.py's page in a real headless Chromium whose fake microphone plays a WAV (1 s of silence, 2 s of
speech, 3 s of silence): the avatar arrives at its size, its mouth is redrawn while the WAV speaks and is the
source's while it is silent. A screenshot is saved under the test's temporary folder."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests import test_realtime_server
from tests.chromium import start_chromium
from tests.test_realtime_server import start

sync, media = test_realtime_server.sync, test_realtime_server.media  # the fixtures, shared
WAIT = 60  # seconds any one step may take on 2 busy cores
ROWS, COLS = (70, 106), (35, 115)  # the mouth region (as tests/test_realtime_server.MOUTH)

# Every 80 ms, the mouth region of the video's current frame, grey, every other pixel, into window.mouths.
SAMPLE_MOUTHS = f"""
window.mouths = [];
const canvas = document.createElement("canvas");
const video = document.getElementById("avatar");
canvas.width = video.videoWidth; canvas.height = video.videoHeight;
const context = canvas.getContext("2d", {{willReadFrequently: true}});
window.sampler = setInterval(() => {{
  context.drawImage(video, 0, 0);
  const data = context.getImageData({COLS[0]}, {ROWS[0]}, {COLS[1] - COLS[0]}, {ROWS[1] - ROWS[0]}).data;
  const grey = [];
  for (let y = 0; y < {ROWS[1] - ROWS[0]}; y += 2)
    for (let x = 0; x < {COLS[1] - COLS[0]}; x += 2) {{
      const i = 4 * (y * {COLS[1] - COLS[0]} + x);
      grey.push(Math.round((data[i] + data[i + 1] + data[i + 2]) / 3));
    }}
  window.mouths.push(grey);
}}, 80);
"""


def grey_mouth(frame_bgr: np.ndarray) -> np.ndarray:
    region = frame_bgr[ROWS[0] : ROWS[1] : 2, COLS[0] : COLS[1] : 2].astype(float)
    return np.round(region.sum(-1) / 3).ravel()


@pytest.fixture
def browser(media):
    driver = start_chromium("--window-size=900,800", "--use-fake-ui-for-media-stream",
                            "--use-fake-device-for-media-stream",
                            f"--use-file-for-fake-audio-capture={media['talk']}%noloop")  # fmt: skip
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_in_chromium_lip_syncs_its_microphone(sync, media, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = start(sync, media)
    try:
        wait = WebDriverWait(browser, WAIT, 0.2).until
        browser.get(server.url)
        wait(lambda d: d.execute_script("const v = document.getElementById('avatar'); "
                                        "return v.readyState >= 2 && v.videoWidth > 0 && !v.paused"))  # fmt: skip
        size = browser.execute_script(
            "const v = document.getElementById('avatar'); return [v.videoWidth, v.videoHeight]"
        )
        assert size == [160, 128]
        browser.execute_script(SAMPLE_MOUTHS)
        browser.find_element(By.ID, "talk").click()
        wait(lambda d: d.find_element(By.ID, "talk").text == "stop talking")
        time.sleep(10.0)
        mouths = np.array(browser.execute_script("clearInterval(window.sampler); return window.mouths"), float)
        browser.save_screenshot(str(tmp_path / "avatar.png"))
        figures = browser.find_element(By.ID, "figures").text
    finally:
        server.stop()
    sources = [grey_mouth(frame) for frame in server.server.avatar.frames]
    errors = np.array([min(np.abs(m - s).mean() for s in sources) for m in mouths])
    assert len(errors) > 60
    assert (errors > 15).sum() >= 5, errors.round(1)  # the mouth was redrawn while the WAV spoke
    assert (errors[6:12] < 6).all(), errors[:12].round(1)  # silence first: the source frames (once VP8 settled)
    assert (errors[-12:] < 6).all(), errors[-20:].round(1)  # silence again
    assert "latency:" in figures and "- ms" not in figures
    assert (tmp_path / "avatar.png").stat().st_size > 1000
