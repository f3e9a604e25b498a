"""The visual-quality discriminator of Wav2Lip+GAN (paper §3.3), judging the lower half of each frame."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv import nonorm_Conv2d
from .wav2lip import fold_time


class Wav2Lip_disc_qual(nn.Module):
    def __init__(self):
        super().__init__()
        self.face_encoder_blocks = nn.ModuleList(
            [
                nn.Sequential(nonorm_Conv2d(3, 32, 7, 1, 3)),  # 48×96
                nn.Sequential(nonorm_Conv2d(32, 64, 5, (1, 2), 2), nonorm_Conv2d(64, 64, 5, 1, 2)),  # 48×48
                nn.Sequential(nonorm_Conv2d(64, 128, 5, 2, 2), nonorm_Conv2d(128, 128, 5, 1, 2)),  # 24×24
                nn.Sequential(nonorm_Conv2d(128, 256, 5, 2, 2), nonorm_Conv2d(256, 256, 5, 1, 2)),  # 12×12
                nn.Sequential(nonorm_Conv2d(256, 512, 3, 2, 1), nonorm_Conv2d(512, 512, 3, 1, 1)),  # 6×6
                nn.Sequential(nonorm_Conv2d(512, 512, 3, 2, 1), nonorm_Conv2d(512, 512, 3, 1, 1)),  # 3×3
                nn.Sequential(nonorm_Conv2d(512, 512, 3, 1, 0), nonorm_Conv2d(512, 512, 1, 1, 0)),  # 1×1
            ]
        )
        self.binary_pred = nn.Sequential(nn.Conv2d(512, 1, 1, 1, 0), nn.Sigmoid())

    def _lower_half_frames(self, face_sequences: torch.Tensor) -> torch.Tensor:
        """(B,3,T,96,96) → (T*B,3,48,96), time-major like the generator."""
        frames = fold_time(face_sequences, 2)
        return frames[:, :, frames.size(2) // 2 :]

    def forward(self, face_sequences: torch.Tensor) -> torch.Tensor:
        """Probability that each frame is real, (T*B, 1)."""
        x = self._lower_half_frames(face_sequences)
        for block in self.face_encoder_blocks:
            x = block(x)
        return self.binary_pred(x).view(len(x), -1)

    def perceptual_forward(self, false_face_sequences: torch.Tensor) -> torch.Tensor:
        """The generator's adversarial loss: BCE of the generated frames against the label 'real'.

        The trainer calls this under autocast; BCE is computed in float32 outside it, since autocast
        refuses `binary_cross_entropy` in half precision (the log of a probability near 0 or 1 underflows).
        """
        pred = self.forward(false_face_sequences).float()
        with torch.autocast(pred.device.type, enabled=False):
            return F.binary_cross_entropy(pred, torch.ones_like(pred))
