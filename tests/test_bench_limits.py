"""The arithmetic behind the benchmarks' "share of the fp32 convolution limit" (bench/conv_limit.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.conv_limit import conv_rate, fraction, generator_gflop, gflop_per_item
from face_detection.detection.sfd.net_s3fd import s3fd
from lipsync.generation import generator_inputs
from models import Wav2Lip
from models.conv import fold_batchnorm


def conv_gflop_by_hooks(model: torch.nn.Module, *inputs: torch.Tensor) -> float:
    """GFLOP per item counted by hand: 2 x (input channels per group) x kernel area per output value of
    every convolution (transposed ones: per input value, times the output channels)."""
    total = []

    def count(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        kh, kw = module.kernel_size
        if isinstance(module, torch.nn.ConvTranspose2d):
            x = args[0]
            total.append(2 * x[0].numel() * module.out_channels // module.groups * kh * kw)
        else:
            total.append(2 * out[0].numel() * module.in_channels // module.groups * kh * kw)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]  # fmt: skip
    with torch.inference_mode():
        model(*inputs)
    for hook in hooks:
        hook.remove()
    return sum(total) / 1e9


def test_generator_flops_are_its_convolutions():
    faces, mels = np.zeros((2, 96, 96, 3), np.uint8), np.zeros((2, 1, 80, 16), np.float32)
    inputs = generator_inputs(faces, mels, torch.device("cpu"), torch.float32)
    model = fold_batchnorm(Wav2Lip().eval())
    gflop = gflop_per_item(model, *inputs)
    assert gflop == pytest.approx(conv_gflop_by_hooks(model, *inputs), rel=1e-3)
    assert gflop == pytest.approx(7.93, abs=0.01)  # the figure the README quotes
    assert generator_gflop() == pytest.approx(gflop)  # what the benches use


def test_s3fd_flops_scale_with_the_pixels():
    net = s3fd().eval()
    small, large = (gflop_per_item(net, torch.zeros(1, 3, side, side)) for side in (128, 256))
    assert small == pytest.approx(conv_gflop_by_hooks(net, torch.zeros(1, 3, 128, 128)), rel=1e-3)
    assert large == pytest.approx(4 * small, rel=0.05)  # work per pixel (the stride-64/128 maps round up)


def test_fraction_and_rate():
    assert fraction(gflop=8.0, cpu_seconds=0.1, limit=100.0) == pytest.approx(0.8)
    assert 1.0 < conv_rate(32, 12, 2, repeats=1) < 10_000.0  # GFLOP/s of a real run, in a sane range
