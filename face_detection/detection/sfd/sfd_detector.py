"""S3FD behind the FaceDetector interface: weight loading (once per process) and the two score cuts."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.weights import load_model, missing_file_message, skeleton

from ..core import FaceDetector
from .bbox import best_index, nms
from .detect import batch_detect
from .net_s3fd import prepare_s3fd, s3fd

WEIGHTS_FLAG = "--detector_path (path_to_detector= from Python)"  # how a user points at another weights file
NMS_OVERLAP = 0.3  # boxes overlapping a better one by more than this are dropped
KEEP_SCORE = 0.5  # detections must score above this


def default_weights_path() -> Path:
    """face_detection/detection/sfd/s3fd.pth, next to this file whatever the working directory."""
    return Path(__file__).resolve().parent / "s3fd.pth"


@functools.lru_cache(maxsize=4)
def _cached_net(path: str, device: str, stamp: tuple[int, int], dtype: torch.dtype) -> s3fd:
    """One network per (file, device, file version, dtype) per process; `stamp` reloads a replaced file."""
    return prepare_s3fd(load_model(skeleton(s3fd), path, "s3fd", device, flag=WEIGHTS_FLAG), device, dtype)


def existing_weights(path: str | Path | None = None) -> Path:
    """The weights file to load (default: `default_weights_path()`); a missing one is a one-line UserError."""
    path = Path(path).expanduser().resolve() if path is not None else default_weights_path()
    if not path.is_file():
        raise UserError(missing_file_message(path, "s3fd", WEIGHTS_FLAG))
    return path


def load_net(
    path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> s3fd:
    """The S3FD network with the weights at `path` (default: `default_weights_path()`), built once per
    dtype (`net_s3fd.prepare_s3fd`: below float32, the trunk only).

    A missing, damaged or wrong-model file is a one-line UserError naming it (see checkpoints.py).
    """
    path = existing_weights(path)
    stat = path.stat()
    return _cached_net(str(path), str(torch.device(device)), (stat.st_mtime_ns, stat.st_size), dtype)


class SFDDetector(FaceDetector):
    """S3FD with the original Wav2Lip post-processing: NMS at 0.3 overlap, then scores above 0.5.

    `network` replaces the torch network loaded from `path_to_detector` with any callable of the same
    forward pass (float [B, 3, H, W] in, the 12 head outputs out), such as an ONNX Runtime session.
    `dtype`: the loaded network's trunk precision (the heads' outputs are float32 in every dtype).
    """

    def __init__(
        self,
        device: str | torch.device,
        path_to_detector: str | Path | None = None,
        verbose: bool = False,
        network: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.device = torch.device(device)
        self.face_detector = network if network is not None else load_net(path_to_detector, self.device, dtype)

    def detect_from_batch(self, frames_rgb: torch.Tensor, max_side: int | None = None) -> list[np.ndarray]:
        out = []
        for dets in batch_detect(self.face_detector, frames_rgb, max_side):
            kept = dets[nms(dets, NMS_OVERLAP)] if len(dets) else dets
            out.append(kept[kept[:, 4] > KEEP_SCORE].cpu().numpy())
        return out

    def best_boxes(self, frames_rgb: torch.Tensor, max_side: int | None = None) -> list[np.ndarray | None]:
        """Same answer as `detect_from_batch(...)[i][0]`, without NMS (see `top_boxes`)."""
        return top_boxes(batch_detect(self.face_detector, frames_rgb, max_side))


def top_boxes(dets: torch.Tensor) -> list[np.ndarray | None]:
    """Per frame of candidates [B, N, 5], the top-scoring row when it scores above KEEP_SCORE, else None.

    NMS always keeps the top-scoring box first and every later box scores no higher, so the first box
    surviving the 0.5 cut is the top box when it scores above 0.5, and there is none otherwise.
    """
    if dets.shape[1] == 0:
        return [None] * len(dets)
    top = torch.tensor([best_index(s) for s in dets[..., 4].cpu().numpy()], device=dets.device)
    rows = dets[torch.arange(len(dets), device=dets.device), top].cpu().numpy()
    return [row if row[4] > KEEP_SCORE else None for row in rows]
