"""realtime.py's file mode and the live layer: `--pace fast` is inference.py frame for frame; at real-time
pace, idle, interruption and a latency budget that holds however long the stream runs (drops instead)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

import audio
from live import replay
from live import sessions as live
from live import stream as streaming
from live.options import LiveOptions
from tests import test_lipsync
from tests.media import face_frame, read_output, speech, write_video, write_wav

sync = test_lipsync.sync  # the fixture: a LipSync with the fake detector, shared with that module
BOX = (20, 110, 30, 120)
BOX_FLAGS = ["--box", *map(str, BOX)]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("file mode")
    return {
        "video": write_video(d / "face.mp4", 9),
        "speech": write_wav(d / "speech.wav", 1.0),
        "silent": write_wav(d / "silent.wav", 1.0, silent=True),
        "dir": d,
    }


def capture() -> tuple[list[np.ndarray], object]:
    frames: list[np.ndarray] = []
    return frames, lambda i, f: frames.append(f.copy())


def test_pace_fast_is_inference_frame_for_frame(sync, media, wav2lip_checkpoint, repo):
    offline, on_offline = capture()
    sync(media["video"], media["speech"], media["dir"] / "offline.mp4", on_frame=on_offline, quiet=True, box=BOX)
    streamed, on_streamed = capture()
    figures = replay.replay(sync, media["video"], media["speech"], media["dir"] / "fast.mp4", LiveOptions(pace="fast"),
                            on_frame=on_streamed, box=BOX, quiet=True)  # fmt: skip
    assert figures["frames"] == len(offline) == len(streamed) == 25 and figures["dropped"] == 0
    assert all(np.array_equal(a, b) for a, b in zip(offline, streamed, strict=True))
    # the command line: its last line is the JSON, its file decodes to inference.py's
    out = media["dir"] / "cli fast.mp4"
    run = subprocess.run([sys.executable, "realtime.py", "--checkpoint_path", str(wav2lip_checkpoint), "--face",
                          str(media["video"]), "--audio", str(media["speech"]), "--outfile", str(out), "--pace",
                          "fast", "--chunk_ms", "333", "--device", "cpu", *BOX_FLAGS],
                         cwd=repo, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    last = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(last) == {"frames", "generated", "dropped", "idle", "errors", "fps", "generated_fps", "first_frame_ms",
                         "latency_ms"}  # fmt: skip
    assert last["frames"] == 25 and last["dropped"] == 0 and set(last["latency_ms"]) == {"p50", "p95", "max"}
    decoded, seconds_v, seconds_a, _ = read_output(out)  # (x264's threads make the bytes vary run to run)
    assert len(decoded) == 25 and abs(seconds_a - 1.0) < 0.05 and abs(seconds_v - 1.0) < 0.05


def test_realtime_pace_shows_every_tick_within_the_budget(sync, media):
    frames, on_frame = capture()
    figures = replay.replay(sync, media["video"], media["speech"], media["dir"] / "rt.mp4", LiveOptions(latency_budget_ms=2000),
                            on_frame=on_frame, box=BOX, quiet=True)  # fmt: skip
    assert figures["frames"] == len(frames) == 25
    assert figures["latency_ms"]["max"] <= 2000 and figures["first_frame_ms"] is not None
    sources = [face_frame(i) for i in range(9)]
    generated = [not any(np.abs(f.astype(int) - s).max() < 12 for s in sources) for f in frames]
    assert sum(generated) >= 25 - figures["dropped"] - 1  # repeats of a generated frame count as generated


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


class SlowGenerator:
    """A stand-in generator that takes `seconds` per frame (of real time) and returns its input crops."""

    device = torch.device("cpu")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def predict(self, faces: np.ndarray, mels: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds * len(faces))
        return faces


class VirtualClock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(avatar, sessions: int, seconds: float, per_frame: float, workers: int = 2) -> list[live.LiveSession]:
    """`sessions` streams of `seconds` of speech in 20 ms chunks, on `workers` generator workers that take
    `per_frame` seconds a frame: the shared generator's own scheduling, driven event by event on a virtual clock."""
    with threadpool_limits(limits=1, user_api="blas"):  # as realtime.py runs it
        return _simulate(avatar, sessions, seconds, per_frame, workers)


def _simulate(avatar, sessions: int, seconds: float, per_frame: float, workers: int) -> list[live.LiveSession]:
    clock = VirtualClock()
    shared = live.SharedGenerator(SlowGenerator(0.0), batch=2, clock=clock, workers=0)
    streams = [live.LiveSession(avatar, shared, start=0.0) for _ in range(sessions)]
    wav, step = speech(seconds), 0.004  # 4 ms: 5 steps a chunk, 10 a tick
    free_at, running = [0.0] * workers, [None] * workers  # each worker's (jobs, started) in flight
    for k in range(int((seconds + 1.0) / step)):
        clock.now = k * step
        if k % 5 == 0 and (i := k // 5 * 320) < len(wav):
            for s in streams:
                s.feed(wav[i : i + 320])
        for w in range(workers):
            if running[w] is not None and free_at[w] <= clock.now + 1e-9:
                jobs, started = running[w]
                shared.finish(jobs, np.stack([j.crop for j in jobs]), started, clock.now)
                running[w] = None
            if running[w] is None and (jobs := shared.next_batch(clock.now)):
                running[w], free_at[w] = (jobs, clock.now), clock.now + per_frame * len(jobs)
        for s in streams:
            while s.display_time(s.tick) <= clock.now + 1e-9:
                s.next_frame()
    return streams


def test_latency_stays_bounded_when_the_machine_cannot_keep_up(sync, media):
    """60 s of speech for 4 sessions at 25 fps (100 frames/s) on 2 workers of 9 frames/s each: frames are
    dropped, each session gets its share, and the latency of the last 5 s is no higher than the first 5 s'."""
    avatar = streaming.prepare_avatar(sync, media["video"], box=BOX)
    for sessions in (1, 4):
        streams = simulate(avatar, sessions, 60.0, per_frame=0.11)
        generated = sum(s.stats.generated for s in streams)
        assert generated / 60.0 >= 0.9 * 2 / 0.11  # the workers stay busy: ~18 frames/s in all
        for s in streams:
            lat = np.array(s.stats.latencies)
            assert s.stats.dropped > 0 and lat.max() <= 0.5
            assert s.stats.generated >= 0.8 * generated / sessions
            per_second = len(lat) // 60  # the 5 s after the first, and 5 s before the last (which ends the speech)
            early, late = lat[per_second : 6 * per_second], lat[-6 * per_second : -per_second]
            assert np.percentile(late, 95) <= np.percentile(early, 95) + 0.01


def test_no_drops_when_the_machine_keeps_up(sync, media):
    avatar = streaming.prepare_avatar(sync, media["video"], box=BOX)
    (s,) = simulate(avatar, 1, 5.0, per_frame=0.05)
    assert s.stats.dropped == 0 and s.stats.generated == s.stats.speech_frames == 120  # no end(): no flush
    assert np.percentile(s.stats.latencies, 95) <= 0.15 and s.stats.first_ready - s.stats.first_feed < 0.4


def test_interrupt_drops_queued_speech_and_returns_to_idle(sync, media):
    avatar = streaming.prepare_avatar(sync, media["video"], box=BOX)
    shared = live.SharedGenerator(SlowGenerator(0.01), batch=2)
    session = live.LiveSession(avatar, shared)
    session.feed(speech(1.0))
    assert session.plan and session.audio_out.read(0, 16000 * 3).any()
    session.interrupt()
    assert not session.plan and not session.pending and not session.faces
    assert not session.audio_out.read(0, 16000 * 3).any()
    frames = [session.next_frame() for _ in range(12)]
    assert all(np.array_equal(f, avatar.frames[i % 9]) for i, f in enumerate(frames))
    session.feed(speech(0.5))  # speech after an interruption starts a new utterance, later on the clock
    assert session.first >= session.tick and session.plan
    session.close()
    shared.close()


def test_delayed_audio_places_speech_on_the_timeline():
    out = live.DelayedAudio(16000)
    out.write(100, np.ones(50, np.float32))
    out.write(200, np.full(10, 2.0, np.float32))
    got = out.read(90, 130)
    assert got[:10].sum() == 0 and got[10:60].sum() == 50 and got[110:120].sum() == 20
    out.clear_from(120)
    assert out.read(90, 130)[10:].sum() == 20  # 100..119 kept, the rest dropped
    assert audio.MEL_STEP_SIZE == 16
