"""The decode stage: the face input as a stream of prepared frames.

A video is decoded on a constant timeline at its average rate (`video.iter_frames`), then each frame is
prepared as the original prepared it: shrunk by `resize_factor`, turned by `rotate`, cropped by `crop`.
With `start`/`end` only the frames of that time range are used (the first at or after `start`, up to the
one before `end`), read by seeking to the keyframe before it. Nothing is kept between frames; the source is
re-readable (each `iter()` decodes the range again, from a file or a URL), which is how a video shorter
than the speech loops forward, within its range.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction

import cv2
import numpy as np

from common import video
from common.errors import UserError
from common.time_ranges import TimeRange, still_image_error
from face_detection import Box
from lipsync.options import Options


def region(values: Sequence[int], shape: tuple[int, ...]) -> Box:
    """(top, bottom, left, right) with the original's -1 meaning "to the edge" resolved for `shape`."""
    top, bottom, left, right = values
    return Box(left, top, shape[1] if right == -1 else right, shape[0] if bottom == -1 else bottom)


def check_region(values: Sequence[int], shape: tuple[int, ...], flag: str) -> Box:
    """`region`, which must be a non-empty part of a frame of `shape`; `flag` names the option for the error."""
    box = region(values, shape)
    if not (0 <= box.y1 < box.y2 <= shape[0] and 0 <= box.x1 < box.x2 <= shape[1]):
        raise UserError(
            f"{flag} {' '.join(map(str, values))} (top bottom left right) is not a non-empty region inside "
            f"the {shape[1]}x{shape[0]} frame; choose values within it"
        )
    return box


def prepare_frame(frame: np.ndarray, resize_factor: int, rotate: bool, crop: Box | None) -> np.ndarray:
    """The original's per-frame preparation, in its order: shrink, turn right by 90°, crop."""
    if resize_factor > 1:
        frame = cv2.resize(frame, (frame.shape[1] // resize_factor, frame.shape[0] // resize_factor))
    if rotate:
        frame = cv2.rotate(frame, cv2.ROTATE_90_CLOCKWISE)
    return frame if crop is None else frame[crop.y1 : crop.y2, crop.x1 : crop.x2]


class FrameSource:
    """Re-readable stream of prepared frames of the face input (its range); knows its shape and rate up front."""

    def __init__(self, info: video.VideoInfo, opts: Options, image_fps: float) -> None:
        self.info, self.opts = info, opts
        self.rate = None if info.is_image else info.fps  # constant timeline at the average rate
        self.fps = float(opts.fps or image_fps) if info.is_image else float(info.fps)
        self.static = opts.static or info.is_image
        self.span = checked_range(opts.face_range, info)
        raw = next(video.iter_frames(info.path, fps=self.rate, span=self.span), None)
        if raw is None and self.span.is_set:
            raise self.span.empty_error(info.path, info.duration, "frames")
        if raw is None:
            raise UserError(f"{info.path}: the face video yielded no frames")
        shrunk = prepare_frame(raw, opts.resize_factor, opts.rotate, None).shape
        self.crop = check_region(opts.crop, shrunk, "--crop")
        self.shape = prepare_frame(raw, opts.resize_factor, opts.rotate, self.crop).shape

    @property
    def frame_bytes(self) -> int:
        """Bytes each output frame in flight holds: none for a static face, whose one frame is shared."""
        return 0 if self.static else int(np.prod(self.shape))

    @property
    def writer_fps(self) -> float | Fraction:
        """The output's rate: exactly the video's own (a fraction such as 30000/1001), or the image's."""
        return self.fps if self.info.is_image else self.info.fps

    def identity(self) -> str | list:
        """What the frames are, for the detection cache: the video's content hash, and the range's frames."""
        digest = video.file_hash(self.info.path)
        if not self.span.is_set or self.rate is None:
            return digest
        return [digest, self.span.first(self.rate), self.span.stop(self.rate)]

    def __iter__(self) -> Iterator[np.ndarray]:
        for frame in video.iter_frames(self.info.path, fps=self.rate, span=self.span):
            yield prepare_frame(frame, self.opts.resize_factor, self.opts.rotate, self.crop)


def checked_range(span: TimeRange, info: video.VideoInfo) -> TimeRange:
    """`span`, which must lie within the video and hold a frame (a `UserError` naming the flags and the
    video's duration otherwise); a range on a still image is an error too. It may end up to half a frame
    past the stated duration, which containers round."""
    if span.is_set and info.is_image:
        raise still_image_error(span.flags, info.path)
    if span.is_set:
        span.check(info.path, info.duration, info.fps, 1 / (2 * info.fps))
    return span


def loop_frames(source: Iterable[np.ndarray], n: int, static: bool) -> Iterator[tuple[int, np.ndarray]]:
    """(video index, frame) for `n` output frames: the first frame over and over if `static`, else the
    video looping forward (re-read from the start) as the original's `i % len(frames)`.

    A static frame is decoded once and the same array yielded each time: a 20-megapixel still costs its
    60 MB once, not per frame in flight. Stages must not write into it (`crops.paste_batches` copies it).
    """
    if static:
        first = next(iter(source))
        for _ in range(n):
            yield 0, first
        return
    produced = 0
    while produced < n:
        index = 0
        for index, frame in enumerate(source):  # noqa: B007 - a fresh read of the video each lap
            if produced == n:
                return
            yield index, frame
            produced += 1
        if index == 0 and produced == 0:
            raise UserError("the face video yielded no frames")
