"""The generator of Wav2Lip (paper §3.2): a face encoder, a speech encoder and a face decoder with skips.

Input faces are 6 channels, the masked target (lower half zeroed) next to a reference frame, at 96×96; the
speech input is a 80×16 mel window (0.2 s). The decoder starts from the 512-d speech embedding and
concatenates the face encoder's feature map of the same size at each scale (U-Net style skips).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .conv import Conv2d, Conv2dTranspose, res

FINE_STAGES = 3  # the 96×96, 48×48 and 24×24 stages at each end of the U-Net


def speech_encoder(out_channels: int = 512, blocks_per_stage: tuple[int, ...] = (2, 2, 2, 1)) -> nn.Sequential:
    """80×16 mel window → 512×1×1 embedding; shared in shape by the generator and the expert."""
    widths, strides = (32, 64, 128, 256), (1, (3, 1), 3, (3, 2))
    layers: list[nn.Module] = []
    cin = 1
    for width, stride, n_res in zip(widths, strides, blocks_per_stage, strict=True):
        layers += [Conv2d(cin, width, 3, stride, 1), *(res(width) for _ in range(n_res))]
        cin = width
    layers += [Conv2d(cin, out_channels, 3, 1, 0), Conv2d(out_channels, out_channels, 1, 1, 0)]
    return nn.Sequential(*layers)


def _stage(cin: int, cout: int, n_res: int) -> nn.Sequential:
    """Halve the resolution, then `n_res` residual blocks."""
    return nn.Sequential(Conv2d(cin, cout, 3, 2, 1), *(res(cout) for _ in range(n_res)))


def _up(cin: int, cout: int, n_res: int) -> nn.Sequential:
    """Double the resolution, then `n_res` residual blocks."""
    return nn.Sequential(Conv2dTranspose(cin, cout, 3, 2, 1, output_padding=1), *(res(cout) for _ in range(n_res)))


class Wav2Lip(nn.Module):
    def __init__(self):
        super().__init__()
        self.face_encoder_blocks = nn.ModuleList(
            [
                nn.Sequential(Conv2d(6, 16, 7, 1, 3)),  # 96×96
                _stage(16, 32, 2),  # 48×48
                _stage(32, 64, 3),  # 24×24
                _stage(64, 128, 2),  # 12×12
                _stage(128, 256, 2),  # 6×6
                _stage(256, 512, 1),  # 3×3
                nn.Sequential(Conv2d(512, 512, 3, 1, 0), Conv2d(512, 512, 1, 1, 0)),  # 1×1
            ]
        )
        self.audio_encoder = speech_encoder()
        self.face_decoder_blocks = nn.ModuleList(
            [
                nn.Sequential(Conv2d(512, 512, 1, 1, 0)),  # 1×1
                nn.Sequential(Conv2dTranspose(1024, 512, 3, 1, 0), res(512)),  # 3×3
                _up(1024, 512, 2),  # 6×6
                _up(768, 384, 2),  # 12×12
                _up(512, 256, 2),  # 24×24
                _up(320, 128, 2),  # 48×48
                _up(160, 64, 2),  # 96×96
            ]
        )
        self.output_block = nn.Sequential(Conv2d(80, 32, 3, 1, 1), nn.Conv2d(32, 3, 1, 1, 0), nn.Sigmoid())

    def forward(
        self, audio_sequences: torch.Tensor, face_sequences: torch.Tensor, fine_chunk: int | None = None
    ) -> torch.Tensor:
        """(B,1,80,16) + (B,6,96,96) → (B,3,96,96); or, in training, (B,T,1,80,16) + (B,6,T,96,96) → (B,3,T,96,96).

        `fine_chunk` runs the FINE_STAGES finest stages at each end of the U-Net that many frames at a
        time, the coarse middle on the whole batch: the same numbers, but on a CPU the large activations
        stay in cache while the large weights are read once per batch (about 10 % faster at 4).
        """
        batch = audio_sequences.size(0)
        is_sequence = face_sequences.dim() > 4
        if is_sequence:
            audio_sequences, face_sequences = fold_time(audio_sequences, 1), fold_time(face_sequences, 2)
        encoder, decoder = self.face_encoder_blocks, self.face_decoder_blocks

        parts = face_sequences.split(fine_chunk) if fine_chunk else [face_sequences]
        fine = [encode(encoder[:FINE_STAGES], part) for part in parts]
        coarse = encode(encoder[FINE_STAGES:], join([feats[-1] for feats in fine]))
        x = decode(decoder[:-FINE_STAGES], self.audio_encoder(audio_sequences), coarse)
        x = join([
            self.output_block(decode(decoder[-FINE_STAGES:], part, feats))
            for part, feats in zip(x.split([len(p) for p in parts]), fine, strict=True)
        ])  # fmt: skip

        return unfold_time(x, batch) if is_sequence else x


def encode(blocks: Iterable[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The feature map after each block, finest first: what the decoder's skips take."""
    feats = []
    for block in blocks:
        x = block(x)
        feats.append(x)
    return feats


def decode(blocks: Iterable[nn.Module], x: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
    """Each block's output concatenated with the encoder's map of the same size, coarsest first."""
    for block, skip in zip(blocks, reversed(feats), strict=True):
        x = torch.cat((block(x), skip), dim=1)
    return x


def join(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def fold_time(x: torch.Tensor, time_dim: int) -> torch.Tensor:
    """Move time into the batch, time-major (row t*B + b), as the original does with a list of slices."""
    return torch.cat(x.unbind(time_dim), dim=0)


def unfold_time(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of `fold_time` for a (T*B, C, H, W) output: back to (B, C, T, H, W)."""
    return torch.stack(torch.split(x, batch, dim=0), dim=2)
