"""video.py: probing by content, rotation, constant-rate resampling, and the atomic H.264 + AAC writer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from common import video
from common.errors import UserError
from tests.media import face_frame, read_output, speech, write_empty_video, write_video, write_wav


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
