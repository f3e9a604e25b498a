"""app.py as its users meet it: the page in a real headless Chromium, and `/lipsync` through gradio_client.

One server (a deterministic checkpoint, an injected detector that finds the test face exactly, a
deterministic SyncNet model) serves every test of this module on 127.0.0.1; the browser tests save a
screenshot of each step under their temporary folder.
"""

from __future__ import annotations

import types
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import gradio_client
import numpy as np
import pytest
import torch

import inference
from common.errors import UserError
from lipsync.options import Options
from tests.app_page import WAIT, Page, make_app, serve_app
from tests.chromium import start_chromium
from tests.media import FakeDetector, read_output, write_video, write_wav
from tools.detweights import det_state_dict
from webapp import controls, jobs, page

FRAMES, SECONDS = 15, 0.6  # a 160x128 clip of 0.6 s at 25 fps, and speech as long
BOX = "20 100 30 120"  # top bottom left right, inside the test frames


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("app media")
    syncnet = d / "syncnet_v2.model"
    torch.save(det_state_dict("syncnet_python_S"), syncnet)
    notes = d / "notes.txt"
    notes.write_text("not a video\n" * 20)
    return {
        "video": write_video(d / "face.mp4", FRAMES),
        "speech": write_wav(d / "speech.wav", SECONDS),
        "silent": write_wav(d / "silent.wav", 0.0, silent=True),  # a WAV of no samples at all
        "long": write_wav(d / "long.wav", 8.0),  # 200 frames: time to press Cancel
        "notes": notes,
        "syncnet": syncnet,
        "dir": d,
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app workspace")


@pytest.fixture(scope="module")
def server(media, wav2lip_checkpoint, workspace) -> Iterator[str]:
    """The app on 127.0.0.1 (no share link), stopped when the module's tests are done."""
    demo = page.build_app(str(wav2lip_checkpoint), syncnet_model=str(media["syncnet"]), detector=FakeDetector(),
                         work_dir=workspace)  # fmt: skip
    with serve_app(demo) as url:
        yield url


# ---------------------------------------------------------------- the options and the preview


def test_controls_come_from_the_one_declaration():
    fields = controls.page_fields()
    assert "pads" in fields and "box" in fields and "device" in fields and "quiet" not in fields
    for name, (f, hint) in fields.items():
        control = controls.control(f, hint)
        assert control.label == name and control.info == f.metadata["help"]
        assert controls.option_value(f, hint, control.value) == f.default  # the control starts at the declared default
    f, hint = fields["box"]
    assert controls.option_value(f, hint, "130 480 140 440") == (130, 480, 140, 440)
    with pytest.raises(UserError, match="--pads 'a b'"):
        controls.option_value(*fields["pads"], "a b")
    with pytest.raises(UserError, match="--box takes 4 integers"):
        Options(**controls.split_options({"checkpoint_path": "x.pth", "box": "1 2 3"})[1])


def test_preview_draws_the_face_box_and_the_mouth_crop(media, wav2lip_checkpoint, tmp_path):
    web = make_app(tmp_path)
    image, line = web.preview(str(media["video"]), 7, checkpoint_path=str(wav2lip_checkpoint), pads="0 10 0 0")
    assert image.shape == (128, 160, 3) and "frame 7" in line
    assert "face detected at (42, 33, 98, " in line  # face_frame(7), as the injected detector finds it
    assert tuple(image[101, 60]) == (0, 255, 0)  # the crop's bottom edge (chin + 10 px), green (RGB)
    assert image[85, 50, 1] < image[45, 50, 1] - 40  # the crop's lower half is shaded magenta, its upper half not
    _, line = web.preview(str(media["video"]), 99, checkpoint_path=str(wav2lip_checkpoint))
    assert "frame 14" in line  # past the end: the last frame
    image, line = web.preview(str(media["video"]), 0, checkpoint_path="missing.pth", box=BOX)
    assert "box (fixed)" in line and tuple(image[20, 30]) == (0, 255, 0)  # --box needs no model
    faceless = write_video(tmp_path / "faceless.mp4", 3, faceless=frozenset({0, 1, 2}))
    image, line = web.preview(str(faceless), 0, checkpoint_path=str(wav2lip_checkpoint))
    assert line.startswith("Warning: no face found in frame 0") and image is not None
    image, line = web.preview(str(media["notes"]), 0, checkpoint_path=str(wav2lip_checkpoint))
    assert image is None and line.startswith("Error: ") and "neither a video nor an image" in line


def test_cancel_stops_the_job_and_leaves_no_file(media, wav2lip_checkpoint, tmp_path):
    web = make_app(tmp_path)
    request = types.SimpleNamespace(session_hash="one tab")
    seen: list[str] = []

    def progress(value, desc=None, unit=None):
        seen.append(desc)
        if desc.startswith("generating and encoding: 3/"):
            web.cancel(request)

    options = {"checkpoint_path": str(wav2lip_checkpoint)}
    with pytest.raises(jobs.JobCancelledError):
        web.run(str(media["video"]), str(media["speech"]), options, request.session_hash, progress)
    assert f"detecting faces: {FRAMES}/{FRAMES} frames" in seen and not web.cancel_flags
    assert [p for p in web.workspace.root.rglob("*") if p.is_file()] == []  # no partial file
    result = web.run(str(media["video"]), str(media["speech"]), options, request.session_hash, lambda *a, **k: None)
    assert result.video.is_file() and f"{FRAMES} frames" in result.line and result.scores == ""


def test_one_generation_at_a_time(wav2lip_checkpoint, tmp_path):
    demo = page.build_app(str(wav2lip_checkpoint), detector=FakeDetector(), work_dir=tmp_path)
    jobs = {fn.name: fn for fn in demo.fns.values() if fn.name in ("generate", "lipsync")}
    assert jobs["lipsync"].api_name == "lipsync" and jobs["generate"].api_visibility == "private"
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in jobs.values()} == {("generate", 1)}  # page and API


def test_workspace_keeps_the_newest_jobs(tmp_path):
    workspace = jobs.Workspace(tmp_path)
    folders = [workspace.new_job() for _ in range(jobs.KEEP_JOBS + 3)]
    assert sorted(workspace.jobs.iterdir()) == folders[-jobs.KEEP_JOBS :]


# ---------------------------------------------------------------- /lipsync through gradio_client


def decoded_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]


def test_lipsync_api_equals_inference(server, media, wav2lip_checkpoint, tmp_path):
    client = gradio_client.Client(server, download_files=str(tmp_path / "downloads"), verbose=False)
    face, speech = gradio_client.handle_file(str(media["video"])), gradio_client.handle_file(str(media["speech"]))
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert list(api) == ["/lipsync"]
    assert [p["parameter_name"] for p in api["/lipsync"]["parameters"]] == ["face", "audio", "checkpoint_path",
                                                                            *controls.page_fields()]  # fmt: skip
    with pytest.raises(gradio_client.exceptions.AppError, match="missing.pth: file not found"):
        client.predict(face, speech, checkpoint_path=str(media["dir"] / "missing.pth"), api_name="/lipsync")
    got = client.predict(face, speech, box=BOX, blend="feather", pads="0 5 0 0", api_name="/lipsync")
    expected = tmp_path / "cli.mp4"
    inference.main(["--checkpoint_path", str(wav2lip_checkpoint), "--face", str(media["video"]), "--audio",
                    str(media["speech"]), "--outfile", str(expected), "--box", *BOX.split(), "--blend", "feather",
                    "--pads", "0", "5", "0", "0", "--quiet"])  # fmt: skip
    ours, theirs = decoded_frames(Path(got)), decoded_frames(expected)
    assert len(ours) == len(theirs) == FRAMES
    mse = np.mean([np.mean((a.astype(float) - b) ** 2) for a, b in zip(ours, theirs, strict=True)])
    assert mse == 0 or 10 * np.log10(255**2 / mse) >= 40  # PSNR
    mouth, source = (slice(65, 100), slice(40, 110)), decoded_frames(media["video"])[3]  # the box's lower half
    assert np.abs(ours[3][mouth].astype(int) - source[mouth]).mean() > 10  # redrawn (measured ~40; x264 alone ~2)
    _, seconds_v, seconds_a, _ = read_output(Path(got))
    assert seconds_a == pytest.approx(SECONDS, abs=0.03)


# ---------------------------------------------------------------- the page in Chromium


@pytest.fixture
def browser(tmp_path) -> Iterator[object]:
    driver = start_chromium("--window-size=1400,1700", page_load_timeout=WAIT)  # REQUIRE_BROWSER=1: no skip
    try:
        yield driver
    finally:
        driver.quit()


def test_page_previews_and_generates(server, media, browser, tmp_path):
    page = Page(browser, server, tmp_path / "screenshots")
    page.shot("page")
    page.upload("face", media["video"])
    page.upload("audio", media["speech"])
    page.shot("inputs")

    line = page.click_and_wait_for("preview-button", "preview-line", "face detected")
    page.wait(lambda d: page.find("#preview img[src]"))
    page.shot("preview")
    assert line.startswith("frame 0 (160x128")
    with urllib.request.urlopen(page.find("#preview img")[0].get_attribute("src"), timeout=WAIT) as r:
        image = cv2.imdecode(np.frombuffer(r.read(), np.uint8), cv2.IMREAD_COLOR)
    green = (image[..., 1] > 200) & (image[..., 0] < 60) & (image[..., 2] < 60)
    assert green.sum() > 100  # the crop's box is drawn

    status = page.click_and_wait_for("generate", "status", "frames", timeout=180)
    assert status.startswith(f"{FRAMES} frames ({SECONDS:.2f} s)") and "a face in every frame" in status
    page.wait(lambda d: page.find("#result video[src]"))
    video = page.find("#result video")[0]
    page.wait(lambda d: d.execute_script("return arguments[0].readyState", video) >= 1)
    duration = browser.execute_script("return arguments[0].duration", video)
    assert duration == pytest.approx(SECONDS, abs=0.05)  # the result covers the audio
    browser.execute_async_script("arguments[0].muted = true; arguments[0].play().then(arguments[1])", video)
    page.wait(lambda d: d.execute_script("return arguments[0].currentTime", video) > 0)
    page.wait(lambda d: "LSE-D" in page.find("#scores")[0].text)
    assert "result" in page.find("#scores")[0].text and "input frames, this speech" in page.find("#scores")[0].text
    assert page.find("#download")[0].is_displayed()  # the download button, shown once there is a result
    page.shot("result")


def test_page_shows_bad_inputs_and_keeps_serving(server, media, browser, wav2lip_checkpoint, tmp_path):
    page = Page(browser, server, tmp_path / "screenshots")
    page.upload("face", media["notes"])
    page.upload("audio", media["speech"])
    status = page.click_and_wait_for("generate", "status", "Error: ")
    page.shot("text-as-face")
    assert "notes.txt" in status and "neither a video nor an image" in status and "Traceback" not in status

    page = Page(browser, server, tmp_path / "screenshots")
    page.upload("face", media["video"])
    page.upload("audio", media["silent"])
    status = page.click_and_wait_for("generate", "status", "Error: ")
    page.shot("silent-wav")
    assert "silent.wav" in status and "empty" in status

    page = Page(browser, server, tmp_path / "screenshots")
    page.upload("face", media["video"])
    page.upload("audio", media["speech"])
    page.type_into("opt-checkpoint_path", "checkpoints/missing.pth")
    status = page.click_and_wait_for("generate", "status", "Error: ")
    page.shot("missing-checkpoint")
    assert status.startswith("Error: checkpoints/missing.pth: file not found") and "--checkpoint_path" in status

    page.type_into("opt-checkpoint_path", str(wav2lip_checkpoint))
    status = page.click_and_wait_for("generate", "status", "frames", timeout=180)
    page.shot("next-request")
    assert status.startswith(f"{FRAMES} frames")  # the app still serves


def test_page_cancel_stops_the_job_and_leaves_no_file(server, media, workspace, browser, tmp_path):
    page = Page(browser, server, tmp_path / "screenshots")
    page.upload("face", media["video"])
    page.upload("audio", media["long"])
    earlier = set((workspace / "jobs").iterdir())
    page.find("#generate")[0].click()
    page.wait(lambda d: "generating and encoding" in page.find("#result")[0].text)  # the progress bar, with counts
    page.shot("running")
    assert "/200 frames" in page.find("#result")[0].text
    status = page.click_and_wait_for("cancel", "status", "Cancelled")
    page.shot("cancelled")
    assert status == "Cancelled: the job stopped and wrote no file."
    (job,) = set((workspace / "jobs").iterdir()) - earlier
    page.wait(lambda d: not list(job.iterdir()))  # the partial file goes, and no result comes
