"""The entry point Wav2Lip scripts (and projects copying them) use: one face box per frame.

`FaceAlignment(LandmarksType._2D, flip_input=False, device=...)` and `get_detections_for_batch(frames)`
keep the original's names and results; only detection is implemented, as in Wav2Lip's trimmed copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from common.errors import UserError

from .detection.core import FaceDetector
from .detection.sfd import SFDDetector

Frames = np.ndarray | torch.Tensor | Sequence[np.ndarray]  # [B, H, W, 3] BGR, uint8 from a decoder
DETECTORS: dict[str, type[FaceDetector]] = {"sfd": SFDDetector}


class Box(NamedTuple):
    """A face box in pixels: the project's one convention, everywhere.

    (x1, y1) is the top-left corner and (x2, y2) the bottom-right one, exclusive: the box covers
    `frame[y1:y2, x1:x2]`. This is S3FD's order, so detections enter as they are; the original's flags
    `--box`, `--pads` and `--crop` list (top, bottom, left, right) = (y1, y2, x1, x2), and are converted
    where they enter, by `from_tblr`.
    """

    x1: int
    y1: int
    x2: int
    y2: int

    @classmethod
    def from_tblr(cls, values: Sequence[int]) -> Box:
        top, bottom, left, right = values
        return cls(left, top, right, bottom)

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1


class LandmarksType(Enum):
    """Kept for the original's call signature; detection does not depend on it."""

    _2D = 1
    _2halfD = 2
    _3D = 3


class NetworkSize(Enum):
    """Kept for the original's call signature; detection does not depend on it."""

    LARGE = 4

    def __int__(self) -> int:
        return self.value


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def as_frames(images: Frames, device: torch.device) -> torch.Tensor:
    """[B, H, W, 3] frames (an array or list of arrays, any strides, or a tensor anywhere) on `device`.

    The pixels travel in their own dtype (uint8 from a decoder: a quarter of float32's bytes).
    """
    frames = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [B, H, W, 3], got shape {tuple(frames.shape)}")
    return frames.to(device)


def to_box(row: np.ndarray | None) -> Box | None:
    """The original's rounding: clip at 0 from below only (x2, y2 may pass the frame), then int()."""
    if row is None:
        return None
    return Box(*(int(v) for v in np.clip(row[:4], 0, None)))


class FaceAlignment:
    """A face detector for BGR frames, built once per process per (weights file, device).

    `max_side`: detect on frames shrunk so their longest side is at most this many pixels and scale the
    boxes back (faster on large frames); None keeps the original's full-resolution detection.
    `network`: S3FD's forward pass to use instead of loading `path_to_detector` (e.g. an ONNX Runtime
    session, `onnx_backend.OnnxNet`): preprocessing, decoding and NMS stay the same code.
    `dtype`: the network's precision (a run's `--precision`): bf16 or fp16 convolutions, with the L2
    normalisations, the heads and everything after them in float32 (`net_s3fd.prepare_s3fd`).
    """

    def __init__(
        self,
        landmarks_type: LandmarksType = LandmarksType._2D,
        network_size: NetworkSize = NetworkSize.LARGE,
        device: str | torch.device | None = None,
        flip_input: bool = False,
        face_detector: str = "sfd",
        verbose: bool = False,
        path_to_detector: str | Path | None = None,
        max_side: int | None = None,
        network: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"face detection: device {device!r} asked for but CUDA is not available; use 'cpu'")
        if face_detector not in DETECTORS:
            raise UserError(f"face detection: unknown face_detector {face_detector!r}; choose from {sorted(DETECTORS)}")
        if max_side is not None and max_side < 1:
            raise UserError(f"face detection: max_side must be a positive number of pixels, got {max_side}")
        self.max_side = max_side
        extra = {"network": network} if network is not None else {"dtype": dtype}
        self.face_detector = DETECTORS[face_detector](
            self.device, path_to_detector=path_to_detector, verbose=verbose, **extra
        )

    def get_detections_for_batch(self, images: Frames) -> list[Box | None]:
        """Per BGR frame of `images` [B, H, W, 3], its face box (x1, y1, x2, y2) or None when no face.

        The whole batch goes through the network at once; as in the original, which anchors are considered
        depends on every frame of the batch, so keep batch composition fixed when comparing runs.
        """
        frames_rgb = as_frames(images, self.device).flip(-1)
        return [to_box(row) for row in self.face_detector.best_boxes(frames_rgb, self.max_side)]
