"""How players show a decoded frame: the display matrix phones and editors write (a quarter turn, a mirror,
or both), read from FFmpeg's side data and applied as FFmpeg's own autorotation applies it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import av
import cv2
import numpy as np
from av.sidedata.sidedata import Type as SideDataType

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
