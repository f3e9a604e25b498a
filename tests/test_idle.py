"""`--idle keep` offline: silent frames are the source frames bit for bit, speech frames the generated ones,
and the frames between fade from one to the other; silence is judged as the live avatar judges it."""

from __future__ import annotations

import numpy as np
import pytest

import audio
from common import video
from lipsync.idle import fade_frames, speech_weights
from lipsync.options import ModelOptions
from lipsync.pipeline import LipSync
from live.stream import SpeechFrames
from tests.media import SR, FakeDetector, speech, write_video

BOX = (20, 100, 30, 120)  # top, bottom, left, right: inside the 160x128 test frames


@pytest.fixture(scope="module")
def sync(wav2lip_checkpoint) -> LipSync:
    """The deterministic weights on the CPU, with the fake detector (boxes come from --box here anyway)."""
    return LipSync(ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu"), detector=FakeDetector(), quiet=True)


def test_weights_ramp_inside_the_speech_never_over_silence():
    levels = np.array([-10.0] * 5 + [-80.0] * 6 + [-10.0] * 10)
    weights = speech_weights(levels, -50.0, fade=3)
    assert weights[:5].tolist() == [1, 1, 0.75, 0.5, 0.25]
    assert weights[5:11].tolist() == [0] * 6
    assert weights[11:].tolist() == [0.25, 0.5, 0.75] + [1] * 7
    assert speech_weights(np.full(4, -10.0), -50.0, 3).tolist() == [1] * 4  # no silence: no fade
    assert fade_frames(25) == 3 and fade_frames(60) == 7


def test_silence_is_judged_offline_as_live(tmp_path):
    """One level per frame, the same function in both doors: the offline Speech's levels equal the live
    stream's for the same samples, chunk by chunk."""
    wav = np.concatenate([speech(0.6), np.zeros(SR // 2, np.float32), 0.01 * speech(0.5)])
    audio.save_wav(wav, tmp_path / "s.wav", SR)
    offline = audio.load_speech(tmp_path / "s.wav", 25.0).levels_db
    samples = audio.load_wav(tmp_path / "s.wav", SR)
    stream = SpeechFrames(25.0)
    live = [f.level_db for i in range(0, len(samples), 320) for f in stream.feed(samples[i : i + 320])]
    live += [f.level_db for f in stream.end()]
    assert np.array_equal(offline, np.array(live))
    assert (offline == audio.SILENCE_FLOOR_DB).any() and (offline > -30).any()


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    d = tmp_path_factory.mktemp("idle")
    wav = np.concatenate([speech(0.8), np.zeros(SR, np.float32), speech(0.8)])  # speech, 1 s of silence, speech
    audio.save_wav(wav, d / "talk.wav", SR)
    return {"face": write_video(d / "face.mp4", 20), "speech": d / "talk.wav", "dir": d}


def run(sync, talk, idle: str) -> list[np.ndarray]:
    frames = []
    sync(talk["face"], talk["speech"], talk["dir"] / f"{idle}.mp4", box=BOX, idle=idle,
         on_frame=lambda i, f: frames.append(f.copy()))  # fmt: skip
    return frames


def test_keep_shows_the_source_during_silence_and_fades(sync, talk):
    kept, generated = run(sync, talk, "keep"), run(sync, talk, "generate")
    source = list(video.iter_frames(talk["face"], fps=25))
    levels = audio.load_speech(talk["speech"], 25.0).levels_db
    weights = speech_weights(levels, -50.0, fade_frames(25))
    assert len(kept) == len(generated) == len(weights) == 65
    silent, fading = np.flatnonzero(weights == 0), np.flatnonzero((weights > 0) & (weights < 1))
    assert len(silent) >= 15 and len(fading) == 6  # 3 frames out of the speech, 3 back in
    top, bottom, left, right = BOX
    for i, frame in enumerate(kept):
        src, gen = source[i % len(source)], generated[i]
        if weights[i] == 0:
            assert np.array_equal(frame, src), i  # the source frame, bit for bit
            assert not np.array_equal(gen[top:bottom, left:right], src[top:bottom, left:right])
        elif weights[i] == 1:
            assert np.array_equal(frame, gen), i  # the generated frame, as --idle generate makes it
        else:
            region = src[top:bottom, left:right].astype(np.float32)
            blend = region + (gen[top:bottom, left:right].astype(np.float32) - region) * np.float32(weights[i])
            expected = src.copy()
            expected[top:bottom, left:right] = np.rint(blend).astype(np.uint8)
            assert np.array_equal(frame, expected), i
    box = lambda f: f[top:bottom, left:right].astype(int)  # noqa: E731
    edge = silent[0]  # the first silent frame: the fade out ends just before it
    hard = np.abs(box(generated[edge - 1]) - box(source[edge % 20])).mean()  # the jump without a fade
    steps = [np.abs(box(kept[i + 1]) - box(kept[i])).mean() for i in range(edge - 4, edge)]
    assert max(steps) < 0.5 * hard  # the fade spreads it over 4 steps
