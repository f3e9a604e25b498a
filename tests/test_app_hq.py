"""app.py's Wav2Lip-HQ controls: the two weight files typed in their own section, the mask's options, the
preview of the face parser's mask over the chosen frame, and a job with both networks; in headless Chromium
as a person uses them (a screenshot of each step under the test's temporary folder), and in Python.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from common import video
from tests.app_page import WAIT, Page, make_app, serve_app
from tests.media import FakeDetector, write_video, write_wav
from webapp import controls, hq, page

FRAMES, SECONDS = 6, 0.24


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("app hq media")
    return {"video": write_video(d / "face.mp4", FRAMES), "speech": write_wav(d / "speech.wav", SECONDS), "dir": d}


@pytest.fixture(scope="module")
def server(wav2lip_checkpoint, tmp_path_factory) -> Iterator[str]:
    demo = page.build_app(str(wav2lip_checkpoint), detector=FakeDetector(), work_dir=tmp_path_factory.mktemp("ws"))
    with serve_app(demo) as url:
        yield url


def tinted(image_bgr: np.ndarray, source_bgr: np.ndarray) -> np.ndarray:
    """Pixels the mask preview tinted: drawn towards cyan (BGR 255, 255, 0): red well below the source's, blue
    and green not below (the green crop rectangle loses its blue)."""
    image, source = image_bgr.astype(int), source_bgr.astype(int)
    return (source[..., 2] - image[..., 2] > 40) & (image[..., :2] - source[..., :2] >= -3).all(-1)


def test_hq_options_are_controls_and_model_options():
    fields = controls.page_fields()
    assert set(hq.HQ_FIELDS) <= set(fields)
    model, clip = controls.split_options({"checkpoint_path": "w.pth", "sr_path": "", "segmentation_path": "p.pth",
                                          "hq_mode": "soft", "mask_region": "mouth"})  # fmt: skip
    assert model["sr_path"] is None and model["segmentation_path"] == "p.pth"  # empty: off
    assert clip["hq_mode"] == "soft" and clip["mask_region"] == "mouth"


def test_preview_shows_the_mask(media, wav2lip_checkpoint, parser_weights, tmp_path):
    web = make_app(tmp_path)
    source = list(video.iter_frames(media["video"]))[2]
    bgr = lambda rgb: cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)  # noqa: E731
    plain, _ = web.preview(str(media["video"]), 2, checkpoint_path=str(wav2lip_checkpoint))
    image, line = web.preview(str(media["video"]), 2, checkpoint_path=str(wav2lip_checkpoint),
                              segmentation_path=str(parser_weights))  # fmt: skip
    assert "Cyan: where the generated face goes (face parser, mask_region face, hq_mode fork)" in line
    face = tinted(bgr(image), source)
    assert face.sum() > 500 and not tinted(bgr(plain), source).any()
    mouth, _ = web.preview(str(media["video"]), 2, checkpoint_path=str(wav2lip_checkpoint),
                           segmentation_path=str(parser_weights), mask_region="lower_face", hq_mode="soft")  # fmt: skip
    assert 0 < tinted(bgr(mouth), source).sum() < face.sum()  # the lower half only: less


def test_page_hq_controls_preview_and_generate(server, media, esrgan_small, parser_weights, tmp_path):
    from tests.chromium import start_chromium

    driver = start_chromium("--window-size=1400,1900", page_load_timeout=WAIT)
    try:
        page = Page(driver, server, tmp_path / "screenshots")
        page.upload("face", media["video"])
        page.upload("audio", media["speech"])
        page.find("#hq button")[0].click()  # open the section
        page.wait(lambda d: page.find("#opt-sr_path input") and page.find("#opt-sr_path input")[0].is_displayed())
        page.type_into("opt-sr_path", str(esrgan_small))
        page.type_into("opt-segmentation_path", str(parser_weights))
        page.shot("hq-controls")

        line = page.click_and_wait_for("preview-button", "preview-line", "Cyan", timeout=120)
        page.wait(lambda d: page.find("#preview img[src]"))
        page.shot("hq-preview")
        assert "face detected" in line and "mask_region face" in line
        with urllib.request.urlopen(page.find("#preview img")[0].get_attribute("src"), timeout=WAIT) as r:
            image = cv2.imdecode(np.frombuffer(r.read(), np.uint8), cv2.IMREAD_COLOR)
        assert tinted(image, list(video.iter_frames(media["video"]))[0]).sum() > 500  # the mask, over the frame

        status = page.click_and_wait_for("generate", "status", "frames", timeout=240)
        page.wait(lambda d: page.find("#result video[src]"))
        page.shot("hq-result")
        assert status.startswith(f"{FRAMES} frames") and "a face in every frame" in status
    finally:
        driver.quit()
