"""syncnet_python's SyncNet `S` (joonson/syncnet_python, SyncNetModel.py) and its weight loader.

The layer list is kept index for index so that `syncnet_v2.model` loads by key: the Sequential indices
(`netcnnaud.0`, `.4`, `.8`, ...) count the ReLU and pooling layers too.

Below float32 (`prepare_syncnet`, the scripts' --precision), the lip stream's convolutions run in bf16 or
fp16 (channels-last on a CPU); the audio stream (MFCC in) and both fully connected heads keep float32, so
the embeddings and the distances between them are float32.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from common.devices import in_dtype_of
from common.errors import UserError
from common.weights import safe_load

EMBED_DIM = 1024  # num_layers_in_fc_layers of the released syncnet_v2.model
MODEL_URL = "http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model"
GET_MODEL = f"download it with syncnet_python's download_model.sh ({MODEL_URL})"


def _conv_bn_relu(conv: nn.Module, bn: nn.Module, inplace: bool = True) -> list[nn.Module]:
    return [conv, bn, nn.ReLU(inplace=inplace)]


def _audio_cnn() -> nn.Sequential:
    """MFCC [N, 1, 13, 20] -> [N, 512, 1, 1]."""
    return nn.Sequential(
        *_conv_bn_relu(nn.Conv2d(1, 64, 3, padding=1), nn.BatchNorm2d(64)),
        nn.MaxPool2d(1, 1),
        *_conv_bn_relu(nn.Conv2d(64, 192, 3, padding=1), nn.BatchNorm2d(192)),
        nn.MaxPool2d(3, (1, 2)),
        *_conv_bn_relu(nn.Conv2d(192, 384, 3, padding=1), nn.BatchNorm2d(384)),
        *_conv_bn_relu(nn.Conv2d(384, 256, 3, padding=1), nn.BatchNorm2d(256)),
        *_conv_bn_relu(nn.Conv2d(256, 256, 3, padding=1), nn.BatchNorm2d(256)),
        nn.MaxPool2d(3, 2),
        *_conv_bn_relu(nn.Conv2d(256, 512, (5, 4)), nn.BatchNorm2d(512), inplace=False),
    )


def _lip_cnn() -> nn.Sequential:
    """Five BGR frames [N, 3, 5, 224, 224] (raw 0..255) -> [N, 512, 1, 1, 1]."""
    return nn.Sequential(
        *_conv_bn_relu(nn.Conv3d(3, 96, (5, 7, 7), (1, 2, 2)), nn.BatchNorm3d(96)),
        nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
        *_conv_bn_relu(nn.Conv3d(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), nn.BatchNorm3d(256)),
        nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
        *_conv_bn_relu(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256)),
        *_conv_bn_relu(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256)),
        *_conv_bn_relu(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256)),
        nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
        *_conv_bn_relu(nn.Conv3d(256, 512, (1, 6, 6)), nn.BatchNorm3d(512)),
    )


def _fc(embed_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim))


class S(nn.Module):
    """The two-stream SyncNet: 0.2 s of MFCC and 5 video frames mapped to one embedding space."""

    def __init__(self, num_layers_in_fc_layers: int = EMBED_DIM):
        super().__init__()
        # Registration order fixes the state-dict order of syncnet_v2.model.
        self.netcnnaud = _audio_cnn()
        self.netfcaud = _fc(num_layers_in_fc_layers)
        self.netfclip = _fc(num_layers_in_fc_layers)
        self.netcnnlip = _lip_cnn()

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfclip(in_dtype_of(self.forward_lipfeat(x), self.netfclip[0]))

    def forward_lipfeat(self, x: torch.Tensor) -> torch.Tensor:
        return self.netcnnlip(in_dtype_of(x, self.netcnnlip[0])).flatten(1)


def copy_parameters(model: nn.Module, loaded: Mapping[str, torch.Tensor], path: str = "<state dict>") -> None:
    """syncnet_python's `loadParameters` semantics: copy every file entry in place, nothing more.

    A key the model lacks is an error (the original raises KeyError); a model key the file lacks (e.g.
    `num_batches_tracked`, absent from files saved by torch < 0.4.1) keeps its initial value.
    """
    own = model.state_dict()
    unknown = [k for k in loaded if k not in own]
    if unknown:
        raise UserError(f"{path}: not a syncnet_python S state dict (unknown key {unknown[0]!r}); {GET_MODEL}")
    with torch.no_grad():
        for name, value in loaded.items():
            if not isinstance(value, torch.Tensor) or value.shape != own[name].shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise UserError(f"{path}: {name} has shape {shape}, expected {tuple(own[name].shape)}")
            own[name].copy_(value)


def load_syncnet(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> S:
    """Load `syncnet_v2.model` (a raw state dict) into `S`, in eval mode on `device` (`prepare_syncnet`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: SyncNet model not found; {GET_MODEL}")
    loaded = safe_load(path, GET_MODEL)  # weights only: a crafted pickle is refused, never run
    if not isinstance(loaded, Mapping):
        raise UserError(f"{path}: expected a raw state dict, found {type(loaded).__name__}; {GET_MODEL}")
    model = S()
    copy_parameters(model, loaded, path)
    return prepare_syncnet(model, torch.device(device), dtype)


def prepare_syncnet(model: S, device: torch.device, dtype: torch.dtype = torch.float32) -> S:
    """`model` for scoring on `device`: in float32 as today (the goldens' numbers), or with its lip stream's
    convolutions in `dtype` (channels-last 3-D on a CPU, oneDNN's fast layout) and the rest in float32.

    The lip stream's convolutions are 86 % of SyncNet's multiply-adds (five 224x224 frames a window); the
    audio stream (13x20 MFCCs, the other 14 %) and the fully connected heads stay float32, so the MFCCs enter
    unrounded and the embeddings, whose distances are the scores, come out of float32 layers."""
    model = model.to(device).eval()
    if dtype == torch.float32:
        return model
    layout = torch.channels_last_3d if device.type == "cpu" else torch.preserve_format
    model.netcnnlip.to(dtype=dtype, memory_format=layout)
    return model.requires_grad_(False)
