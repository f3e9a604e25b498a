"""Which device runs the networks, in which precision, and which share of the work this process takes:
decided once, at the top of each script, and passed down.

Precision is one `(device, dtype)` pair for every network (`select_dtype`): float32 by default, because it
is exact; bfloat16 on CUDA and on CPUs whose cores compute it (AVX512-BF16, AMX-BF16: oneDNN then runs bf16
convolutions at twice fp32's rate or more); float16 on CUDA. `prepare_network` puts a module there.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from common.errors import UserError

T = TypeVar("T")
R = TypeVar("R")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap for the next batch
GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # glibc's default for both thresholds


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}  # /proc/cpuinfo's names of the instructions oneDNN's bf16 uses


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16). Elsewhere oneDNN emulates bf16,
    which is slower than fp32, so bf16 is only chosen where it pays."""
    try:
        flags = {word for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                 for word in line.split()}  # fmt: skip
    except OSError:
        return False
    return bool(flags & BF16_CPU_FLAGS)


def select_dtype(precision: str, device: torch.device, insist: bool = False) -> tuple[torch.dtype, str | None]:
    """(the dtype every network runs in, a one-line note when another than asked was chosen).

    fp16 needs CUDA (a `UserError` elsewhere). bf16 runs on CUDA GPUs that support it and on CPUs that
    compute it; on a CPU without, fp32 runs instead with a note, unless `insist`.
    """
    if precision not in DTYPES:
        raise UserError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"--precision fp16 (--fp16) needs a CUDA GPU; the device is {device.type} (use bf16 or fp32)")
    if precision != "bf16" or insist:
        return DTYPES[precision], None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float32, "this GPU has no bf16: running in fp32 (--precision fp16 is the fast choice here)"
    if device.type == "cpu" and not cpu_computes_bf16():
        return torch.float32, ("this CPU has no bf16 instructions (AVX512-BF16 or AMX): running in fp32, which is "
                               "faster here (--force_precision runs bf16 anyway)")  # fmt: skip
    if device.type == "mps":
        return torch.float32, "bf16 is not used on Apple's MPS: running in fp32"
    return torch.bfloat16, None


def prepare_network(
    model: nn.Module, device: torch.device, dtype: torch.dtype, keep_float32: Sequence[nn.Module] = ()
) -> nn.Module:
    """`model` for inference on `device` in `dtype`: eval mode, no gradients, and on a CPU in channels-last
    (NHWC), oneDNN's fast layout for convolutions in every precision. One copy of the weights: cast and
    laid out together (two steps cost twice the first touches of fresh memory, ~0.3 CPU-s for the generator).

    Below float32, the layers of `keep_float32` (modules of `model`) keep their float32 weights exactly:
    copied before the cast and put back after it (cast back from bf16 they would be rounded to 8 bits);
    they compute in float32 when fed through `in_dtype_of`."""
    keep = list(keep_float32) if dtype != torch.float32 else []
    exact = [clone_state(layer) for layer in keep]
    layout = torch.channels_last if device.type == "cpu" else torch.preserve_format
    model = model.to(device=device, dtype=dtype, memory_format=layout).eval().requires_grad_(False)
    for layer, weights in zip(keep, exact, strict=True):  # `.to` converts in place: the same modules
        layer.float().load_state_dict(weights)
    return model


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of `module`'s state that its later casts do not touch."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def in_dtype_of(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """`x` in the dtype of `layer`'s weight: how a network whose layers hold several dtypes (a bf16 trunk,
    float32 heads) feeds each one. A no-op, and no traced op for ONNX, when they already agree."""
    dtype = layer.weight.dtype
    return x if x.dtype == dtype else x.to(dtype)


def select_device(name: str = "auto") -> torch.device:
    """`auto` prefers CUDA, then Apple's MPS, then the CPU; asking for one that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available (use --device auto or cpu)")
    if name == "mps" and not mps_available():
        raise UserError("--device mps: Apple's MPS backend is not available (use --device auto or cpu)")
    if name not in ("cuda", "mps", "cpu") and not name.startswith("cuda:"):
        raise UserError(f"--device {name}: expected auto, cuda, mps or cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Rank:
    """Where this process stands among those `torchrun` started; (0, 1, 0) when run directly."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index of this process on its machine: the GPU it takes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def local_device(self, name: str = "auto") -> torch.device:
        """Under torchrun, this rank's own GPU (or the CPU without CUDA); otherwise `select_device(name)`."""
        if not self.distributed:
            return select_device(name)
        use_cuda = name in ("auto", "cuda") and torch.cuda.is_available()
        return torch.device(f"cuda:{self.local_rank}") if use_cuda else torch.device("cpu")


def torchrun_rank() -> Rank:
    """The one reader of torchrun's RANK, WORLD_SIZE and LOCAL_RANK."""
    env = os.environ
    return Rank(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))


def shard(items: Sequence[T], rank: Rank) -> list[T]:
    """This process's share of `items`: every world_size-th one, from its rank (a stable split, so a
    restarted rank takes the same items)."""
    return list(items[rank.rank :: rank.world_size])


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


class BatchLimit:
    """The largest batch a network may take on its device: halved after each out-of-memory error.

    Kept for the life of its owner (a model loaded once), since a batch that ran out of memory once will
    again; shared by the threads that run the network, hence the lock.
    """

    def __init__(self, size: int, what: str, quiet: bool = False) -> None:
        self.size, self.what, self.quiet = size, what, quiet
        self._lock = threading.Lock()

    def halve(self, failed: int) -> None:
        """After `failed` items ran out of memory: below that (other threads may have halved it already)."""
        with self._lock:
            if failed == 1:
                raise UserError(
                    f"out of memory running {self.what} on a single frame; use --resize_factor, "
                    "--det_max_side or --device cpu"
                )
            if self.size >= failed:
                self.size = failed // 2
                if not self.quiet:
                    print(f"out of memory in {self.what}: retrying with batches of {self.size}", file=sys.stderr)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def in_chunks(fn: Callable[[Sequence[T]], list[R]], items: Sequence[T], limit: BatchLimit, cap: int) -> list[R]:
    """`fn` over `items` in chunks of at most `cap` and `limit.size`, halving the limit on out-of-memory."""
    out: list[R] = []
    while len(out) < len(items):
        chunk = items[len(out) : len(out) + min(cap, limit.size)]
        try:
            out.extend(fn(chunk))
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not is_oom(e):
                raise
            limit.halve(len(chunk))
    return out


def tune_cpu_allocator() -> None:
    """Keep freed activation buffers in the heap instead of returning them to the OS after each batch.

    glibc serves buffers above 128 KiB with mmap and unmaps them on free, so every generator batch
    page-faults its activations in again: about a third of the original's CPU time. Raising the mmap
    threshold to glibc's ceiling (32 MiB, above any activation of a 16-frame batch) and the trim threshold
    lets the heap reuse them. Process-wide, idempotent, and a no-op off glibc.
    """
    _set_malloc_thresholds(MMAP_THRESHOLD_MAX, TRIM_THRESHOLD)


def default_cpu_allocator() -> None:
    """glibc's own thresholds again: for a process that lives for days with work coming and going (the
    realtime server), where a heap that keeps 1 GiB of freed memory only grows."""
    _set_malloc_thresholds(GLIBC_DEFAULT_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)


def _set_malloc_thresholds(mmap_threshold: int, trim_threshold: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
