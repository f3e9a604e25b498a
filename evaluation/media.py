"""Decode a video the way syncnet_python's ffmpeg commands do, in memory.

The original extracts frames with `ffmpeg -i VIDEO -threads 1 -f image2 %06d.jpg` and audio with
`ffmpeg -i VIDEO -async 1 -ac 1 -vn -acodec pcm_s16le -ar 16000 audio.wav`, then reads them back with
cv2 and scipy. The JPEG round trip moves LSE-D by ~0.4 % and LSE-C by ~1 %, so it is reproduced here
step for step: FFmpeg 5.1's swscale limited-to-full range conversion (yuv420p -> yuvj420p, in integer
arithmetic, because newer swscale rounds differently), FFmpeg's mjpeg encoder at its default rate control
(200 kb/s, one encoder per video so the rate-control state runs across frames as in the CLI), and
libjpeg's decoder through `cv2.imdecode`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from fractions import Fraction

import av
import cv2
import numpy as np

from common import video
from common.errors import UserError

SAMPLE_RATE = 16000  # Hz, syncnet_python's `-ar 16000`
FPS = 25  # syncnet_python's protocol (`ffmpeg -r 25`): the frame rate its windows and audio slices assume

# The CLI's mjpeg pixel format for each limited-range input (fftools picks the matching J format).
_FULL_RANGE_OF = {"yuv420p": "yuvj420p", "yuv422p": "yuvj422p", "yuv444p": "yuvj444p"}


def open_media(path: str | os.PathLike) -> av.container.InputContainer:
    """Open a media file, turning a missing or unreadable file into a one-line `UserError`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such video file; check the path")
    try:
        return av.open(path)
    except av.FFmpegError as e:
        raise UserError(f"{path}: FFmpeg cannot read it ({e}); pass a valid video file") from e


def decode_frames(path: str | os.PathLike) -> Iterator[av.VideoFrame]:
    """Every decoded frame of the first video stream, in presentation order."""
    with open_media(path) as c:
        if not c.streams.video:
            raise UserError(f"{os.fspath(path)}: no video stream; pass a video file")
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            yield from c.decode(stream)
        except av.FFmpegError as e:
            raise UserError(f"{os.fspath(path)}: video decoding failed ({e}); re-encode the file") from e


# ---------------------------------------------------------------- range conversion (swscale 5.1)


def luma_to_full_range(y: np.ndarray) -> np.ndarray:
    """swscale 5.1 `lumRangeToJpeg` on 15-bit intermediates, then its rounding to 8 bits."""
    v = y.astype(np.int64) << 7
    v = (np.minimum(v, 30189) * 19077 - 39057361) >> 14
    return np.clip((v + 64) >> 7, 0, 255).astype(np.uint8)


def chroma_to_full_range(c: np.ndarray) -> np.ndarray:
    """swscale 5.1 `chrRangeToJpeg` on 15-bit intermediates, then its rounding to 8 bits."""
    v = c.astype(np.int64) << 7
    v = (np.minimum(v, 30775) * 4663 - 9289992) >> 12
    return np.clip((v + 64) >> 7, 0, 255).astype(np.uint8)


def _plane(frame: av.VideoFrame, i: int) -> np.ndarray:
    p = frame.planes[i]
    rows = np.frombuffer(memoryview(p), np.uint8).reshape(p.height, p.line_size)
    return rows[:, : p.width]


def _frame_from_planes(planes: list[np.ndarray], fmt: str) -> av.VideoFrame:
    h, w = planes[0].shape
    out = av.VideoFrame(w, h, fmt)
    for plane, data in zip(out.planes, planes, strict=True):
        buf = np.zeros((plane.height, plane.line_size), np.uint8)
        buf[:, : plane.width] = data
        plane.update(buf.tobytes())
    return out


def to_full_range(frame: av.VideoFrame) -> av.VideoFrame:
    """The frame as the CLI hands it to the mjpeg encoder: full-range (J) planar YUV."""
    name = frame.format.name
    if name in _FULL_RANGE_OF.values():
        return frame
    if name not in _FULL_RANGE_OF:
        return frame.reformat(format="yuvj420p")  # rare input formats: FFmpeg's own conversion
    y, u, v = (_plane(frame, i) for i in range(3))
    planes = [luma_to_full_range(y), chroma_to_full_range(u), chroma_to_full_range(v)]
    return _frame_from_planes(planes, _FULL_RANGE_OF[name])


# ---------------------------------------------------------------- frames


class JpegRoundTrip:
    """`ffmpeg -threads 1 -f image2 x.jpg` then `cv2.imread`, for one video's frames in order."""

    def __init__(self, fps: Fraction):
        self.fps = Fraction(fps)
        self.encoder: av.VideoCodecContext | None = None
        self.index = 0

    def _open(self, frame: av.VideoFrame) -> av.VideoCodecContext:
        enc = av.CodecContext.create("mjpeg", "w")
        enc.width, enc.height = frame.width, frame.height
        enc.pix_fmt = frame.format.name
        enc.time_base = 1 / self.fps  # the rate control spends bit_rate / fps bits per frame
        enc.framerate = self.fps
        enc.thread_count = 1  # `-threads 1`: one slice per picture
        return enc

    def encode(self, frame: av.VideoFrame) -> bytes:
        """The next frame's JPEG file, byte for byte what the CLI would write."""
        yuv = to_full_range(frame)
        if self.encoder is None:
            self.encoder = self._open(yuv)
        yuv.pts, yuv.time_base = self.index, self.encoder.time_base
        self.index += 1
        packets = self.encoder.encode(yuv)  # mjpeg is intra-only: one packet per frame, no delay
        return bytes(packets[0])

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        """The next frame as `cv2.imread` reads its JPEG back (BGR)."""
        return cv2.imdecode(np.frombuffer(self.encode(frame), np.uint8), cv2.IMREAD_COLOR)


def read_frames(path: str | os.PathLike, size: int | None = 224, lossless: bool = False) -> np.ndarray:
    """All frames as BGR uint8 [T, size, size, 3], through the JPEG round trip unless `lossless`.

    `size` reproduces the original's unconditional `cv2.resize(img, (224, 224))`; None keeps the size.
    """
    jpeg = None if lossless else JpegRoundTrip(video.probe(path).fps)
    frames = []
    for frame, orientation in video.with_orientation(decode_frames(path)):
        # the ffmpeg CLI autorotates before its JPEG encode; turned after it, only the 8×8 rounding differs
        img = orientation.apply(frame.to_ndarray(format="bgr24") if jpeg is None else jpeg(frame))
        if size is not None:
            img = cv2.resize(img, (size, size))
        frames.append(img)
    if not frames:
        raise UserError(f"{os.fspath(path)}: the video stream has no frames; pass a non-empty video")
    return np.stack(frames)


# ---------------------------------------------------------------- audio


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono int16 at `sample_rate`, as `ffmpeg -async 1 -ac 1 -acodec pcm_s16le -ar 16000` writes it.

    FFmpeg's own resampler and downmix (libswresample) do the conversion. `-async 1` makes the audio
    start at the file's time zero: a late first audio sample is preceded by silence, an early one is
    trimmed. Gaps inside the stream are not filled (the files this metric sees have none).
    """
    path = os.fspath(path)
    with open_media(path) as c:
        if not c.streams.audio:
            raise UserError(f"{path}: no audio stream; LSE needs the video's speech track")
        stream = c.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        chunks, first_pts = [], None
        try:
            for frame in c.decode(stream):
                if first_pts is None and frame.pts is not None:
                    first_pts = float(frame.pts * frame.time_base)
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
        except av.FFmpegError as e:
            raise UserError(f"{path}: audio decoding failed ({e}); re-encode the file") from e
        start = c.start_time / av.time_base if c.start_time is not None else 0.0
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    lead = round(((first_pts if first_pts is not None else start) - start) * sample_rate)
    if lead > 0:
        audio = np.concatenate([np.zeros(lead, np.int16), audio])
    elif lead < 0:
        audio = audio[-lead:]
    return audio.astype(np.int16, copy=False)
