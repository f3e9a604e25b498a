"""Inputs at the extremes: frames held in flight bounded by the memory budget, a still shared rather than
copied per frame, and damaged or too-loud audio caught before any generation."""

from __future__ import annotations

import subprocess
import sys
import weakref
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from scipy.io import wavfile

from common import video
from common.errors import UserError
from lipsync import frames
from lipsync import pipeline as lipsync
from lipsync.options import ModelOptions
from tests.media import FakeDetector, face_frame, read_output, speech, write_video, write_wav


@pytest.fixture(scope="module")
def sync(wav2lip_checkpoint) -> lipsync.LipSync:
    return lipsync.LipSync(
        ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu"), detector=FakeDetector(), quiet=True
    )


def float_wav(path: Path, samples: np.ndarray, sr: int = 16000) -> Path:
    wavfile.write(path, sr, samples.astype(np.float32))  # IEEE float WAV: samples beyond ±1 survive
    return path


def frames_alive_during(sync, monkeypatch, face, speech_path, out, **options) -> tuple[int, list[np.ndarray]]:
    """The most decoded frames alive at once while the output is written, and the output frames."""
    alive: list[weakref.ref] = []
    read = frames.FrameSource.__iter__

    def tracked(self):
        for frame in read(self):
            alive.append(weakref.ref(frame))
            yield frame

    monkeypatch.setattr(frames.FrameSource, "__iter__", tracked)
    most, written = 0, []

    def count(i, frame):
        nonlocal most
        most = max(most, sum(r() is not None for r in alive))
        written.append(frame[20:100, 30:120].copy())  # the face box: the rest is the decoded frame

    sync(face, speech_path, out, on_frame=count, box=[20, 100, 30, 120], quiet=True, **options)
    return most, written


def test_frames_in_flight_follow_the_memory_budget(sync, monkeypatch, tmp_path):
    face = write_video(tmp_path / "face.mp4", 60, size=(320, 240))  # 225 KiB a frame
    speech_path = write_wav(tmp_path / "s.wav", 2.4)  # 60 frames
    roomy, a = frames_alive_during(sync, monkeypatch, face, speech_path, tmp_path / "a.mp4")
    tight, b = frames_alive_during(sync, monkeypatch, face, speech_path, tmp_path / "b.mp4", memory_budget=2)
    # 2 MiB / (225 KiB × 6 batches in flight) → batches of 1 frame: a handful alive instead of dozens
    assert roomy >= 30 and tight <= 10, (roomy, tight)
    # the same faces, up to the float round-off of another batch size
    assert len(a) == len(b) == 60 and max(np.abs(x.astype(int) - y).max() for x, y in zip(a, b, strict=True)) <= 2
    assert len(read_output(tmp_path / "b.mp4")[0]) == 60


def test_a_still_is_decoded_once_and_never_written(sync, tmp_path):
    image = face_frame(0, 160, 128)
    path = tmp_path / "still.png"
    assert cv2.imwrite(str(path), image)
    info = video.probe(path)
    source = frames.FrameSource(info, lipsync.Options(), 25)
    looped = list(frames.loop_frames(source, 5, static=True))
    assert all(f is looped[0][1] for _, f in looped) and source.frame_bytes == 0  # one array, referenced
    out_frames = []
    sync(path, write_wav(tmp_path / "s.wav", 0.4), tmp_path / "o.mp4", quiet=True,
         on_frame=lambda i, f: out_frames.append(f))  # fmt: skip
    assert len(out_frames) == 10 and len({id(f) for f in out_frames}) > 1  # pasted into copies
    assert not np.array_equal(out_frames[0], image)  # the mouth was generated into the copy...
    assert np.array_equal(looped[0][1], image)  # ...and the decoded still left as it was


@pytest.mark.parametrize(
    ("bad", "message"), [(np.nan, "sample 8000 (0.500 s) is not a number"), (1e30, "sample 8000 (0.500 s) is 1e+30")]
)
def test_damaged_audio_is_refused_before_any_work(sync, tmp_path, bad, message):
    samples = speech(1.0).astype(np.float32)
    samples[8000] = bad
    wav = float_wav(tmp_path / "bad.wav", samples)
    face = write_video(tmp_path / "f.mp4", 5)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        sync(face, wav, tmp_path / "out.mp4", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.wav", "f.mp4"]


def test_loud_audio_is_normalised_with_a_warning(sync, tmp_path, capsys):
    samples = 1.6 * speech(0.4).astype(np.float32) / np.abs(speech(0.4)).max()  # peaks at 1.6
    wav = float_wav(tmp_path / "loud.wav", samples)
    out = tmp_path / "out.mp4"
    sync(write_video(tmp_path / "f.mp4", 10), wav, out, quiet=True)
    err = capsys.readouterr().err
    assert "peaks at 1.60, above full scale; normalised by -4.1 dB" in err and len(err.strip().splitlines()) == 1
    with av.open(str(out)) as c:
        decoded = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)
    assert 0.8 < np.abs(decoded).max() <= 1.05  # the muxed speech was scaled too, not clipped at 1.6


# The encoder's peak memory, measured in a process of its own: 24 frames of SIDE x SIDE through VideoWriter.
ENCODE_PEAK = """
import os, resource, sys
import numpy as np
from common import video
if hasattr(os, "sched_setaffinity"):  # x264 sizes its threads (and their frames) by the CPUs: as CI's 2
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
side, out = int(sys.argv[1]), sys.argv[2]
frame = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with video.VideoWriter(out, 25, side, side) as writer:
    for i in range(24):
        writer.write(np.roll(frame, 8 * i, axis=1))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_huge_frames_are_encoded_with_little_memory(tmp_path, repo):
    """Above 4 MP x264 keeps a 2-frame look-ahead and no B-frames: 24 frames of 2048x2048 raise the encoding
    process's peak by ~115 MB (measured), where x264's default settings take ~325 MB. 1080p keeps the
    defaults."""
    run = subprocess.run([sys.executable, "-c", ENCODE_PEAK, "2048", str(tmp_path / "big.mp4")], cwd=repo,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert float(run.stdout) < 200, f"encoding 2048x2048 took {float(run.stdout):.0f} MB more at its peak"
    with av.open(str(tmp_path / "big.mp4")) as c:
        assert [f.width for f in c.decode(video=0)] == [2048] * 24
    with video.VideoWriter(tmp_path / "hd.mp4", 25, 1920, 1080) as hd:
        assert hd.video.options == {"crf": video.DEFAULT_CRF, "preset": video.DEFAULT_PRESET}
        hd.write(np.zeros((1080, 1920, 3), np.uint8))
