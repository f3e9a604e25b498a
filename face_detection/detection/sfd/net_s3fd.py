"""The S3FD network (Zhang et al. 2017) exactly as Wav2Lip ships it, so its `s3fd.pth` loads unchanged.

A VGG-16 trunk with six detection heads at strides 4..128. Unlike the paper (and unlike face-alignment's
later copy), fc6 here is a plain 3x3 convolution with padding 3 and no dilation, so the fc7 map is 4 cells
larger than its stride alone gives; the released weights were trained that way.

Two keyword options build syncnet_python's S3FD instead (see `sfd_face.py`): fc6 dilated (padding 6,
dilation 6, as in SSD) and a ceil-mode pool after conv3_3. The defaults are Wav2Lip's network, unchanged.

Below float32 (`prepare_s3fd`), the trunk runs in bf16 or fp16 while the L2 normalisations and the twelve
heads keep float32 weights: each layer computes in its own weights' dtype (`in_dtype_of`), so the outputs,
and the softmax, decoding and NMS after them, are float32 whatever the trunk's precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.devices import in_dtype_of, prepare_network

# VGG-16 blocks conv{b}_{k}: output channels of each conv; a 2x2 max-pool follows every block.
VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# Detection heads in output order: (name, input channels, class channels). conv3_3 predicts 3 background
# channels plus one face channel and keeps the largest background score ("max-out", S3FD section 3.3).
HEADS = (
    ("conv3_3_norm", 256, 4),
    ("conv4_3_norm", 512, 2),
    ("conv5_3_norm", 512, 2),
    ("fc7", 1024, 2),
    ("conv6_2", 512, 2),
    ("conv7_2", 256, 2),
)
# The three shallow maps are L2-normalised and rescaled by a learned per-channel weight (initial scale).
L2_NORMS = (("conv3_3_norm", 256, 10.0), ("conv4_3_norm", 512, 8.0), ("conv5_3_norm", 512, 5.0))
L2_EPS = 1e-10


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learned scale; balances the shallow maps' magnitudes.

    Computes in its weight's dtype: float32 under a bf16 or fp16 trunk (`prepare_s3fd`), where a sum of
    512 squares would lose its low bits (bf16) or overflow (fp16).
    """

    def __init__(self, n_channels: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((n_channels,), scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = in_dtype_of(x, self)
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + L2_EPS
        return x / norm * self.weight.view(1, -1, 1, 1)


def _conv(c_in: int, c_out: int, k: int = 3, stride: int = 1, padding: int | None = None) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2 if padding is None else padding)


class s3fd(nn.Module):
    """S3FD; `forward` returns [cls1, reg1, ..., cls6, reg6] (class logits, box offsets) per stride."""

    def __init__(self, fc6_padding: int = 3, fc6_dilation: int = 1, pool3_ceil: bool = False) -> None:
        super().__init__()
        self.pool3_ceil = pool3_ceil
        # Registration order fixes the state-dict order, which must equal the original's.
        c_in = 3
        for b, widths in enumerate(VGG_BLOCKS, start=1):
            for k, c_out in enumerate(widths, start=1):
                setattr(self, f"conv{b}_{k}", _conv(c_in, c_out))
                c_in = c_out
        self.fc6 = nn.Conv2d(512, 1024, 3, padding=fc6_padding, dilation=fc6_dilation)
        self.fc7 = _conv(1024, 1024, 1)
        self.conv6_1 = _conv(1024, 256, 1)
        self.conv6_2 = _conv(256, 512, 3, stride=2)
        self.conv7_1 = _conv(512, 128, 1)
        self.conv7_2 = _conv(128, 256, 3, stride=2)
        for name, channels, scale in L2_NORMS:
            setattr(self, name, L2Norm(channels, scale))
        for name, channels, n_cls in HEADS:
            setattr(self, f"{name}_mbox_conf", _conv(channels, n_cls))
            setattr(self, f"{name}_mbox_loc", _conv(channels, 4))

    def _trunk(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The six maps the heads read: conv3_3, conv4_3, conv5_3 (L2-normalised), fc7, conv6_2, conv7_2.

        ReLU in place: at full resolution a second copy of conv1's 64-channel maps is 0.5 GB per 1080p frame.
        """
        taps = []
        h = x
        for b, widths in enumerate(VGG_BLOCKS, start=1):
            for k in range(1, len(widths) + 1):
                h = F.relu(getattr(self, f"conv{b}_{k}")(h), inplace=True)
            if b >= 3:
                taps.append(getattr(self, f"conv{b}_3_norm")(h))
            h = F.max_pool2d(h, 2, 2, ceil_mode=self.pool3_ceil and b == 3)
        for layers in (("fc6", "fc7"), ("conv6_1", "conv6_2"), ("conv7_1", "conv7_2")):
            for name in layers:
                h = F.relu(getattr(self, name)(h), inplace=True)
            taps.append(h)
        return taps

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for (name, _, _), f in zip(HEADS, self._trunk(in_dtype_of(x, self.conv1_1)), strict=True):
            heads = getattr(self, f"{name}_mbox_conf"), getattr(self, f"{name}_mbox_loc")
            outs += [head(in_dtype_of(f, head)) for head in heads]
        cls1 = outs[0]
        outs[0] = torch.cat([cls1[:, :3].amax(dim=1, keepdim=True), cls1[:, 3:]], dim=1)
        return outs


def float32_parts(net: s3fd) -> list[nn.Module]:
    """The layers that keep float32 weights below float32: the L2 normalisations and every head (scores
    and box offsets: 0.6 % of the multiply-adds, and what the softmax's ties and the boxes' pixels read)."""
    heads = [f"{name}_mbox_{kind}" for name, _, _ in HEADS for kind in ("conf", "loc")]
    return [getattr(net, name) for name in [name for name, _, _ in L2_NORMS] + heads]


def prepare_s3fd(net: s3fd, device: str | torch.device, dtype: torch.dtype = torch.float32) -> s3fd:
    """`net` for inference on `device` in `dtype`. float32 is today's network untouched (NCHW, the goldens'
    numbers); below it the trunk is cast and laid out channels-last (`prepare_network`) and
    `float32_parts` keep their float32 weights exactly (a round trip through bf16 would round the learned
    L2 scales and the heads to 8 bits)."""
    if dtype == torch.float32:
        return net.to(device).eval().requires_grad_(False)
    return prepare_network(net, torch.device(device), dtype, keep_float32=float32_parts(net))
