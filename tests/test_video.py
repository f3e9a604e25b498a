"""video.py: probing by content, rotation, constant-rate resampling, and the atomic H.264 + AAC writer.

The media-making helpers here are shared by the lip-sync tests.
"""

from __future__ import annotations

import os
import sys
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

import video
from audio import save_wav
from errors import UserError

SR = 16000


def speech(seconds: float, sr: int = SR) -> np.ndarray:
    """A voiced-sounding test signal: a 150 Hz buzz with harmonics, amplitude-modulated at 4 Hz."""
    t = np.arange(int(round(seconds * sr))) / sr
    buzz = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 6))
    return (0.2 * buzz * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


def write_wav(path: Path, seconds: float, sr: int = SR, silent: bool = False) -> Path:
    wav = np.zeros(int(round(seconds * sr)), np.float32) if silent else speech(seconds, sr)
    save_wav(wav, path, sr)
    return path


FACE_COLOR = (200, 180, 160)


def face_frame(i: int, width: int = 160, height: int = 128, face: bool = True) -> np.ndarray:
    """A frame with a smooth background and a bright 'face' square that drifts with i."""
    yy, xx = np.mgrid[:height, :width]
    frame = np.stack([(xx * 255 // width), (yy * 255 // height), np.full_like(xx, (i * 7) % 256)], -1)
    frame = frame.astype(np.uint8)
    if not face:
        return frame
    x, y = 40 + (i % 6) * 2, 30 + (i % 4)
    frame[y : y + 60, x : x + 56] = FACE_COLOR
    frame[y + 35 : y + 45, x + 15 : x + 41] = (40, 40, 120)  # a "mouth"
    return frame


def write_video(
    path: Path, n_frames: int, fps: int = 25, size: tuple[int, int] = (160, 128), audio: Path | None = None,
    rotation: int = 0, pts: list[int] | None = None, faceless: frozenset[int] = frozenset(),
    matrix: list[int] | None = None,
) -> Path:  # fmt: skip
    """An H.264 video of `face_frame`s, optionally with an AAC track, display rotation or matrix, custom pts."""
    width, height = size
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "10", "preset": "ultrafast"}
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        if matrix is not None:
            stream.set_display_matrix(matrix)
        astream = add_audio_stream(out) if audio is not None else None
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(face_frame(i, width, height, i not in faceless), format="bgr24")
            frame.pts = pts[i] if pts is not None else i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if audio is not None:
            write_audio_track(out, astream, audio)
    return path


def add_audio_stream(out: av.container.OutputContainer) -> av.audio.stream.AudioStream:
    astream = out.add_stream("aac", rate=SR)
    astream.layout = "mono"
    return astream


def write_audio_track(out: av.container.OutputContainer, astream, audio: Path) -> None:
    with av.open(str(audio)) as src:
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=SR, frame_size=1024)
        for frame in src.decode(audio=0):
            for f in resampler.resample(frame):
                out.mux(astream.encode(f))
    out.mux(astream.encode(None))


def read_output(path: Path) -> tuple[list[np.ndarray], float, float, int]:
    """(frames, video seconds, audio seconds, audio sample rate) of a written file."""
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and v.format.name == "yuv420p"
        assert a.codec_context.name == "aac"
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(v)]
        seconds_v = float(v.duration * v.time_base)
        seconds_a = float(a.duration * a.time_base)
        return frames, seconds_v, seconds_a, a.rate


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("video")


def test_probe_video(media):
    path = write_video(media / "clip.mp4", 20, audio=write_wav(media / "a.wav", 0.8))
    info = video.probe(path)
    assert (info.width, info.height, info.fps, info.n_frames, info.orientation) == (
        160,
        128,
        25,
        20,
        video.Orientation(),
    )
    assert info.has_audio and not info.is_image
    assert info.duration == pytest.approx(0.8, abs=0.05)


def test_frames_roundtrip(media):
    path = write_video(media / "plain.mp4", 12)
    frames = list(video.iter_frames(path))
    assert len(frames) == 12 and frames[0].shape == (128, 160, 3) and frames[0].dtype == np.uint8
    assert np.abs(frames[5].astype(int) - face_frame(5)).mean() < 4.0  # crf 10, yuv420p: close
    assert len(list(video.iter_frames(path, fps=25))) == 12  # constant rate read at its own rate: unchanged


def test_rotation_metadata_applied(media):
    path = write_video(media / "phone.mp4", 3, rotation=90)  # the display matrix: turn 90° counter-clockwise
    info = video.probe(path)
    assert (info.width, info.height) == (128, 160) and info.orientation.transpose
    frame = next(video.iter_frames(path))
    expected = cv2.rotate(face_frame(0), cv2.ROTATE_90_COUNTERCLOCKWISE)
    assert frame.shape == expected.shape and np.abs(frame.astype(int) - expected).mean() < 4.0
    opencv = cv2.VideoCapture(str(path)).read()[1]  # OpenCV applies the same rotation
    assert np.abs(opencv.astype(int) - frame).mean() < 2.0


ONE, W = 1 << 16, 1 << 30  # 1.0 in the display matrix's 16.16 and 2.30 fixed point


def display(a: int, b: int, c: int, d: int) -> list[int]:
    return [a * ONE, b * ONE, 0, c * ONE, d * ONE, 0, 0, 0, W]


# FFmpeg's autorotation (fftools' filter insertion) for each quarter turn and mirror, in NumPy terms
DISPLAY_MATRICES = [
    (display(1, 0, 0, 1), lambda x: x),
    (display(-1, 0, 0, 1), lambda x: x[:, ::-1]),  # hflip
    (display(1, 0, 0, -1), lambda x: x[::-1]),  # vflip
    (display(-1, 0, 0, -1), lambda x: np.rot90(x, 2)),  # hflip + vflip
    (display(0, -1, 1, 0), lambda x: np.rot90(x, 1)),  # transpose=cclock
    (display(0, 1, -1, 0), lambda x: np.rot90(x, -1)),  # transpose=clock
    (display(0, 1, 1, 0), lambda x: x.transpose(1, 0, 2)),  # transpose=cclock_flip
    (display(0, -1, -1, 0), lambda x: np.rot90(x, -1)[::-1]),  # transpose=clock_flip
]


@pytest.mark.parametrize(("matrix", "expected"), DISPLAY_MATRICES)
def test_display_matrix_quarter_turns_and_mirrors(matrix, expected):
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    assert np.array_equal(video.orientation_of(matrix).apply(image), expected(image))


def test_mirrored_video_is_shown_mirrored(media):
    """A selfie camera's left-right mirror: flipped, not turned upside down (its angle reads as 180°)."""
    path = write_video(media / "selfie.mp4", 2, matrix=display(-1, 0, 0, 1))
    assert video.probe(path).orientation == video.Orientation(hflip=True)
    frame = next(video.iter_frames(path))
    assert np.abs(frame.astype(int) - face_frame(0)[:, ::-1]).mean() < 4.0
    turned = write_video(media / "turned.mp4", 2, matrix=display(0, 1, 1, 0))
    assert (video.probe(turned).width, video.probe(turned).height) == (128, 160)
    assert np.abs(next(video.iter_frames(turned)).astype(int) - face_frame(0).transpose(1, 0, 2)).mean() < 4.0


def test_variable_frame_rate_resampled(media):
    pts = [0, 40, 80, 200, 240, 250, 260, 280, 400, 440]  # ms: gaps and bursts; 0.48 s in all
    path = write_video(media / "vfr.mp4", len(pts), pts=pts)
    frames = list(video.iter_frames(path, fps=25))
    assert len(frames) == 12  # 0.48 s at 25 fps
    originals = list(video.iter_frames(path))
    # slot k shows the latest frame with a timestamp <= k*40 ms: 120 and 160 ms repeat the 80 ms frame, the
    # 250 and 260 ms frames are dropped (the 280 ms one is on screen at 280 ms), 280 ms lasts until 400 ms
    chosen = [int(np.argmin([np.abs(f.astype(int) - o).mean() for o in originals])) for f in frames]
    assert chosen == [0, 1, 2, 2, 2, 3, 4, 7, 7, 7, 8, 9]


def test_image_by_content(tmp_path):
    path = tmp_path / "my.face photo.JPG"  # PNG bytes, misleading name, dots and spaces
    image = face_frame(0)
    path.write_bytes(cv2.imencode(".png", image)[1].tobytes())
    info = video.probe(path)
    assert info.is_image and (info.width, info.height) == (160, 128)
    (frame,) = list(video.iter_frames(path))
    assert np.array_equal(frame, image)
    for ext in (".webp", ".bmp"):
        other = tmp_path / f"face{ext.upper()}"
        other.write_bytes(cv2.imencode(ext, image, [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else [])[1])
        assert video.probe(other).is_image and np.array_equal(next(video.iter_frames(other)), image)


def test_probe_errors(tmp_path, media):
    with pytest.raises(UserError, match="not found"):
        video.probe(tmp_path / "missing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 10)
    with pytest.raises(UserError, match="neither a video nor an image"):
        video.probe(text)
    with pytest.raises(UserError, match="only audio"):
        video.probe(write_wav(tmp_path / "a.wav", 0.3))
    with pytest.raises(UserError, match="zero frames"):
        video.probe(write_empty_video(tmp_path / "empty.avi"))


def write_empty_video(path: Path) -> Path:
    """A video stream with no frames (AVI keeps the stream; an empty MP4 track is dropped by FFmpeg)."""
    with av.open(str(path), "w", format="avi") as out:
        s = out.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        out.start_encoding()
    return path


def test_writer_h264_aac_atomic(tmp_path):
    speech_file = write_wav(tmp_path / "s.wav", 1.0, sr=44100)
    out = tmp_path / "deep" / "folder" / "out.mp4"
    with video.VideoWriter(out, 25, 161, 97, speech_file) as writer:  # odd sizes lose a row/column
        for i in range(25):
            writer.write(face_frame(i, 161, 97))
            assert not out.exists()  # written under a temporary name until complete
    frames, seconds_v, seconds_a, rate = read_output(out)
    assert len(frames) == 25 and frames[0].shape == (96, 160, 3)
    assert seconds_v == pytest.approx(1.0) and seconds_a == pytest.approx(1.0, abs=0.03) and rate == 44100
    decoded = np.concatenate([f.to_ndarray() for f in av.open(str(out)).decode(audio=0)], axis=1)[0]
    original = speech(1.0, 44100)
    lag = 1024  # AAC encoder priming samples, when the decoder does not trim them
    best = max(np.corrcoef(decoded[k : k + 40000], original[:40000])[0, 1] for k in (0, lag))
    assert best > 0.99  # the audio is intact, not garbled by wrong-sized AAC frames
    assert [p.name for p in out.parent.iterdir()] == ["out.mp4"]


def test_writer_abort_leaves_nothing(tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError), video.VideoWriter(out, 25, 64, 64) as writer:
        writer.write(np.zeros((64, 64, 3), np.uint8))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_unwritable_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        video.VideoWriter(blocker / "out.mp4", 25, 64, 64)


def test_frames_to_cover():
    assert video.frames_to_cover(8.0, 25) == 200
    assert video.frames_to_cover(1.001, 25) == 26
    assert video.frames_to_cover(0.0, 25) == 1


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/statm")
def test_reading_the_display_matrix_frees_every_frame(media):
    """PyAV keeps any decoded frame whose side data was read: 100 frames of 640x480 would hold ~45 MB."""
    path = write_video(media / "long.mp4", 100, size=(640, 480), rotation=90)

    def resident_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    for _ in video.iter_frames(path):  # warm up the decoder and the allocator
        pass
    before = resident_mib()
    for _ in range(3):
        for _ in video.iter_frames(path):
            pass
    assert resident_mib() - before < 20
