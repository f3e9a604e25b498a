"""GFP-GAN v1.4 (Wang et al., CVPR 2021), the "clean" architecture that needs no compiled StyleGAN2 ops.

A U-Net reads the degraded 512×512 face. Its bottleneck becomes 16 W-space latents, one per StyleGAN2
layer; its decoder features become per-pixel scale and shift maps (Spatial Feature Transform) that the
pretrained StyleGAN2 generator applies to half of its channels at each scale, from 8×8 to 512×512.

State-dict keys are those of TencentARC's `GFPGANv1Clean`, so the released GFPGANv1.2/1.3/1.4 files load
strictly (`{"params_ema": sd}`, which `common.weights` unwraps). The original paper model, GFPGANv1.pth, is
another architecture (StyleGAN2 with EqualConv2d and fused bias-activations); `common.weights` names it
when it is handed over instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SIZE = 512  # input and output side, pixels
STYLE_DIM = 512  # width of a W-space latent
LOG_SIZE = int(math.log2(SIZE))  # 9: the generator runs 4×4 → 512×512 in LOG_SIZE - 2 doublings
N_LATENTS = 2 * LOG_SIZE - 2  # 16 W latents: one per styled conv (15) and one more for the last to-RGB
N_NOISES = 2 * (LOG_SIZE - 2) + 1  # 15 stored noise maps: one per styled conv
SQRT2 = math.sqrt(2.0)  # StyleGAN2's gain after the modulated conv, kept from the leaky-ReLU convention

# Channels per resolution, StyleGAN2 with channel_multiplier=2; the U-Net uses half of each (narrow 0.5).
DECODER_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64}
UNET_CHANNELS = {res: c // 2 for res, c in DECODER_CHANNELS.items()}
UP_SIZES = [2**i for i in range(3, LOG_SIZE + 1)]  # 8 … 512: the scales the U-Net decoder and SFT work at


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Bilinear ×2 or ×½ (half-pixel centres): the only resampling GFPGANv1Clean uses."""
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class ResBlock(nn.Module):
    """The U-Net's residual block: conv → resize → conv, plus a resized 1×1 skip."""

    def __init__(self, cin: int, cout: int, factor: float):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, 1, 1)
        self.conv2 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = lrelu(self.conv2(resize(lrelu(self.conv1(x)), self.factor)))
        return out + self.skip(resize(x, self.factor))


class ModulatedConv2d(nn.Module):
    """StyleGAN2's weight (de)modulation, computed on the activations instead of the weights.

    The reference scales a per-sample copy of the weight and runs one grouped conv with groups = batch.
    Scaling the input channels by the style, convolving with the shared weight and scaling the output
    channels by the demodulation factor is the same sum (float round-off apart), needs no per-sample
    weights, and traces with a dynamic batch (an ONNX Conv's `group` is a constant).

    The weight is held 4-D, (out, in, k, k), so that `model.to(memory_format=torch.channels_last)` works
    (it refuses 5-D tensors); the state dict shows it 5-D, (1, out, in, k, k), as the checkpoints have it.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.modulation = nn.Linear(STYLE_DIM, cin)
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel_size, kernel_size) / math.sqrt(cin) / kernel_size)
        self.demodulate, self.upsample, self.padding = demodulate, upsample, kernel_size // 2
        self.register_state_dict_post_hook(_weight_to_checkpoint)
        self.register_load_state_dict_pre_hook(_weight_from_checkpoint)

    def forward(self, x: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        style = self.modulation(latent)  # (B, cin)
        x = x * style[:, :, None, None]
        if self.upsample:  # bilinear is per channel, so it commutes with the style scaling
            x = resize(x, 2)
        out = F.conv2d(x, self.weight, padding=self.padding)
        if self.demodulate:  # 1 / |w * s| per (sample, output channel): Σ_i s_i² Σ_k w_oik²
            demod = torch.rsqrt(style.square() @ self.weight_norms() + 1e-8)
            out = out * demod[:, :, None, None]
        return out

    def weight_norms(self) -> torch.Tensor:
        """(in, out): Σ_k w_oik², the squared norm of each input channel's kernel for each output channel.

        A constant of an exported graph: the ONNX exporter would otherwise fold only the square and store a
        squared copy of every weight (97 MB more in GFPGAN's file), summed again on every run.
        """
        norms = self.weight.square().sum((2, 3)).t()
        if torch.onnx.is_in_onnx_export():
            norms = torch.tensor(norms.tolist(), dtype=norms.dtype)  # read out of the trace: a constant
        return norms


def _weight_to_checkpoint(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    weight = state_dict[prefix + "weight"]
    if not isinstance(weight, nn.Parameter):  # `keep_vars=True` (the ONNX tracer) wants the parameter itself
        state_dict[prefix + "weight"] = weight.unsqueeze(0)


def _weight_from_checkpoint(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    weight = state_dict.get(prefix + "weight")
    if weight is not None and weight.dim() == 5 and weight.shape[0] == 1:
        state_dict[prefix + "weight"] = weight[0]


class StyleConv(nn.Module):
    """Modulated 3×3 conv, scaled noise map, bias, leaky ReLU."""

    def __init__(self, cin: int, cout: int, upsample: bool = False):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(cin, cout, 3, upsample=upsample)
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength
        self.bias = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = self.modulated_conv(x, latent) * SQRT2
        return lrelu(out + self.weight * noise + self.bias)


class ToRGB(nn.Module):
    """Modulated 1×1 conv to RGB (not demodulated), added to the upsampled image of the previous scale."""

    def __init__(self, cin: int):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(cin, 3, 1, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, latent: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, latent) + self.bias
        return out if skip is None else out + resize(skip, 2)


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, size, size))


class StyleGAN2Decoder(nn.Module):
    """StyleGAN2's synthesis network with SFT on half the channels after each scale's first conv.

    Noise is the stored `noises.noiseN` maps, always (the reference's `randomize_noise=False`): the
    released checkpoints carry them, and the output is then a deterministic function of the input.
    """

    def __init__(self):
        super().__init__()
        # The mapping network: unused with GFPGAN's W-space latents (`input_is_latent=True`), kept so
        # that checkpoints load strictly. Identity stands in for the parameter-free layers to keep indices.
        mlp = [nn.Identity()]  # PixelNorm
        for _ in range(8):
            mlp += [nn.Linear(STYLE_DIM, STYLE_DIM), nn.LeakyReLU(0.2)]
        self.style_mlp = nn.Sequential(*mlp)
        self.constant_input = ConstantInput(DECODER_CHANNELS[4], 4)
        self.style_conv1 = StyleConv(DECODER_CHANNELS[4], DECODER_CHANNELS[4])
        self.to_rgb1 = ToRGB(DECODER_CHANNELS[4])
        self.style_convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        cin = DECODER_CHANNELS[4]
        for res in UP_SIZES:
            cout = DECODER_CHANNELS[res]
            self.style_convs.extend([StyleConv(cin, cout, upsample=True), StyleConv(cout, cout)])
            self.to_rgbs.append(ToRGB(cout))
            cin = cout
        self.noises = nn.Module()
        for i in range(N_NOISES):
            side = 2 ** ((i + 5) // 2)  # 4, 8, 8, 16, 16, …, 512, 512
            self.noises.register_buffer(f"noise{i}", torch.randn(1, 1, side, side))

    def forward(self, latents: torch.Tensor, conditions: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """(B, 16, 512) latents and one (scale, shift) pair per scale 8…512 → (B, 3, 512, 512)."""
        noise = [getattr(self.noises, f"noise{i}") for i in range(N_NOISES)]
        out = self.constant_input.weight.expand(latents.shape[0], -1, -1, -1)
        out = self.style_conv1(out, latents[:, 0], noise[0])
        image = self.to_rgb1(out, latents[:, 1])
        for k, (scale, shift) in enumerate(conditions):
            i = 2 * k + 1  # the latent and noise index of this scale's first conv
            out = self.style_convs[2 * k](out, latents[:, i], noise[i])
            same, sft = out.chunk(2, dim=1)
            out = torch.cat([same, sft * scale + shift], dim=1)
            out = self.style_convs[2 * k + 1](out, latents[:, i + 1], noise[i + 1])
            image = self.to_rgbs[k](out, latents[:, i + 2], image)
        return image


def _sft_branch(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(c, c, 3, 1, 1))


class GFPGANv1Clean(nn.Module):
    """GFPGAN v1.4 at 512 px: faces in RGB, [-1, 1], (N, 3, 512, 512) → restored faces, same range.

    The arguments of the released v1.2-v1.4 models are fixed: out_size=512, num_style_feat=512,
    channel_multiplier=2, num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True.
    """

    def __init__(self):
        super().__init__()
        self.conv_body_first = nn.Conv2d(3, UNET_CHANNELS[SIZE], 1)
        downs = [2**i for i in range(LOG_SIZE - 1, 1, -1)]  # 256 … 4
        self.conv_body_down = nn.ModuleList(ResBlock(UNET_CHANNELS[2 * res], UNET_CHANNELS[res], 0.5) for res in downs)
        self.final_conv = nn.Conv2d(UNET_CHANNELS[4], UNET_CHANNELS[4], 3, 1, 1)
        self.conv_body_up = nn.ModuleList(ResBlock(UNET_CHANNELS[res // 2], UNET_CHANNELS[res], 2) for res in UP_SIZES)
        self.toRGB = nn.ModuleList(nn.Conv2d(UNET_CHANNELS[res], 3, 1) for res in UP_SIZES)
        self.final_linear = nn.Linear(UNET_CHANNELS[4] * 4 * 4, N_LATENTS * STYLE_DIM)
        self.stylegan_decoder = StyleGAN2Decoder()
        self.condition_scale = nn.ModuleList(_sft_branch(UNET_CHANNELS[res]) for res in UP_SIZES)
        self.condition_shift = nn.ModuleList(_sft_branch(UNET_CHANNELS[res]) for res in UP_SIZES)

    def forward(
        self, x: torch.Tensor, return_rgb: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The restored faces; with `return_rgb`, also the U-Net's RGB image at each scale 8…512 (the
        reference's `out_rgbs`, an auxiliary training output)."""
        feat = lrelu(self.conv_body_first(x))
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.append(feat)
        feat = lrelu(self.final_conv(feat))
        latents = self.final_linear(feat.flatten(1)).unflatten(1, (N_LATENTS, STYLE_DIM))

        conditions, rgbs = [], []
        for i, skip in enumerate(reversed(skips)):
            feat = self.conv_body_up[i](feat + skip)
            conditions.append((self.condition_scale[i](feat), self.condition_shift[i](feat)))
            if return_rgb:
                rgbs.append(self.toRGB[i](feat))
        image = self.stylegan_decoder(latents, conditions)
        return (image, rgbs) if return_rgb else image
