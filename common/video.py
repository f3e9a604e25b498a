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
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from common import media_urls
from common.atomic_files import PartialFile
from common.errors import UserError
from common.orientation import Orientation, display_matrix, orientation_of, with_orientation
from common.time_ranges import TimeRange, audio_planes, seek_video, still_image_error

DEFAULT_FPS = Fraction(25)  # when a stream states no rate at all: the rate Wav2Lip was trained at (hparams.fps)
VIDEO_CODEC = "libx264"
PIX_FMT = "yuv420p"  # what every player decodes; needs even width and height
# x264's quality: superfast at crf 20 keeps veryfast-at-crf-18's PSNR against the frames it encodes (39.8 dB on
# a 1080p clip, 39.1 dB at 576x768; visually lossless) for 0.5-0.7x its CPU time (at 1080p, 21-23 vs 32-49 ms
# a frame, as much as the bf16 generator's), in a file 1.3-1.5x larger. The original's final ffmpeg call used
# x264's defaults (medium, crf 23), which cost as much CPU as the generator on small frames.
DEFAULT_CRF = "20"
DEFAULT_PRESET = "superfast"
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
MAX_IMAGE_BYTES = 256 << 20  # a still image read from a URL
CONTAINER_OF_SUFFIX = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}


@dataclass(frozen=True)
class VideoInfo:
    """What the pipeline needs to know about a face input before decoding it.

    `width`/`height` are as displayed, after `orientation` (the display matrix's turn and mirror).
    `n_frames` is the container's estimate (1 for an image). `start_time`: the first frame's timestamp in
    seconds, the zero of `iter_frames`' timeline (None when frames carry none).
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
    start_time: Fraction | None = Fraction(0)


def probe(path: str | os.PathLike) -> VideoInfo:
    """Open `path`, decode its first frame, and describe it; a `UserError` if it cannot serve as video."""
    path = os.fspath(path)
    if not media_urls.is_url(path) and not os.path.isfile(path):
        raise UserError(f"{path}: face video or image not found; check the path")
    try:
        container = media_urls.open_input(path)
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
        start = None if first.pts is None else first.pts * Fraction(stream.time_base)
        return VideoInfo(
            path, width, height, fps, n_frames, duration, orientation, bool(container.streams.audio), False, start
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
    if media_urls.is_url(path):
        data = np.frombuffer(media_urls.read_bytes(path, MAX_IMAGE_BYTES), np.uint8)
    else:
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


def iter_frames(
    path: str | os.PathLike, *, fps: float | Fraction | None = None, span: TimeRange | None = None
) -> Iterator[np.ndarray]:
    """Yield the frames of a video (or the one frame of an image) as BGR uint8 H×W×3, as displayed.

    With `fps`, the timeline is resampled to that constant rate: output frame k (at k/fps seconds from the
    first frame) shows the latest input frame shown by then, so frames are dropped or repeated. A
    constant-rate video read at its own rate comes out unchanged. `span` keeps the frames k of that timeline
    (at `fps`, or the stream's average rate) whose time lies in it (`TimeRange.first` to `stop`), decoding
    from the keyframe before it rather than from the start. A URL that ends before the frames its
    duration promises is a `UserError`.
    """
    path = os.fspath(path)
    info = probe(path)
    if info.is_image:
        if span is not None and span.is_set:
            raise still_image_error(span.flags, path)
        yield read_image(path)
        return
    if fps is None and (span is None or not span.is_set):
        yield from (frame.bgr() for *_, frame in _decode(path))
        return
    rate, span = Fraction(fps or info.fps), span or TimeRange()
    first, stop = span.first(rate), span.stop(rate)
    seek = info.start_time + first / rate if first and info.start_time is not None else None
    slot = first - 1
    for slot, frame in _timeline(_decode(path, seek), rate, info.start_time if seek is not None else None):
        if stop is not None and slot >= stop:
            return
        if slot >= first:
            yield frame.bgr()
    expected = min(stop or info.n_frames, math.floor(info.duration * rate))
    if media_urls.is_url(path) and slot + 1 < expected - 1:
        raise UserError(f"{path}: the stream ended early, at {float((slot + 1) / rate):.2f} s of "
                        f"{info.duration:.2f} s (the connection dropped?)")  # fmt: skip


@dataclass(frozen=True)
class Decoded:
    """A decoded frame, turned into a BGR array as displayed only when shown: the frames before a range are
    decoded (they lead from the keyframe to it) but never converted. Each call converts afresh, so a frame
    shown twice gives two arrays (stages write into their frames)."""

    frame: av.VideoFrame
    orientation: Orientation

    def bgr(self) -> np.ndarray:
        return self.orientation.apply(self.frame.to_ndarray(format="bgr24"))


def _decode(path: str, seek: Fraction | None = None) -> Iterator[tuple[Fraction | None, Fraction, Decoded]]:
    """(timestamp or None, duration, frame) per decoded frame, in seconds; from the keyframe at or before
    `seek`, or from the start where there is none (an imprecise index lands after it)."""
    try:
        with media_urls.open_input(path) as container:
            stream = container.streams.video[0]
            # frame threads overlap decoding with the rest of the pipeline; each holds frames of its own, so
            # above LARGE_FRAME_PIXELS (where one frame is tens of MB) slices of one frame are decoded in parallel
            large = stream.codec_context.width * stream.codec_context.height > LARGE_FRAME_PIXELS
            stream.thread_type = "SLICE" if large else "AUTO"
            frames = _timed(container, stream, seek)
            head = next(frames, None)
            if seek is not None and head is not None and head[0] is not None and head[0] > seek:
                frames.close()
                container.seek(stream.start_time or 0, stream=stream)
                frames = _timed(container, stream, None)
                head = next(frames, None)
            if head is not None:
                yield head
                yield from frames
    except av.error.FFmpegError as e:
        if media_urls.is_url(path):
            raise media_urls.url_error(path, e) from None
        raise UserError(f"{path}: decoding failed part way ({e})") from None


def _timed(container, stream, seek: Fraction | None) -> Iterator[tuple[Fraction | None, Fraction, Decoded]]:
    if seek is not None:
        seek_video(container, stream, seek)
    nominal = 1 / _stream_fps(stream)
    for frame, orientation in with_orientation(container.decode(stream)):
        time = Fraction(frame.pts) * stream.time_base if frame.pts is not None else None
        duration = Fraction(frame.duration) * stream.time_base if frame.duration else nominal
        yield time, duration, Decoded(frame, orientation)


def _timeline(
    frames: Iterator[tuple[Fraction | None, Fraction, Decoded]], fps: Fraction, origin: Fraction | None
) -> Iterator[tuple[int, Decoded]]:
    """(slot, frame) of the constant timeline at `fps` whose slot 0 is at `origin` (None: the first frame's
    time): the frame shown at t holds slots [ceil((t - origin)·fps), ceil((t_next - origin)·fps)), the last
    one until it ends, and at least one slot."""
    slot = start = None  # the next slot to fill; the first one filled
    held, end = None, Fraction(0)
    for index, (time, duration, frame) in enumerate(frames):
        if time is None:  # no timestamps: assume the stream is already at the target rate
            time = Fraction(index) / fps
        origin = time if origin is None else origin
        first_slot = math.ceil((time - origin) * fps)
        if held is None:
            slot = start = max(0, first_slot)
        else:
            yield from ((s, held) for s in range(slot, first_slot))
            slot = max(slot, first_slot)
        held, end = frame, time - origin + duration
    if held is not None:
        yield from ((s, held) for s in range(slot, max(slot + (slot == start), math.ceil(end * fps))))


def file_hash(path: str | os.PathLike) -> str:
    """blake2b of a file's bytes: the identity of a video for the detection cache, whatever its name. A URL's
    is its address's (hashing its content would download it whole)."""
    digest = hashlib.blake2b(digest_size=20)
    if media_urls.is_url(path):
        digest.update(f"url:{path}".encode())
        return digest.hexdigest()
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
        audio_span: TimeRange | None = None,
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
            self.audio_frames = _aac_frames(audio_path, audio_gain, audio_span) if audio_path is not None else None
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


def _aac_frames(
    audio_path: str | os.PathLike, gain: float = 1.0, span: TimeRange | None = None
) -> Iterator[av.AudioFrame]:
    """The first audio stream of a file (or URL) as planar-float frames of exactly `AAC_FRAME_SIZE` samples,
    times `gain`; only the samples in `span` when given (`time_ranges.audio_planes`).

    Keeps the input's rate (if AAC can carry it) and its channels up to stereo; each frame's `pts` counts
    samples from zero.
    """
    audio_path = os.fspath(audio_path)
    try:
        with media_urls.open_input(audio_path, "audio") as container:
            stream = container.streams.audio[0]
            native = rate = stream.codec_context.sample_rate or stream.rate
            rate = rate if rate in AAC_RATES else AAC_FALLBACK_RATE
            layout = "mono" if stream.codec_context.channels == 1 else "stereo"
            resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate, frame_size=AAC_FRAME_SIZE)
            samples = 0
            decoded = container.decode(stream)
            if span is not None and span.is_set:
                decoded = _as_frames(audio_planes(container, stream, span, native), stream.layout.name, native)
            frames = itertools.chain(decoded, [None])  # None flushes the resampler
            for out in (out for frame in frames for out in resampler.resample(frame)):
                if gain != 1.0:
                    out = _scaled(out, gain)
                out.pts, samples = samples, samples + out.samples
                yield out
    except (av.error.FFmpegError, IndexError) as e:
        raise UserError(f"{audio_path}: cannot be decoded as audio ({e})") from None


def _as_frames(blocks: Iterator[np.ndarray], layout: str, rate: int) -> Iterator[av.AudioFrame]:
    """Float32 (channels × n) blocks as audio frames, for a resampler."""
    for planes in blocks:
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes), format="fltp", layout=layout)
        frame.sample_rate = rate
        yield frame


def frames_to_cover(seconds: float, fps: float | Fraction) -> int:
    """How many frames at `fps` it takes to cover `seconds` (at least one)."""
    return max(1, math.ceil(seconds * float(fps) - 1e-9))
