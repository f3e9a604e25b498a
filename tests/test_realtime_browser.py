"""realtime.py's page in a real headless Chromium whose fake microphone plays a WAV (1 s of silence, 2 s of
speech, 3 s of silence): the avatar arrives at its size; every frame the page shows is the offline frame of
its tick (read from the stamp the server draws in a test-only setting), generated while the WAV speaks and
the source's while it is silent; nothing is dropped; the figures show; and when the browser closes, its
session leaves the server within seconds. A screenshot is saved under the test's temporary folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest

from live.webrtc import INACTIVE_S, STAMP_PX, TICK_BITS
from tests.chromium import start_chromium
from tests.live_frames import MOUTH, VP8_MARGIN, MelPainter, expected_ticks, tick_of
from tests.live_server import Recorder, health, start

WAIT = 60  # seconds any one step may take on 2 busy cores
ROWS, COLS = (MOUTH[0].start, MOUTH[0].stop), (MOUTH[1].start, MOUTH[1].stop)
STAMP_W, STAMP_H = TICK_BITS * STAMP_PX, 2 * STAMP_PX

# Every 80 ms, the current frame's tick stamp (grey) and its mouth region (grey, every other pixel).
SAMPLE = f"""
window.samples = [];
const canvas = document.createElement("canvas");
const video = document.getElementById("avatar");
canvas.width = video.videoWidth; canvas.height = video.videoHeight;
const context = canvas.getContext("2d", {{willReadFrequently: true}});
const grey = (x0, y0, w, h, step) => {{
  const data = context.getImageData(x0, y0, w, h).data, out = [];
  for (let y = 0; y < h; y += step)
    for (let x = 0; x < w; x += step) {{
      const i = 4 * (y * w + x);
      out.push(Math.round((data[i] + data[i + 1] + data[i + 2]) / 3));
    }}
  return out;
}};
window.sampler = setInterval(() => {{
  context.drawImage(video, 0, 0);
  window.samples.push([grey(0, 0, {STAMP_W}, {STAMP_H}, 1),
                       grey({COLS[0]}, {ROWS[0]}, {COLS[1] - COLS[0]}, {ROWS[1] - ROWS[0]}, 2)]);
}}, 80);
"""


def grey_mouth(frame_bgr: np.ndarray) -> np.ndarray:
    region = frame_bgr[ROWS[0] : ROWS[1] : 2, COLS[0] : COLS[1] : 2].astype(float)
    return np.round(region.sum(-1) / 3).ravel()


@pytest.fixture
def browser(talk_media):
    driver = start_chromium("--window-size=900,800", "--use-fake-ui-for-media-stream",
                            "--use-fake-device-for-media-stream",
                            f"--use-file-for-fake-audio-capture={talk_media['talk']}%noloop")  # fmt: skip
    try:
        yield driver
    finally:
        with contextlib.suppress(Exception):  # the test may have closed it already
            driver.quit()


def test_the_page_shows_the_offline_frame_of_every_tick(painted_sync, talk_media, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = start(painted_sync, talk_media["video"])
    try:
        wait = WebDriverWait(browser, WAIT, 0.2).until
        browser.get(server.url)
        wait(lambda d: d.execute_script("const v = document.getElementById('avatar'); "
                                        "return v.readyState >= 2 && v.videoWidth > 0 && !v.paused"))  # fmt: skip
        size = browser.execute_script(
            "const v = document.getElementById('avatar'); return [v.videoWidth, v.videoHeight]"
        )
        assert size == [160, 128]
        (peer,) = server.server.peers.values()
        recorder = Recorder(peer.session)
        browser.execute_script(SAMPLE)
        browser.find_element(By.ID, "talk").click()
        wait(lambda d: d.find_element(By.ID, "talk").text == "stop talking")
        time.sleep(10.0)
        samples = browser.execute_script("clearInterval(window.sampler); return window.samples")
        browser.save_screenshot(str(tmp_path / "avatar.png"))
        text = browser.find_element(By.ID, "figures").text
        figures = asyncio.run(health(server.url, session=peer.id))
        browser.quit()  # the browser closes: its session leaves within seconds
        closed = time.monotonic()
        while server.server.peers and time.monotonic() - closed < 30:
            time.sleep(0.2)
        gone = time.monotonic() - closed
    finally:
        server.stop()
    assert gone <= INACTIVE_S + 4, f"the closed browser's session left after {gone:.1f} s"
    (mine,) = figures["sessions"]
    assert mine["dropped"] == mine["errors"] == 0 and mine["generated"] >= 45, mine
    assert "latency:" in text and "- ms" not in text and "errors: 0" in text
    assert (tmp_path / "avatar.png").stat().st_size > 1000
    generated, source = compare(samples, server.server.avatar, recorder)
    assert len(generated) >= 10 and len(source) >= 40, (len(generated), len(source))
    assert (generated < VP8_MARGIN).mean() >= 0.9, generated.round(1)  # the speech's own frames
    assert (source < VP8_MARGIN).mean() >= 0.9, source.round(1)  # silence: the source frames


def compare(samples: list, avatar, recorder: Recorder) -> tuple[np.ndarray, np.ndarray]:
    """The mouth errors of the samples whose tick's offline frame is generated, and of those where it is the
    source (the samples whose stamp the browser's decoder blurred are left out)."""
    ticks = [tick_of(np.array(stamp, float).reshape(STAMP_H, STAMP_W)) for stamp, _ in samples]
    assert sum(t is not None for t in ticks) >= 0.9 * len(samples), "the tick stamps did not survive VP8"
    last = max(t for t in ticks if t is not None)
    expected = expected_ticks(avatar, MelPainter(), recorder.wav, recorder.frame_ticks(avatar.fps), last + 1)
    generated, source = [], []
    for (_, mouth), tick in zip(samples, ticks, strict=True):
        if tick is None:
            continue
        error = float(np.abs(np.array(mouth, float) - grey_mouth(expected[tick])).mean())
        is_source = np.array_equal(expected[tick], avatar.frames[tick % len(avatar.frames)])
        (source if is_source else generated).append(error)
    return np.array(generated), np.array(source)
