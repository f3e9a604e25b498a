"""Wav2Lip's three networks, importable by their original class names."""

from .conv import Conv2d, Conv2dTranspose, nonorm_Conv2d
from .disc import Wav2Lip_disc_qual
from .syncnet import SyncNet_color, cosine_loss
from .wav2lip import Wav2Lip

__all__ = ["Conv2d", "Conv2dTranspose", "nonorm_Conv2d", "SyncNet_color", "Wav2Lip", "Wav2Lip_disc_qual", "cosine_loss"]
