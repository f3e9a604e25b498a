"""The machine's convolution limit in fp32 and in bf16, measured, and what it allows the generator and S3FD.

    python -m bench.conv_limit

The limit is the best rate one core reaches on large 3x3 convolutions of the generator's own widest
shapes (channels-last, as the pipeline runs them; oneDNN through torch), not a datasheet figure: a virtual
machine's clock and vector units are what they are. A network's frame then costs at least its FLOPs over
that rate, whatever the framework; `fraction` puts a measured rate next to it. Each precision has its own
limit (bf16 where the CPU computes it: AVX512-BF16 doubles fp32's rate, AMX more), and a network run in a
precision is measured against that precision's limit.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run by path (python bench/conv_limit.py): the repository root is not on the path
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from common.devices import cpu_computes_bf16
from lipsync.generation import generator_inputs
from models import Wav2Lip
from models.conv import fold_batchnorm

# (channels in and out, side, batch) of 3x3 stride-1 convolutions: the generator's 24x24, 12x12 and 48x48
# stages at the pipeline's CPU batch, where the work per call is large enough to keep the vector units fed
LIMIT_SHAPES = ((256, 24, 16), (512, 12, 16), (128, 48, 16))
REPEATS = 5  # timed calls per shape; the best counts (the others met cache misses, page faults, migrations)


def conv_rate(
    channels: int, side: int, batch: int, repeats: int = REPEATS, dtype: torch.dtype = torch.float32
) -> float:
    """Best GFLOP/s of one 3x3 convolution in `dtype` on one torch thread, the calling one, per CPU second of
    that thread: other processes on a shared machine take time slices from it, not CPU time, and the
    process's other threads (a spinning thread pool) are not counted."""
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(batch, channels, side, side).to(dtype=dtype, memory_format=torch.channels_last)
    flops = 2 * channels * channels * 9 * side * side * batch
    best = float("inf")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            conv(x)  # oneDNN picks and prepares its kernel on the first call
            for _ in range(repeats):
                start = time.thread_time()
                conv(x)
                best = min(best, time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    return flops / best / 1e9


def conv_limit(dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s one core can reach on convolutions in `dtype`: the best of LIMIT_SHAPES on one thread."""
    return max(conv_rate(*shape, dtype=dtype) for shape in LIMIT_SHAPES)


def gflop_per_item(model: torch.nn.Module, *inputs: torch.Tensor) -> float:
    """GFLOP of one forward pass per item of the batch (convolutions and matrix products, as counted by
    torch's FlopCounterMode; element-wise work is not counted, so a fraction of the limit is generous)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() / len(inputs[0]) / 1e9


def generator_gflop() -> float:
    """GFLOP of one generator frame, as the pipeline runs it (BatchNorm folded); weights do not matter."""
    faces, mels = np.zeros((1, 96, 96, 3), np.uint8), np.zeros((1, 1, 80, 16), np.float32)
    inputs = generator_inputs(faces, mels, torch.device("cpu"), torch.float32)
    return gflop_per_item(fold_batchnorm(Wav2Lip().eval()), *inputs)


def fraction(gflop: float, cpu_seconds: float, limit: float) -> float:
    """Share of the limit a run reached: its GFLOP per CPU second over the limit of one core."""
    return gflop / cpu_seconds / limit


def limit_dtypes() -> list[torch.dtype]:
    """The precisions whose limit this CPU has: fp32, and bf16 where its cores compute it."""
    return [torch.float32, torch.bfloat16] if cpu_computes_bf16() else [torch.float32]


def main() -> None:
    gflop = generator_gflop()
    print(f"generator: {gflop:.2f} GFLOP/frame (shapes {LIMIT_SHAPES}: channels, side, batch; 1 thread)")
    for dtype in limit_dtypes():
        limit = conv_limit(dtype)
        print(f"{str(dtype).removeprefix('torch.'):9s} convolution limit: {limit:4.0f} GFLOP/s per core; the generator "
              f"costs at least {1000 * gflop / limit:.0f} CPU ms/frame at it")  # fmt: skip


if __name__ == "__main__":
    main()
