"""ESRGAN's generator, RRDBNet (Wang et al. 2018, §3.1), with BasicSR's state-dict keys.

Wav2Lip-HQ runs it on each generated 96×96 face (the fork's `esrgan_yunying.pth`: 64 features, 23 blocks,
growth 32, ×4); Real-ESRGAN's `RealESRGAN_x4plus` / `RealESRGAN_x2plus` are the same network. The trunk
always upsamples ×4, so BasicSR gets ×2 and ×1 by folding each 2×2 or 4×4 pixel block of the input into
channels first (pixel unshuffle): the weights then tell the scale by conv_first's input channels.
Inputs and outputs are RGB in [0, 1] (the output is not clamped).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

TRUNK_SCALE = 4  # two nearest ×2 upsamplings after the trunk
UNSHUFFLE = {4: 1, 2: 2, 1: 4}  # output scale → pixel-unshuffle factor of the input (TRUNK_SCALE / scale)
RESIDUAL_SCALE = 0.2  # ESRGAN's residual scaling, in each dense block and around each RRDB
SLOPE = 0.2  # LeakyReLU negative slope throughout
DENSE_CONVS = 5  # conv1..conv5 of a residual dense block
REQUIRED = ("conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_up1.weight",
            "conv_up2.weight", "conv_hr.weight", "conv_last.weight")  # fmt: skip


class ResidualDenseBlock(nn.Module):
    """Five 3×3 convs, each seeing the block input and every earlier output (dense growth), then a scaled residual."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        for i in range(DENSE_CONVS):
            cout = num_feat if i == DENSE_CONVS - 1 else num_grow_ch
            self.add_module(f"conv{i + 1}", nn.Conv2d(num_feat + i * num_grow_ch, cout, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        convs = list(self.children())
        for conv in convs[:-1]:
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), SLOPE, inplace=True))
        return convs[-1](torch.cat(feats, 1)) * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual in residual: three dense blocks in a row, around a second scaled residual."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """(B, num_in_ch, H, W) → (B, num_out_ch, scale·H, scale·W); H and W must be multiples of 4 / scale."""

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 4,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
    ):
        super().__init__()
        if scale not in UNSHUFFLE:
            raise ValueError(f"RRDBNet scale must be one of {sorted(UNSHUFFLE)}, not {scale}")
        self.scale = scale
        self.conv_first = nn.Conv2d(num_in_ch * UNSHUFFLE[scale] ** 2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's pixel_unshuffle orders channels as BasicSR's (c·r² + i·r + j for the pixel at (i, j) of a block)
        if UNSHUFFLE[self.scale] > 1:
            x = F.pixel_unshuffle(x, UNSHUFFLE[self.scale])
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in (self.conv_up1, self.conv_up2):
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), SLOPE, inplace=True)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), SLOPE, inplace=True))


def rrdbnet_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The RRDBNet arguments a state dict was saved from, read from its key shapes alone.

    The scale comes from conv_first's input channels over conv_last's output channels (×1, ×4, ×16 for
    scale 4, 2, 1), so the input is assumed to have as many channels as the output (RGB → RGB, as every
    released ESRGAN). Raises ValueError, in one line, for anything that is not an RRDBNet.
    """
    missing = [k for k in REQUIRED if k not in state_dict]
    if missing:
        hint = (
            " (a BasicSR checkpoint: take its 'params_ema' or 'params' first)"
            if {"params_ema", "params"} & set(state_dict)
            else ""
        )
        raise ValueError(f"not an RRDBNet (ESRGAN) state dict: no {missing[0]!r}{hint}; found {_found(state_dict)}")
    num_feat, in_ch = state_dict["conv_first.weight"].shape[:2]
    num_out_ch = state_dict["conv_last.weight"].shape[0]
    folded = {UNSHUFFLE[s] ** 2: s for s in UNSHUFFLE}
    if in_ch % num_out_ch or in_ch // num_out_ch not in folded:
        raise ValueError(f"RRDBNet conv_first takes {in_ch} channels for {num_out_ch} out: not a ×4, ×2 or ×1 model")
    blocks = {int(m[1]) for k in state_dict if (m := re.match(r"body\.(\d+)\.", k))}
    if blocks != set(range(len(blocks))):
        raise ValueError(f"RRDBNet body blocks are not numbered 0..{len(blocks) - 1}: {sorted(blocks)}")
    return dict(
        num_in_ch=num_out_ch,
        num_out_ch=num_out_ch,
        scale=folded[in_ch // num_out_ch],
        num_feat=num_feat,
        num_block=len(blocks),
        num_grow_ch=state_dict["body.0.rdb1.conv1.weight"].shape[0],
    )


def _found(obj: object) -> str:
    """A short description of what was found instead, for one-line error messages."""
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    keys = list(obj)
    return f"keys {keys[:3]}{' ...' if len(keys) > 3 else ''}" if keys else "an empty dict"
