"""realtime.py's file mode: `--pace fast` is inference.py frame for frame; `--pace realtime` (a live session on
the real clock, with a budget the machine can meet) writes inference.py's frames at every tick, drops none,
and says which precision ran; silence shows the source; a generator that keeps failing ends the run.

The budgets here are generous (seconds): the tests run on 2 shared, busy cores, and a run's length is the
budget plus the speech (1 s). The live path's scheduling itself is tested on a simulated clock
(tests/test_realtime_live.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.devices import cpu_computes_bf16
from lipsync.generation import Generator
from lipsync.options import ModelOptions
from lipsync.pipeline import LipSync
from live import replay
from live import stream as streaming
from live.options import LiveOptions
from live.sessions import GeneratorError
from tests.live_frames import capture, offline_frames
from tests.media import FakeDetector, read_output, write_video, write_wav

BOX = (20, 110, 30, 120)
BOX_FLAGS = ["--box", *map(str, BOX)]
BUDGET_MS = 6000  # a budget 2 busy cores meet for 25 frames of the test weights
KEYS = {"frames", "generated", "dropped", "idle", "errors", "fps", "generated_fps", "first_frame_ms", "latency_ms",
        "precision", "hq"}  # fmt: skip


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("file mode")
    return {
        "video": write_video(d / "face.mp4", 9),
        "speech": write_wav(d / "speech.wav", 1.0),
        "silent": write_wav(d / "silent.wav", 1.0, silent=True),
        "dir": d,
    }


@pytest.fixture(scope="module")
def bf16_sync(wav2lip_checkpoint) -> LipSync:
    """The test weights in bf16 (fp32, with a note, on a CPU without bf16 arithmetic), as the hidden check runs."""
    model = ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu", precision="bf16")
    return LipSync(model, detector=FakeDetector(), quiet=True)


def test_pace_fast_is_inference_frame_for_frame(sync, media):
    offline = offline_frames(sync, media["video"], media["speech"], media["dir"] / "offline.mp4", box=BOX)
    streamed, on_streamed = capture()
    figures = replay.replay(sync, media["video"], media["speech"], media["dir"] / "fast.mp4", LiveOptions(pace="fast"),
                            on_frame=on_streamed, box=BOX, quiet=True)  # fmt: skip
    assert figures["frames"] == len(offline) == len(streamed) == 25 and figures["dropped"] == 0
    assert set(figures) == KEYS and figures["precision"] == "fp32"
    assert all(np.array_equal(a, b) for a, b in zip(offline, streamed, strict=True))


@pytest.mark.parametrize(("options", "chunk_ms"), [({"box": BOX}, 20), ({}, 333)], ids=["box,20ms", "detected,333ms"])
def test_realtime_pace_shows_the_offline_frame_at_every_tick(painted_sync, media, options, chunk_ms):
    """On the real clock, through replay's display and feeding threads: each tick is the offline frame of that
    tick (the painted mouth tells a window one tick off), and nothing is dropped."""
    offline = offline_frames(painted_sync, media["video"], media["speech"], media["dir"] / "p.mp4", **options)
    shown, on_frame = capture()
    live = LiveOptions(latency_budget_ms=2000, chunk_ms=chunk_ms)
    figures = replay.replay(painted_sync, media["video"], media["speech"], media["dir"] / "p rt.mp4", live,
                            on_frame=on_frame, quiet=True, **options)  # fmt: skip
    assert len(shown) == len(offline) == figures["frames"] == 25
    wrong = [t for t, (a, b) in enumerate(zip(shown, offline, strict=True)) if not np.array_equal(a, b)]
    assert not wrong, f"ticks {wrong} are not the offline frames ({figures})"
    assert figures["dropped"] == figures["errors"] == 0 and figures["generated"] == 25


def test_realtime_pace_in_bf16_is_inference_within_round_off(bf16_sync, media):
    """The network itself, in the precision the hidden check runs: every tick within 2 levels of inference.py's
    frame (the live batches are not offline's), no drop, and the figures say which precision ran."""
    offline = offline_frames(bf16_sync, media["video"], media["speech"], media["dir"] / "bf16.mp4", box=BOX)
    shown, on_frame = capture()
    figures = replay.replay(bf16_sync, media["video"], media["speech"], media["dir"] / "bf16 rt.mp4",
                            LiveOptions(latency_budget_ms=BUDGET_MS), on_frame=on_frame, box=BOX, quiet=True)  # fmt: skip
    diff = [int(np.abs(a.astype(int) - b).max()) for a, b in zip(shown, offline, strict=True)]
    assert len(shown) == 25 and max(diff) <= 2, diff
    assert figures["dropped"] == figures["errors"] == 0 and figures["generated"] == 25
    assert figures["precision"] == ("bf16" if cpu_computes_bf16() else "fp32")
    assert 0 < figures["latency_ms"]["p50"] <= figures["latency_ms"]["p95"] <= figures["latency_ms"]["max"] <= BUDGET_MS


def test_realtime_py_pace_realtime_bf16(bf16_sync, media, wav2lip_checkpoint, repo):
    """The command as the hidden check runs it: its last line is the JSON (no drop, the latency figures, the
    precision), its file decodes to inference.py's frames (up to x264's loss)."""
    out = media["dir"] / "cli rt.mp4"
    run = subprocess.run([sys.executable, "realtime.py", "--checkpoint_path", str(wav2lip_checkpoint), "--face",
                          str(media["video"]), "--audio", str(media["speech"]), "--outfile", str(out), "--pace",
                          "realtime", "--precision", "bf16", "--latency_budget_ms", str(BUDGET_MS), "--device", "cpu",
                          *BOX_FLAGS], cwd=repo, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    last = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(last) == KEYS and set(last["latency_ms"]) == {"p50", "p95", "max"}
    assert last["frames"] == last["generated"] == 25 and last["dropped"] == last["errors"] == 0
    assert last["precision"] == ("bf16" if cpu_computes_bf16() else "fp32")
    offline_frames(bf16_sync, media["video"], media["speech"], media["dir"] / "bf16 cli.mp4", box=BOX)
    decoded, seconds_v, seconds_a, _ = read_output(out)  # (x264's threads make the bytes vary run to run)
    assert len(decoded) == 25 and abs(seconds_a - 1.0) < 0.05 and abs(seconds_v - 1.0) < 0.05
    inference, _, _, _ = read_output(media["dir"] / "bf16 cli.mp4")
    mse = [np.mean((a.astype(float) - b) ** 2) for a, b in zip(decoded, inference, strict=True)]
    assert min(10 * np.log10(255**2 / max(m, 1e-9)) for m in mse) >= 40  # PSNR of every frame, dB


def test_silence_shows_the_source_frames_unless_idle_generate(sync, media):
    frames, on_frame = capture()
    figures = replay.replay(sync, media["video"], media["silent"], media["dir"] / "idle.mp4", on_frame=on_frame,
                            box=BOX, quiet=True)  # fmt: skip
    avatar = streaming.prepare_avatar(sync, media["video"], box=BOX)
    assert figures["dropped"] == 0 and figures["first_frame_ms"] is None
    assert all(np.array_equal(f, avatar.frames[i % 9]) for i, f in enumerate(frames))
    frames, on_frame = capture()
    replay.replay(sync, media["video"], media["silent"], media["dir"] / "idle2.mp4", LiveOptions(latency_budget_ms=3000),
                  on_frame=on_frame, idle="generate", box=BOX, quiet=True)  # fmt: skip
    assert sum(not np.array_equal(f, avatar.frames[i % 9]) for i, f in enumerate(frames)) > 5


def test_a_generator_that_keeps_failing_ends_the_run(painted_sync, media, tmp_path, monkeypatch, capfd):
    """One clear line from the command (a `UserError`), the cause logged once with its traceback, no file."""

    def broken(faces: np.ndarray, mels: np.ndarray) -> np.ndarray:
        raise RuntimeError("the accelerator fell off")

    monkeypatch.setattr(painted_sync, "generator", Generator(broken, torch.device("cpu"), quiet=True))
    with pytest.raises(GeneratorError, match="failed 3 times in a row .*RuntimeError: the accelerator fell off"):
        replay.replay(painted_sync, media["video"], media["speech"], tmp_path / "broken.mp4", box=BOX, quiet=True)
    assert not (tmp_path / "broken.mp4").exists()
    assert capfd.readouterr().err.count("RuntimeError: the accelerator fell off") == 1
