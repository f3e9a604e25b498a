"""app.py's restoration controls: the enhancer and its weights, CodeFormer's fidelity slider, the unsharp mask's
amount, the before/after picture of the preview frame, and a job with an enhancer; in headless Chromium as a
person uses them (a screenshot of each step under the test's temporary folder), and in Python. The weight-free
enhancer (sharpen) stands in for the restorers, whose networks take seconds a face here.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.app_page import WAIT, Page, make_app, serve_app
from tests.media import FakeDetector, write_video, write_wav
from webapp import controls, page, restore

FRAMES, SECONDS = 6, 0.24
BOX = "20 100 30 120"  # top bottom left right, around the test frames' face


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("app restore media")
    return {"video": write_video(d / "face.mp4", FRAMES), "speech": write_wav(d / "speech.wav", SECONDS), "dir": d}


@pytest.fixture(scope="module")
def server(wav2lip_checkpoint, tmp_path_factory) -> Iterator[str]:
    demo = page.build_app(str(wav2lip_checkpoint), detector=FakeDetector(), work_dir=tmp_path_factory.mktemp("ws"))
    with serve_app(demo) as url:
        yield url


def test_restore_options_are_controls_and_model_options():
    assert set(restore.RESTORE_FIELDS) <= set(controls.page_fields())
    model, clip = controls.split_options({"checkpoint_path": "w.pth", "enhancer": "codeformer", "enhancer_path": "",
                                          "fidelity_weight": 0.7, "sharpen_amount": 1.5})  # fmt: skip
    assert model["enhancer"] == "codeformer" and model["enhancer_path"] is None  # empty: checkpoints/codeformer.pth
    assert clip["fidelity_weight"] == 0.7 and clip["sharpen_amount"] == 1.5


def halves(picture: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The before and after pictures (a 4-pixel white bar between them)."""
    width = (picture.shape[1] - 4) // 2
    return picture[:, :width].astype(int), picture[:, width + 4 :].astype(int)


def test_compare_shows_the_frame_before_and_after(media, wav2lip_checkpoint, tmp_path):
    web = make_app(tmp_path)
    picture, line = web.compare(str(media["video"]), str(media["speech"]), 2, checkpoint_path=str(wav2lip_checkpoint),
                                box=BOX, enhancer="sharpen", sharpen_amount=2.0)  # fmt: skip
    assert line.startswith("frame 2: before (left) and after (right) sharpen, sharpen_amount 2.0"), line
    before, after = halves(picture)
    assert before.shape == after.shape and before.shape[0] >= restore.SHOWN_HEIGHT
    changed = np.abs(after - before).max(-1) > 0
    assert changed.mean() > 0.05  # the face is sharper...
    assert not changed[:, :10].any() and not changed[:10].any()  # ...and nothing around it changed
    _, line = web.compare(str(media["video"]), str(media["speech"]), 2, checkpoint_path=str(wav2lip_checkpoint),
                          box=BOX)  # fmt: skip
    assert line.startswith("Error: choose an enhancer"), line
    _, line = web.compare(str(media["video"]), None, 2, checkpoint_path=str(wav2lip_checkpoint), box=BOX,
                          enhancer="sharpen")  # fmt: skip
    assert line.startswith("Error: ") and "speech" in line, line


def test_page_restore_controls_compare_and_generate(server, media, tmp_path):
    from tests.chromium import start_chromium

    driver = start_chromium("--window-size=1400,2200", page_load_timeout=WAIT)
    try:
        page = Page(driver, server, tmp_path / "screenshots")
        page.upload("face", media["video"])
        page.upload("audio", media["speech"])
        page.find("#restore button")[0].click()  # open the section
        page.wait(lambda d: page.find("#opt-enhancer input") and page.find("#opt-enhancer input")[0].is_displayed())
        slider = page.find("#opt-fidelity_weight input[type=range]")[0]
        assert (slider.get_attribute("min"), slider.get_attribute("max"), slider.get_attribute("value")) == (
            "0",
            "1",
            "0.5",
        )
        page.choose("opt-enhancer", "sharpen")
        page.type_into("opt-sharpen_amount", "2")
        page.shot("restore-controls")

        line = page.click_and_wait_for("compare-button", "compare-line", "after (right)", timeout=120)
        page.wait(lambda d: page.find("#compare img[src]"))
        page.shot("restore-before-after")
        assert "sharpen, sharpen_amount 2.0" in line, line
        with urllib.request.urlopen(page.find("#compare img")[0].get_attribute("src"), timeout=WAIT) as r:
            before, after = halves(cv2.imdecode(np.frombuffer(r.read(), np.uint8), cv2.IMREAD_COLOR))
        assert (np.abs(after - before).max(-1) > 0).mean() > 0.05  # the two halves differ in the face

        status = page.click_and_wait_for("generate", "status", "frames", timeout=240)
        page.wait(lambda d: page.find("#result video[src]"))
        page.shot("restore-result")
        assert status.startswith(f"{FRAMES} frames") and "a face in every frame" in status
    finally:
        driver.quit()
