"""Video in and out through PyAV: probe, stream BGR frames, and write H.264 + AAC atomically.

Everything here streams: frames are decoded one at a time and encoded as they come, so memory does not
grow with the length of a clip.
- Inputs are judged by their content, not their name: whatever FFmpeg (or, for still images, OpenCV)
  can read. Still images go through `cv2.imdecode`, as the original read them with `cv2.imread`; it also
  applies their EXIF orientation.
- The display matrix phones and editors write (a quarter turn, a mirror, or both) is applied to every decoded
  frame, as FFmpeg's own autorotation applies it.
- A variable-frame-rate video is read on a constant timeline when `iter_frames(fps=...)` is given: each
  frame lands on the output slot nearest its timestamp, dropping or repeating frames, as FFmpeg's `fps`
  filter does. Inference resamples every video to its stream's average rate this way.
- The writer encodes H.264 yuv420p with the audio of another file muxed in as AAC, in one pass, under a
  temporary name in the destination folder that is renamed only once the file is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from av.sidedata.sidedata import Type as SideDataType

from common.atomic_files import PartialFile
from common.errors import UserError

DEFAULT_FPS = Fraction(25)  # when a stream states no rate at all: the rate Wav2Lip was trained at (hparams.fps)
VIDEO_CODEC = "libx264"
PIX_FMT = "yuv420p"  # what every player decodes; needs even width and height
DEFAULT_CRF = "18"  # visually lossless for x264; the original's final ffmpeg call used x264's default, 23
DEFAULT_PRESET = "veryfast"  # x264 at `medium` costs as much CPU as the generator on small frames
# Above 4 megapixels (beyond 1080p: 4K, large stills) x264's look-ahead, B-frames and sub-pixel planes hold
# ~25 frames of its own: 1.2 GB at 3840x3840. The ultrafast preset with a 2-frame look-ahead and no B-frames
# holds a third of that (and encodes faster), for a larger file at the same quality (crf).
LARGE_FRAME_PIXELS = 4_000_000
LOW_MEMORY_PRESET = "ultrafast"
LOW_MEMORY_X264 = "rc-lookahead=2:sync-lookahead=0:bframes=0"
AUDIO_CODEC = "aac"
AAC_FRAME_SIZE = 1024  # samples per AAC frame; the encoder garbles frames of any other size
AAC_RATES = frozenset(av.codec.Codec(AUDIO_CODEC, "w").audio_rates)
AAC_FALLBACK_RATE = 48000  # for input rates AAC cannot carry
AUDIO_BITRATE = 192_000
HASH_BLOCK = 1 << 20  # bytes read at a time when hashing a file
CONTAINER_OF_SUFFIX = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
FLIP_CODE = {(True, False): 1, (False, True): 0, (True, True): -1}  # cv2.flip's code for (hflip, vflip)


@dataclass(frozen=True)
class Orientation:
    """How players show a decoded frame: transposed (for a quarter turn), then mirrored left-right and/or
    upside down. Every quarter turn and mirror a display matrix can ask for is one of these eight."""

    transpose: bool = False
    hflip: bool = False
    vflip: bool = False

    def apply(self, image: np.ndarray) -> np.ndarray:
        if self.transpose:
            image = cv2.transpose(image)
        code = FLIP_CODE.get((self.hflip, self.vflip))
        return image if code is None else cv2.flip(image, code)


def orientation_of(matrix: Sequence[int] | None) -> Orientation:
    """The Orientation of FFmpeg's 3×3 display matrix (row-major, 16.16 fixed point), read as FFmpeg's own
    autorotation reads it: a quarter turn when the diagonal is the smaller part, the flips from the signs.
    Angles between quarter turns snap to the nearest one."""
    if matrix is None:
        return Orientation()
    a, b, _, c, d, *_ = matrix
    if abs(b) > abs(a):
        return Orientation(transpose=True, hflip=c < 0, vflip=b < 0)
    return Orientation(hflip=a < 0, vflip=d < 0)


def display_matrix(frame: av.VideoFrame) -> list[int] | None:
    """The frame's display matrix side data (FFmpeg copies the container's onto every frame), if any.

    Read from a 2×2 copy, which keeps the side data: PyAV 18 never frees a decoded frame whose `side_data`
    was looked at (about a frame's worth of memory lost per call)."""
    for data in frame.reformat(width=2, height=2, format="gray").side_data:
        if data.type == SideDataType.DISPLAYMATRIX:
            return np.frombuffer(bytes(data), np.int32).tolist()
    return None


def with_orientation(frames: Iterable[av.VideoFrame]) -> Iterator[tuple[av.VideoFrame, Orientation]]:
    """Each decoded frame with its stream's Orientation, read once from the first frame."""
    orientation = None
    for frame in frames:
        if orientation is None:
            orientation = orientation_of(display_matrix(frame))
        yield frame, orientation


@dataclass(frozen=True)
class VideoInfo:
    """What the pipeline needs to know about a face input before decoding it.

    `width`/`height` are as displayed, after `orientation` (the display matrix's turn and mirror).
    `n_frames` is the container's estimate (1 for an image).
    """

    path: str
    width: int
    height: int
    fps: Fraction
    n_frames: int
    duration: float
    orientation: Orientation
    has_audio: bool
    is_image: bool


def probe(path: str | os.PathLike) -> VideoInfo:
    """Open `path`, decode its first frame, and describe it; a `UserError` if it cannot serve as video."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: face video or image not found; check the path")
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError):
        return _probe_image(path)
    with container:
        if not container.streams.video:
            what = "only audio" if container.streams.audio else "no video stream"
            raise UserError(f"{path}: has {what}; --face needs a video or an image")
        stream = container.streams.video[0]
        if _is_image_format(container.format.name):
            return _probe_image(path)
        first = _first_frame(container, stream, path)
        orientation = orientation_of(display_matrix(first))
        width, height = (first.height, first.width) if orientation.transpose else (first.width, first.height)
        fps = _stream_fps(stream)
        duration = _duration(container, stream)
        n_frames = stream.frames or max(1, round(duration * fps))
        return VideoInfo(
            path, width, height, fps, n_frames, duration, orientation, bool(container.streams.audio), False
        )


def _is_image_format(format_name: str) -> bool:
    """FFmpeg reads still images through the image2 demuxer or one of the `*_pipe` ones."""
    return format_name == "image2" or format_name.endswith("_pipe")


def _first_frame(container: av.container.InputContainer, stream, path: str) -> av.VideoFrame:
    try:
        for frame in container.decode(stream):
            return frame
    except (av.error.FFmpegError, ValueError) as e:
        raise UserError(f"{path}: its video stream cannot be decoded ({e})") from None
    raise UserError(f"{path}: the video has zero frames")


def _probe_image(path: str) -> VideoInfo:
    image = read_image(path)
    height, width = image.shape[:2]
    return VideoInfo(path, width, height, DEFAULT_FPS, 1, 0.0, Orientation(), False, True)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A still image as BGR uint8, by content (any name, any case), with its EXIF orientation applied."""
    path = os.fspath(path)
    data = np.fromfile(path, dtype=np.uint8)  # cv2.imread cannot open some non-ASCII paths
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise UserError(f"{path}: is neither a video nor an image that FFmpeg or OpenCV can read")
    return image


def _stream_fps(stream) -> Fraction:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and rate > 0:
            return Fraction(rate)
    return DEFAULT_FPS


def _duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration else 0.0


def iter_frames(path: str | os.PathLike, *, fps: float | Fraction | None = None) -> Iterator[np.ndarray]:
    """Yield the frames of a video (or the one frame of an image) as BGR uint8 H×W×3, as displayed.

    With `fps`, the timeline is resampled to that constant rate: output frame k (at k/fps seconds) shows
    the latest input frame shown by then, so frames are dropped or repeated. A constant-rate video read
    at its own rate comes out unchanged.
    """
    path = os.fspath(path)
    if probe(path).is_image:
        yield read_image(path)
        return
    frames = _decode(path)
    yield from ((image for *_, image in frames) if fps is None else _resample(frames, Fraction(fps)))


def _decode(path: str) -> Iterator[tuple[Fraction | None, Fraction, np.ndarray]]:
    """(timestamp or None, duration, BGR frame) per decoded frame, in seconds, as displayed."""
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            # frame threads overlap decoding with the rest of the pipeline; each holds frames of its own, so
            # above LARGE_FRAME_PIXELS (where one frame is tens of MB) slices of one frame are decoded in parallel
            large = stream.codec_context.width * stream.codec_context.height > LARGE_FRAME_PIXELS
            stream.thread_type = "SLICE" if large else "AUTO"
            nominal = 1 / _stream_fps(stream)
            for frame, orientation in with_orientation(container.decode(stream)):
                time = Fraction(frame.pts) * stream.time_base if frame.pts is not None else None
                duration = Fraction(frame.duration) * stream.time_base if frame.duration else nominal
                image = frame.to_ndarray(format="bgr24")
                yield time, duration, orientation.apply(image)
    except av.error.FFmpegError as e:
        raise UserError(f"{path}: decoding failed part way ({e})") from None


def _resample(frames: Iterator[tuple[Fraction | None, Fraction, np.ndarray]], fps: Fraction) -> Iterator[np.ndarray]:
    """Frame shown at t is held over output slots [ceil(t·fps), ceil(t_next·fps)); the last one until it ends."""
    start = None
    slot = 0  # the next output slot to fill
    held, end = None, Fraction(0)
    for index, (time, duration, image) in enumerate(frames):
        if time is None:  # no timestamps: assume the stream is already at the target rate
            time = Fraction(index) / fps
        start = time if start is None else start
        first_slot = math.ceil((time - start) * fps)
        if held is not None:
            for repeat in range(first_slot - slot):
                yield held if repeat == 0 else held.copy()  # each output frame its own array: stages write in place
            slot = max(slot, first_slot)
        held, end = image, time - start + duration
    if held is not None:
        for repeat in range(max(0 if slot else 1, math.ceil(end * fps) - slot)):
            yield held if repeat == 0 else held.copy()


def file_hash(path: str | os.PathLike) -> str:
    """blake2b of a file's bytes: the identity of a video for the detection cache, whatever its name."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class VideoWriter:
    """H.264 yuv420p video plus, optionally, the first audio stream of `audio_path` as AAC, in one pass.

    The file is written as `.<name>.partial-<id><suffix>` next to `path` and renamed to `path` by
    `close()`; `abort()` (or leaving the `with` block through an exception) deletes it, so a failed run
    never leaves a half-written output behind. Audio is interleaved with the video as frames arrive, so
    the muxer never buffers a whole track. Odd frame sizes lose their last row/column (yuv420p needs
    even sizes).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float | Fraction,
        width: int,
        height: int,
        audio_path: str | os.PathLike | None = None,
        *,
        audio_gain: float = 1.0,
        crf: str = DEFAULT_CRF,
        preset: str = DEFAULT_PRESET,
    ) -> None:
        self.path = Path(path)
        self.width, self.height = width - width % 2, height - height % 2
        if self.width < 2 or self.height < 2:
            raise UserError(f"{self.path}: frames of {width}x{height} are too small to encode")
        self.partial = PartialFile(self.path)
        container_format = CONTAINER_OF_SUFFIX.get(self.path.suffix.lower(), "mp4")
        self.container = open_output(self.partial.tmp, container_format)
        try:
            self.rate = _as_rate(fps)
            self.video = self.container.add_stream(VIDEO_CODEC, rate=self.rate)
            self.video.width, self.video.height, self.video.pix_fmt = self.width, self.height, PIX_FMT
            self.video.codec_context.time_base = 1 / self.rate
            self.video.options = {"crf": crf, "preset": preset}
            if self.width * self.height > LARGE_FRAME_PIXELS:
                self.video.options |= {"preset": LOW_MEMORY_PRESET, "x264-params": LOW_MEMORY_X264}
            self.audio_frames = _aac_frames(audio_path, audio_gain) if audio_path is not None else None
            self.audio = None
            if self.audio_frames is not None:
                first = next(self.audio_frames, None)
                if first is not None:
                    self._pending_audio = first
                    self.audio = self.container.add_stream(AUDIO_CODEC, rate=first.sample_rate)
                    self.audio.layout = first.layout.name
                    self.audio.bit_rate = AUDIO_BITRATE
            self.n_frames = 0
        except BaseException:
            self.abort()
            raise

    def write(self, frame_bgr: np.ndarray) -> None:
        """Encode one BGR uint8 frame, then the audio up to the same time."""
        image = frame_bgr[: self.height, : self.width]
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
        frame.pts = self.n_frames
        self.container.mux(self.video.encode(frame))
        self.n_frames += 1
        self._mux_audio_until(self.n_frames / self.rate)

    def _mux_audio_until(self, seconds: float | Fraction | None) -> None:
        """Encode audio frames that start before `seconds` (all remaining ones when None)."""
        if self.audio is None:
            return
        while self._pending_audio is not None and (
            seconds is None or self._pending_audio.pts < seconds * self._pending_audio.sample_rate
        ):
            self.container.mux(self.audio.encode(self._pending_audio))
            self._pending_audio = next(self.audio_frames, None)

    def close(self) -> Path:
        """Flush the encoders, finish the file and move it to its final name; returns that path."""
        try:
            self.container.mux(self.video.encode(None))
            self._mux_audio_until(None)
            if self.audio is not None:
                self.container.mux(self.audio.encode(None))
            self.container.close()
        except BaseException:
            self.abort()
            raise
        return self.partial.commit()

    def abort(self) -> None:
        """Drop the partial file."""
        if self.audio_frames is not None:
            self.audio_frames.close()
        with contextlib.suppress(av.error.FFmpegError, ValueError, OSError):
            self.container.close()
        self.partial.discard()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def open_output(path: Path, container_format: str) -> av.container.OutputContainer:
    """Open `path` for writing, its folder created; an unwritable place is a `UserError`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return av.open(os.fspath(path), "w", format=container_format)
    except (OSError, av.error.FFmpegError) as e:
        raise UserError(f"{path.parent}: cannot write the output there ({e}); choose another --outfile") from None


def _scaled(frame: av.AudioFrame, gain: float) -> av.AudioFrame:
    scaled = av.AudioFrame.from_ndarray(frame.to_ndarray() * np.float32(gain), format="fltp", layout=frame.layout.name)
    scaled.sample_rate = frame.sample_rate
    return scaled


def _as_rate(fps: float | Fraction) -> Fraction:
    """A frame rate as an exact fraction: 29.97 → 30000/1001, as containers store it."""
    return Fraction(fps).limit_denominator(1001)


def _aac_frames(audio_path: str | os.PathLike, gain: float = 1.0) -> Iterator[av.AudioFrame]:
    """The first audio stream of a file as planar-float frames of exactly `AAC_FRAME_SIZE` samples, times `gain`.

    Keeps the input's rate (if AAC can carry it) and its channels up to stereo; each frame's `pts` counts
    samples from zero.
    """
    audio_path = os.fspath(audio_path)
    try:
        with av.open(audio_path) as container:
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate or stream.rate
            rate = rate if rate in AAC_RATES else AAC_FALLBACK_RATE
            layout = "mono" if stream.codec_context.channels == 1 else "stereo"
            resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate, frame_size=AAC_FRAME_SIZE)
            samples = 0
            frames = itertools.chain(container.decode(stream), [None])  # None flushes the resampler
            for out in (out for frame in frames for out in resampler.resample(frame)):
                if gain != 1.0:
                    out = _scaled(out, gain)
                out.pts, samples = samples, samples + out.samples
                yield out
    except (av.error.FFmpegError, IndexError) as e:
        raise UserError(f"{audio_path}: cannot be decoded as audio ({e})") from None


def frames_to_cover(seconds: float, fps: float | Fraction) -> int:
    """How many frames at `fps` it takes to cover `seconds` (at least one)."""
    return max(1, math.ceil(seconds * float(fps) - 1e-9))
