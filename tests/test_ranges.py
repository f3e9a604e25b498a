"""Time ranges (`--start/--end`, `--audio_start/--audio_end`): exact frames and samples, read by seeking, and
one line for a range outside the media, an empty one, or one on a still image."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import audio
from common import time_ranges, video
from common.errors import UserError
from common.time_ranges import TimeRange, parse_time
from lipsync.options import ModelOptions
from lipsync.pipeline import LipSync
from tests.cli import cli
from tests.media import SR, FakeDetector, face_frame, speech, write_video

BOX = ["--box", "20", "100", "30", "120"]  # inside the 160x128 test frames


@pytest.fixture(scope="module")
def sync(wav2lip_checkpoint) -> LipSync:
    """The deterministic weights on the CPU, with the fake detector (boxes come from --box here anyway)."""
    return LipSync(ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu"), detector=FakeDetector(), quiet=True)


def cut_clip(source: Path, path: Path, start: str, end: str) -> Path:
    """The frames of `source` with start <= t < end, re-encoded losslessly (x264 at qp 0, the same yuv420p):
    the "same range cut beforehand"."""
    with av.open(str(source)) as src, av.open(str(path), "w", format="mp4") as out:
        stream_in = src.streams.video[0]
        stream = out.add_stream("libx264", rate=stream_in.average_rate)
        stream.width, stream.height, stream.pix_fmt = stream_in.width, stream_in.height, "yuv420p"
        stream.options = {"qp": "0", "preset": "ultrafast"}
        k = 0
        for frame in src.decode(stream_in):
            if Fraction(start) <= frame.pts * frame.time_base < Fraction(end):
                frame.pts, frame.time_base = k, 1 / Fraction(stream_in.average_rate)
                out.mux(stream.encode(frame))
                k += 1
        out.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ranges")
    talk = np.concatenate([speech(1.0), 0.5 * speech(1.5)[::-1]])
    audio.save_wav(talk, d / "talk.wav", SR)
    clip = write_video(d / "clip.mp4", 75, keyint=10)  # 3 s
    return {"dir": d, "clip": clip, "talk": d / "talk.wav", "image": d / "face.png"}


def test_times_parse_exactly():
    assert parse_time("12.5", "--start") == Fraction(25, 2)
    assert parse_time("00:01:02.250", "--start") == 62.25 and parse_time("1:02.25", "--start") == 62.25
    assert parse_time(0.1, "--start") == Fraction(1, 10)  # the decimal a float prints as, not its binary value
    assert TimeRange(parse_time(0.1, "--start")).first(30) == 3  # 0.1 * 30 = 3.0000000000000004 in floats
    assert TimeRange(Fraction(1), Fraction(2)).first(Fraction(30000, 1001)) == 30
    for bad in ("abc", "-1", "1:2:3:4", float("nan")):
        with pytest.raises(UserError, match="--end"):
            parse_time(bad, "--end")


@pytest.mark.parametrize("span", [(1.0, 2.0), (0.5, None), (Fraction(37, 25), Fraction(61, 25)), (0.44, 0.52)])
def test_video_range_is_the_slice_of_a_full_read_and_seeks(media, span, monkeypatch):
    full = list(video.iter_frames(media["clip"], fps=25))
    span = TimeRange(*(None if t is None else Fraction(t) for t in span))
    seeks = []
    seek = time_ranges.seek_video
    monkeypatch.setattr(video, "seek_video", lambda c, s, t: (seeks.append(t), seek(c, s, t)))
    part = list(video.iter_frames(media["clip"], fps=25, span=span))
    expected = full[span.first(25) : span.stop(25)]
    assert len(part) == len(expected) > 0
    assert all(np.array_equal(a, b) for a, b in zip(part, expected, strict=True))
    assert seeks == [Fraction(span.first(25), 25)]  # seeks to the range, not decoding from the start


def test_audio_range_is_the_slice_of_a_full_decode(media):
    whole, rate = audio.decode_audio(media["talk"])
    for start, end in [(0.5, 1.25), (Fraction(1, 3), None), (2.0, 2.5)]:
        span = TimeRange(Fraction(start), None if end is None else Fraction(end), ("--audio_start", "--audio_end"))
        part, _ = audio.decode_audio(media["talk"], span)
        assert np.array_equal(part, whole[:, span.first(rate) : span.stop(rate)])


def frames_of(sync, face, speech_path, out, **options) -> list[np.ndarray]:
    frames = []
    sync(
        face, speech_path, out, on_frame=lambda i, f: frames.append(f.copy()), **({"box": (20, 100, 30, 120)} | options)
    )
    return frames


def test_range_run_equals_the_clip_cut_beforehand(sync, media, tmp_path):
    """--start/--end on the clip = the same range cut beforehand (frame for frame, looping within the range);
    --audio_start/--audio_end = the speech cut beforehand (sample for sample), and the output is that long."""
    cut = cut_clip(media["clip"], tmp_path / "cut.mp4", "1.03", "1.59")  # frames 26..39
    wav, _ = audio.decode_audio(media["talk"])
    audio.save_wav(wav[0, 8000:30400] / 32768 * 32768, tmp_path / "cut.wav", SR)  # 0.5 s to 1.9 s
    ranged = frames_of(sync, media["clip"], media["talk"], tmp_path / "a.mp4", start="00:00:01.03", end=1.59,
                       audio_start=0.5, audio_end="1.9")  # fmt: skip
    beforehand = frames_of(sync, cut, tmp_path / "cut.wav", tmp_path / "b.mp4")
    assert len(ranged) == len(beforehand) == 35  # 1.4 s of speech: the 14-frame range, looping
    assert all(np.array_equal(a, b) for a, b in zip(ranged, beforehand, strict=True))
    with av.open(str(tmp_path / "a.mp4")) as out:
        assert float(out.streams.audio[0].duration * out.streams.audio[0].time_base) == pytest.approx(1.4, abs=0.03)


BAD_RANGES = {
    # case: (face, flags, words of the one line)
    "start after the end": ("clip", ["--start", "5"], ["--start 5", "3 s long"]),
    "end after the end": ("clip", ["--start", "1", "--end", "00:00:04"], ["--end 4", "3 s long"]),
    "empty range": ("clip", ["--start", "2", "--end", "2"], ["empty", "3 s long"]),
    "no frame in the range": ("clip", ["--start", "1.01", "--end", "1.02"], ["no frame", "3 s long"]),
    "range on an image": ("image", ["--start", "1"], ["--start", "still image"]),
    "audio start after its end": ("clip", ["--audio_start", "9"], ["--audio_start 9", "2.5 s long"]),
    "audio empty": ("clip", ["--audio_start", "1", "--audio_end", "0.5"], ["empty", "2.5 s long"]),
    "malformed time": ("clip", ["--end", "1:xx"], ["--end 1:xx", "not a time"]),
}


@pytest.mark.parametrize("case", list(BAD_RANGES))
def test_bad_range_one_line(case, media, wav2lip_checkpoint, capsys, tmp_path):
    face, flags, words = BAD_RANGES[case]
    if face == "image" and not media["image"].exists():
        import cv2

        cv2.imwrite(str(media["image"]), face_frame(0))
    out = tmp_path / "out" / "result.mp4"
    argv = ["--checkpoint_path", wav2lip_checkpoint, "--face", media[face], "--audio", media["talk"],
            "--outfile", out, "--quiet", *BOX, *flags]  # fmt: skip
    code, err = cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), err
    assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])


def test_app_range_sliders_and_preview(media, tmp_path):
    """The page's sliders are the options (0: unset), sized to the input; the preview is the range's first frame."""
    pytest.importorskip("gradio")
    from webapp import controls, ranges
    from webapp.page import build_app

    image, line = ranges.range_preview(str(media["clip"]), 1.04, 0)
    assert np.array_equal(image, list(video.iter_frames(media["clip"], fps=25))[26][..., ::-1]) and "frame 26" in line
    assert ranges.range_preview(str(media["clip"]), 5, 0)[1].startswith("Error: --start 5")
    start, end = ranges.face_sliders(str(media["clip"]))
    assert start.maximum == end.maximum == 3.0 and ranges.speech_sliders(str(media["talk"]))[1].maximum == 2.5
    _, clip = controls.split_options({"checkpoint_path": "x.pth", "start": 1.04, "end": 0, "audio_end": 2.0})
    assert clip["start"] == 1.04 and clip["end"] is None and clip["audio_end"] == 2.0
    build_app(work_dir=tmp_path)  # the page builds with the sliders wired


def test_realtime_file_mode_says_the_audio_range(sync, media, tmp_path):
    """realtime.py's file mode takes --audio_start/--audio_end too: at --pace fast its frames are inference's."""
    from live.options import LiveOptions
    from live.replay import replay

    options = {"box": (20, 100, 30, 120), "audio_start": 0.5, "audio_end": 1.3, "idle": "generate"}
    live = []
    replay(sync, media["clip"], media["talk"], tmp_path / "live.mp4", LiveOptions(pace="fast"),
           on_frame=lambda i, f: live.append(f.copy()), **options)  # fmt: skip
    offline = frames_of(sync, media["clip"], media["talk"], tmp_path / "offline.mp4", **options)
    assert len(live) == len(offline) == 20 and all(np.array_equal(a, b) for a, b in zip(live, offline, strict=True))
