"""Fixtures shared by several test files; each is small and documented in one line.

The deterministic weights come from tools/detweights.py (shared with bench/); the goldens and test media
live in tests/data.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from audio import save_wav
from lipsync.generation import Generator
from lipsync.options import ModelOptions
from lipsync.pipeline import LipSync
from tests.media import FakeDetector, speech, write_video
from tools.detweights import det_state_dict

REPO = Path(__file__).resolve().parent.parent  # the repository root, where the scripts live


@pytest.fixture(scope="session", autouse=True)
def no_analytics() -> Iterator[None]:
    """Gradio sends no usage analytics from any test (the app's pages, and scripts run as subprocesses)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        yield


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root: the working directory of a script run as a subprocess."""
    return REPO


@pytest.fixture(scope="session")
def wav2lip_weights() -> OrderedDict[str, torch.Tensor]:
    """The deterministic Wav2Lip state dict, built once: copy it before changing it."""
    return det_state_dict("Wav2Lip")


@pytest.fixture(scope="session")
def wav2lip_checkpoint(tmp_path_factory, wav2lip_weights) -> Path:
    """A Wav2Lip checkpoint file of the deterministic weights, in the original training container."""
    path = tmp_path_factory.mktemp("wav2lip") / "wav2lip_det.pth"
    torch.save({"state_dict": wav2lip_weights, "optimizer": None, "global_step": 0, "global_epoch": 0}, path)
    return path


@pytest.fixture(scope="session")
def s3fd_weights(tmp_path_factory) -> Path:
    """An S3FD weights file (a raw state dict, as the released s3fd.pth) of the deterministic weights."""
    path = tmp_path_factory.mktemp("s3fd") / "s3fd.pth"
    torch.save(det_state_dict("s3fd"), path)
    return path


@pytest.fixture(scope="session")
def sync(wav2lip_checkpoint) -> LipSync:
    """A `lipsync.LipSync` of the deterministic weights (fp32, CPU) with the fake detector of tests/media.py."""
    return LipSync(ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu"), detector=FakeDetector(), quiet=True)


@pytest.fixture(scope="session")
def painted_sync(wav2lip_checkpoint) -> LipSync:
    """As `sync`, with `tests.live_frames.MelPainter` as its forward pass: its mouth shows which mel window and
    crop it was given, so a live frame can be told from its neighbours' (the test weights' mouth hardly
    depends on the audio)."""
    from tests.live_frames import MelPainter  # (imports aiortc: only the realtime tests need it)

    painted = LipSync(
        ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu"), detector=FakeDetector(), quiet=True
    )
    painted.generator = Generator(MelPainter(), painted.device, quiet=True)
    return painted


@pytest.fixture(scope="session")
def talk_media(tmp_path_factory) -> dict[str, Path]:
    """The server tests' media: a 25-frame 160x128 face video, a WAV of 1 s of silence, 2 s of speech and 3 s
    of silence (the microphone, or /speak), and a text file (a bad upload)."""
    d = tmp_path_factory.mktemp("talk media")
    talk = np.concatenate([np.zeros(16000, np.float32), speech(2.0), np.zeros(48000, np.float32)])
    save_wav(talk, d / "talk.wav", 16000)
    notes = d / "notes.txt"
    notes.write_text("not audio\n" * 100)
    return {"video": write_video(d / "face.mp4", 25), "talk": d / "talk.wav", "notes": notes, "dir": d}


@pytest.fixture(scope="session")
def esrgan_small(tmp_path_factory) -> Path:
    """A small ×4 ESRGAN (16 features, 2 blocks: the pipeline's tests need speed, not the real size) of the
    stand-in weights, in BasicSR's container as esrgan_yunying.pth."""
    from models.rrdbnet import RRDBNet
    from tools.detweights import sr_stand_in

    path = tmp_path_factory.mktemp("esrgan") / "esrgan_small.pth"
    torch.save({"params": sr_stand_in(RRDBNet(num_feat=16, num_block=2, num_grow_ch=8))}, path)
    return path


@pytest.fixture(scope="session")
def parser_weights(tmp_path_factory) -> Path:
    """A face-parser file (a raw BiSeNet state dict, as face_segmentation.pth) of the stand-in weights."""
    from models.bisenet import BiSeNet
    from tools.detweights import parser_stand_in

    path = tmp_path_factory.mktemp("bisenet") / "face_segmentation.pth"
    torch.save(parser_stand_in(BiSeNet()), path)
    return path


BROWSER_SKIPS = ("no chromium/chromedriver", "no selenium")  # tests/chromium.py's reasons to skip a browser test


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Say, in pytest's summary, that the browser tests were skipped and how to run them: a plain `pytest`
    on a machine without Chromium would otherwise pass without them, unnoticed."""
    reports = terminalreporter.stats.get("skipped", [])
    skipped = [r for r in reports if any(reason in str(r.longrepr) for reason in BROWSER_SKIPS)]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} browser tests did not run: no chromium/chromedriver on PATH (or no selenium). To run "
            "them, install them (Debian/Ubuntu: apt-get install chromium chromium-driver; pip install -r "
            "requirements-dev.txt) and run pytest again.",
            yellow=True,
            bold=True,
        )
