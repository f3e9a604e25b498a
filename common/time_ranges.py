"""Time ranges of media (`--start/--end`, `--audio_start/--audio_end`): parsed, checked, and read exactly.

A range is half-open, [start, end), on the media's own timeline, whose zero is its first frame (or sample):
- a video's frames are those of the constant timeline at its average rate (`video.iter_frames`) whose
  timestamp k/fps lies in the range: frames ceil(start·fps) up to, not including, ceil(end·fps). That is
  what cutting the clip by timestamps keeps (FFmpeg's `-ss S -to E` with re-encoding, or selecting frames
  with start <= t < end), so a run on the range and a run on the clip cut beforehand see the same frames;
- audio keeps the samples k/rate in the range, at the stream's own rate, before any resampling.

Times are exact fractions, so `--start 0.1` at 30 fps is frame 3, not 4 as 0.1·30 = 3.0000000000000004 in
floating point would give. Reading seeks instead of decoding from the start: to the keyframe before the
range for video (decoding must start there), to `AUDIO_PREROLL_S` before it for audio (a decoder's first
frames after a jump lack the overlap of the frames before them), then decodes forward and drops what lies
before the range.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from common.errors import UserError

AUDIO_PREROLL_S = Fraction(1, 2)  # decoded before an audio range and dropped: AAC needs 1 frame, MP3 a few, Opus 80 ms
AUDIO_SLACK_S = Fraction(1, 100)  # an audio range may end this far past the reported duration (containers round it)
TIME_PATTERN = re.compile(r"^(?:(?:(\d+):)?(\d+):)?(\d+(?:\.\d*)?|\.\d+)$")  # [[HH:]MM:]SS[.fff]


def parse_time(value: str | float | Fraction, flag: str) -> Fraction:
    """Seconds as an exact fraction, from `12.5`, `"12.5"`, `"00:00:12.500"` or `"1:02.5"`; `flag` names the
    option in the error. A float is read as the decimal it prints as (0.1 is 1/10)."""
    if isinstance(value, Fraction | int):
        seconds = Fraction(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise UserError(f"{flag} {value}: not a time; give seconds (12.5) or HH:MM:SS.ms (00:00:12.500)")
        seconds = Fraction(repr(value))
    else:
        match = TIME_PATTERN.match(str(value).strip())
        if not match:
            raise UserError(f"{flag} {value}: not a time; give seconds (12.5) or HH:MM:SS.ms (00:00:12.500)")
        hours, minutes, rest = match.groups()
        seconds = Fraction(rest) + 60 * int(minutes or 0) + 3600 * int(hours or 0)
    if seconds < 0:
        raise UserError(f"{flag} {value}: a time cannot be negative")
    return seconds


def optional_time(value: str | float | Fraction | None, flag: str) -> Fraction | None:
    """`parse_time`, with None (or an empty string) meaning the option is not set."""
    return None if value is None or value == "" else parse_time(value, flag)


def format_time(seconds: Fraction | float) -> str:
    """A time for a message: `12.5 s`, to the millisecond."""
    return f"{float(seconds):.3f}".rstrip("0").rstrip(".") + " s"


@dataclass(frozen=True)
class TimeRange:
    """[start, end) in seconds (None: from the beginning, to the end), and the two flags that set it."""

    start: Fraction | None = None
    end: Fraction | None = None
    flags: tuple[str, str] = ("--start", "--end")

    @classmethod
    def of(cls, start: str | float | None, end: str | float | None, flags: tuple[str, str]) -> TimeRange:
        """The range two options give (None: unset), parsed; a malformed time is a `UserError` naming its flag."""
        return cls(optional_time(start, flags[0]), optional_time(end, flags[1]), flags)

    @property
    def is_set(self) -> bool:
        return self.start is not None or self.end is not None

    def first(self, rate: Fraction | int) -> int:
        """The index of the first frame (or sample) at `rate` in the range: the first whose time is >= start."""
        return math.ceil(self.start * rate) if self.start is not None else 0

    def stop(self, rate: Fraction | int) -> int | None:
        """One past the last index in the range (None: to the end of the media)."""
        return math.ceil(self.end * rate) if self.end is not None else None

    def describe(self) -> str:
        """The flags as given, for a message: `--start 2 --end 5`."""
        parts = [(flag, t) for flag, t in zip(self.flags, (self.start, self.end), strict=True) if t is not None]
        return " ".join(f"{flag} {format_time(t)[:-2]}" for flag, t in parts)

    def check(self, path: str, duration: float | None, rate: Fraction | int, slack: Fraction) -> None:
        """A `UserError` naming the flags and the media's duration for a range that lies (partly) outside the
        media or holds no frame (or sample) at `rate`; the end may pass the duration by `slack`."""
        length = f"{path} is {format_time(duration)} long" if duration else f"{path} has no known duration"
        if self.end is not None and self.start is not None and self.end <= self.start:
            raise UserError(f"{self.describe()}: an empty range ({length}); the end must come after the start")
        if duration:
            if self.start is not None and self.start >= Fraction(duration):
                raise UserError(f"{self.flags[0]} {format_time(self.start)[:-2]}: at or after the end ({length}); "
                                "choose a start within it")  # fmt: skip
            if self.end is not None and self.end > Fraction(duration) + slack:
                raise UserError(f"{self.flags[1]} {format_time(self.end)[:-2]}: after the end ({length}); "
                                "choose an end within it")  # fmt: skip
        stop = self.stop(rate)
        if stop is not None and stop <= self.first(rate):
            raise UserError(f"{self.describe()}: holds no frame at {float(rate):g} per second ({length}); widen it")

    def empty_error(self, path: str, duration: float | None, what: str) -> UserError:
        """The error for a range that turned out to hold nothing when read (the duration was an estimate)."""
        length = f"{path} is {format_time(duration)} long" if duration else f"{path} has no known duration"
        return UserError(f"{self.describe()}: no {what} in the range ({length}); choose an earlier start")


def still_image_error(flags: tuple[str, str], path: str) -> UserError:
    """The error for a range on a still image."""
    return UserError(f"{'/'.join(flags)}: {path} is a still image (no duration); a time range needs a video")


def seek_video(container: av.container.InputContainer, stream: av.video.stream.VideoStream, time: Fraction) -> None:
    """Jump to the keyframe at or before `time` (seconds on the stream's clock): decoding must start there."""
    container.seek(math.floor(time / stream.time_base), stream=stream, backward=True)


def audio_planes(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream, span: TimeRange, rate: int
) -> Iterator[np.ndarray]:
    """The samples of `stream` in `span` as float32 (channels × n) blocks, exactly those of a decode from the
    start: seeks `AUDIO_PREROLL_S` before the range, places the first decoded block by its timestamp, counts
    samples from there, and drops what lies outside. Decodes from the start where the seek lands too late."""
    first, stop = span.first(rate), span.stop(rate)
    if first > 0:
        origin = Fraction(stream.start_time or 0) * stream.time_base
        target = origin + Fraction(first, rate) - AUDIO_PREROLL_S
        container.seek(max(0, math.floor(target / stream.time_base)), stream=stream)
    blocks = _placed_blocks(container, stream, rate, seek=first > 0)
    head = next(blocks, None)
    if head is not None and head[0] > first:  # the seek landed after the range's start: read from the start
        blocks.close()
        container.seek(stream.start_time or 0, stream=stream)
        blocks = _placed_blocks(container, stream, rate, seek=False)
        head = next(blocks, None)
    if head is None:
        return
    for lo, planes in itertools.chain([head], blocks):
        if stop is not None and lo >= stop:
            return
        if lo + planes.shape[1] > first:
            yield planes[:, max(0, first - lo) : None if stop is None else stop - lo]


def _placed_blocks(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream, rate: int, seek: bool
) -> Iterator[tuple[int, np.ndarray]]:
    """(index of its first sample, float32 channels × n) per decoded block. From the start, samples are
    counted from the first one decoded (as a whole decode concatenates them); after a seek, the first block
    is placed by its timestamp on the stream's clock, whose zero is the stream's start."""
    origin = Fraction(stream.start_time or 0) * stream.time_base
    to_float = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=rate)
    position = None if seek else 0
    for frame in itertools.chain(container.decode(stream), [None]):  # None flushes the converter
        if position is None:
            position = (
                0 if frame is None or frame.pts is None else round((frame.pts * stream.time_base - origin) * rate)
            )
        for block in to_float.resample(frame):
            planes = block.to_ndarray()
            yield position, planes
            position += planes.shape[1]
