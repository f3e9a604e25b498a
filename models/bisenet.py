"""The face parser of Wav2Lip-HQ: face-parsing.PyTorch's BiSeNet (Yu et al. 2018) on a ResNet-18, 19 classes.

Keys are those of the public `79999_iter.pth` (the fork's `face_segmentation.pth`), a raw state dict. As
in that repository the spatial path is dropped and ResNet's 1/8 feature map stands in for it; the
context path refines the 1/16 and 1/32 maps with attention (ARM), adds the global average, and brings
them up with nearest-neighbour interpolation; a fusion module (FFM) merges the 1/8 maps. The three heads
(main, and the auxiliary 1/8 and 1/16 ones used in training) are brought to the input size bilinearly
with align_corners=True. The input is RGB normalised with ImageNet's mean and std; the fork feeds 512×512.
Run it in eval() mode: the attention branches apply BatchNorm to 1×1 pooled maps.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the parser's input normalisation (RGB)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_WIDTHS = (64, 128, 256, 512)  # ResNet-18's four stages, two basic blocks each
HEADS = ("conv_out", "conv_out16", "conv_out32")
REQUIRED = ("cp.resnet.conv1.weight", "cp.arm32.conv_atten.weight", "ffm.convblk.conv.weight",
            *(f"{h}.conv_out.weight" for h in HEADS))  # fmt: skip


def _bn_relu(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return F.relu(bn(x), inplace=True)


class ConvBNReLU(nn.Module):
    """Conv (no bias) → BatchNorm → ReLU, the parser's basic layer."""

    def __init__(self, cin: int, cout: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ks, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _bn_relu(self.conv(x), self.bn)


class BasicBlock(nn.Module):
    """ResNet's two 3×3 convs around a shortcut (a strided 1×1 conv + BN where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(_bn_relu(self.conv1(x), self.bn1)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual, inplace=True)


class Resnet18(nn.Module):
    """ResNet-18 without its classifier, returning the 1/8, 1/16 and 1/32 feature maps.

    Unlike the reference, building it downloads nothing: the parser's checkpoint holds these weights too.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = RESNET_WIDTHS[0]
        for i, width in enumerate(RESNET_WIDTHS):
            stride = 1 if i == 0 else 2
            self.add_module(f"layer{i + 1}", nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width)))
            cin = width

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer1(self.maxpool(_bn_relu(self.conv1(x), self.bn1)))
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


def _global_avg(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, C, 1, 1), by one pooling window over the whole map as the reference does (its
    round-off, too). An ONNX export traces the same average as a global pooling, whose window follows the
    input's size (a traced window would be fixed to the example's)."""
    if torch.jit.is_tracing():
        return F.adaptive_avg_pool2d(x, 1)
    return F.avg_pool2d(x, x.shape[-2:])


class AttentionRefinementModule(nn.Module):
    """ConvBNReLU, then scale each channel by a sigmoid of its global average (through a 1×1 conv and BN)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(_global_avg(feat))))


class ContextPath(nn.Module):
    """ResNet-18 + attention on its 1/16 and 1/32 maps; returns (1/8 ResNet map, 1/8 context, 1/16 context)."""

    def __init__(self):
        super().__init__()
        self.resnet = Resnet18()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        # the reference upsamples the 1×1 average with 'nearest' to the 1/32 size: a broadcast, the same values
        feat32_sum = self.arm32(feat32) + self.conv_avg(_global_avg(feat32))
        # nearest to the exact size of the finer map (size=, not scale_factor=: odd sizes must round the same way)
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, size=feat16.shape[-2:], mode="nearest"))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, size=feat8.shape[-2:], mode="nearest"))
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    """Concatenate, 1×1 ConvBNReLU, then add a copy re-weighted by squeeze-and-excitation channel attention."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, ks=1, padding=0)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(_global_avg(feat)), inplace=True)))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    """A head: 3×3 ConvBNReLU, then a 1×1 conv to class logits."""

    def __init__(self, cin: int, mid: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, n_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """(B, 3, H, W) normalised RGB → class logits (B, n_classes, H, W); `forward` also returns the two
    auxiliary heads, as the reference; `parse` computes the main one alone (what inference uses)."""

    def __init__(self, n_classes: int = 19):
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, n_classes)
        self.conv_out16 = BiSeNetOutput(128, 64, n_classes)
        self.conv_out32 = BiSeNetOutput(128, 64, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat_cp8, feat_cp16 = self.cp(x)
        heads = (self.conv_out(self.ffm(feat8, feat_cp8)), self.conv_out16(feat_cp8), self.conv_out32(feat_cp16))
        return tuple(_to_size(h, x) for h in heads)

    def parse(self, x: torch.Tensor) -> torch.Tensor:
        """The main logits only, skipping the two training heads and their full-size upsampling."""
        feat8, feat_cp8, _ = self.cp(x)
        return _to_size(self.conv_out(self.ffm(feat8, feat_cp8)), x)


def _to_size(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)


def bisenet_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The BiSeNet arguments (the class count) a face-parser state dict was saved from; raises ValueError, in
    one line, for anything else (a Wav2Lip or ESRGAN file, a checkpoint still inside a container)."""
    missing = [k for k in REQUIRED if k not in state_dict]
    if missing:
        keys = list(state_dict)
        raise ValueError(f"not a BiSeNet face-parser state dict: no {missing[0]!r}; found keys {keys[:3]}")
    classes = {h: state_dict[f"{h}.conv_out.weight"].shape[0] for h in HEADS}
    if len(set(classes.values())) != 1:
        raise ValueError(f"BiSeNet heads disagree on the number of classes: {classes}")
    return dict(n_classes=classes["conv_out"])
