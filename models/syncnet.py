"""The lip-sync expert, SyncNet_color (paper §3.1): embeds 5 lower-half frames and 0.2 s of speech.

Trained with BCE on the cosine similarity of the two L2-normalised embeddings; frozen while training the
generator, where it scores sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv import Conv2d, res
from .wav2lip import speech_encoder


class SyncNet_color(nn.Module):
    def __init__(self):
        super().__init__()
        self.face_encoder = nn.Sequential(
            Conv2d(15, 32, 7, 1, 3),  # 5 RGB frames stacked on channels, 48×96
            Conv2d(32, 64, 5, (1, 2), 1), res(64), res(64),
            Conv2d(64, 128, 3, 2, 1), res(128), res(128), res(128),
            Conv2d(128, 256, 3, 2, 1), res(256), res(256),
            Conv2d(256, 512, 3, 2, 1), res(512), res(512),
            Conv2d(512, 512, 3, 2, 1), Conv2d(512, 512, 3, 1, 0), Conv2d(512, 512, 1, 1, 0),
        )  # fmt: skip
        self.audio_encoder = speech_encoder(blocks_per_stage=(2, 2, 2, 2))

    def forward(self, audio_sequences: torch.Tensor, face_sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,1,80,16), (B,15,48,96) → unit-length (B,512) audio and face embeddings."""
        audio_embedding = self.audio_encoder(audio_sequences).flatten(1)
        face_embedding = self.face_encoder(face_sequences).flatten(1)
        return F.normalize(audio_embedding, p=2, dim=1), F.normalize(face_embedding, p=2, dim=1)


def cosine_loss(audio_embedding: torch.Tensor, face_embedding: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE between the cosine similarity (as a probability) and the in-sync label y of shape (B, 1)."""
    d = F.cosine_similarity(audio_embedding, face_embedding)
    return F.binary_cross_entropy(d.unsqueeze(1), y)
