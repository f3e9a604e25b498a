"""What FaceAlignment needs from a face detector, so another detector can stand in for S3FD."""

from __future__ import annotations

import abc

import numpy as np
import torch


class FaceDetector(abc.ABC):
    """A batch of uint8 RGB frames [B, H, W, 3] (on `self.device`) in, boxes (x1, y1, x2, y2, score) out."""

    device: torch.device

    @abc.abstractmethod
    def detect_from_batch(self, frames_rgb: torch.Tensor, max_side: int | None = None) -> list[np.ndarray]:
        """Per frame, every detection [K, 5] (float32, best first; K may be 0)."""

    def best_boxes(self, frames_rgb: torch.Tensor, max_side: int | None = None) -> list[np.ndarray | None]:
        """Per frame, the best detection [5] or None; detectors override this when it can be had cheaper."""
        return [d[0] if len(d) else None for d in self.detect_from_batch(frames_rgb, max_side)]
