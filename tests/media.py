"""Test media made on the fly: speech-like WAVs, videos with a flat-coloured "face", and a detector that
finds that face exactly, so the pipeline's tests need no real face and no real weights."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from audio import save_wav

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
    matrix: list[int] | None = None, keyint: int | None = None, lossless: bool = False,
) -> Path:  # fmt: skip
    """An H.264 video of `face_frame`s, optionally with an AAC track, display rotation or matrix, custom pts,
    a keyframe every `keyint` frames (so a time range has a keyframe to seek to); `lossless`: FFV1 in BGR
    instead, decoded bit for bit by PyAV and OpenCV alike (the path's suffix names the container: .avi)."""
    width, height = size
    with av.open(str(path), "w", format=None if lossless else "mp4") as out:
        stream = out.add_stream("ffv1" if lossless else "libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "bgr0" if lossless else "yuv420p"
        if not lossless:
            keyframes = {"g": str(keyint), "keyint_min": str(keyint)} if keyint else {}
            stream.options = {"crf": "10", "preset": "ultrafast"} | keyframes
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


def write_empty_video(path: Path) -> Path:
    """A video stream with no frames (AVI keeps the stream; an empty MP4 track is dropped by FFmpeg)."""
    with av.open(str(path), "w", format="avi") as out:
        s = out.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        out.start_encoding()
    return path


def write_mpeg4(path, frames_bgr, fps=25, audio=None, sample_rate=16000):
    """A small mp4 (MPEG-4 part 2 video, AAC audio when given) made with PyAV."""
    with av.open(str(path), "w") as c:
        v = c.add_stream("mpeg4", rate=fps)
        v.height, v.width = frames_bgr.shape[1:3]
        v.pix_fmt = "yuv420p"
        v.options = {"qscale": "2"}
        a = None
        if audio is not None:
            a = c.add_stream("aac", rate=sample_rate)
            a.layout = "mono"
        for f in frames_bgr:
            c.mux(v.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="bgr24")))
        c.mux(v.encode(None))
        if a is not None:
            frame = av.AudioFrame.from_ndarray(audio.reshape(1, -1).astype(np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = sample_rate, 0, Fraction(1, sample_rate)
            c.mux(a.encode(frame))
            c.mux(a.encode(None))
    return path


def face_rect(frame: np.ndarray) -> tuple[int, int, int, int] | None:
    near = np.abs(frame.astype(int) - FACE_COLOR).sum(-1) < 30
    if near.sum() < 100:
        return None
    ys, xs = np.nonzero(near)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


class FakeDetector:
    """One box per frame around the pixels of FACE_COLOR (None when there are too few); counts frames."""

    def __init__(self) -> None:
        self.frames_seen = 0

    def get_detections_for_batch(self, frames: np.ndarray) -> list[tuple[int, int, int, int] | None]:
        self.frames_seen += len(frames)
        return [face_rect(f) for f in frames]
