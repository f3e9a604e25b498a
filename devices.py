"""Which device runs the networks, and which share of the work this process takes: decided once, at the
top of each script, and passed down."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from errors import UserError

T = TypeVar("T")


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


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
