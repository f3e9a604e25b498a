"""Which device runs the networks: decided once, at the top of each script, and passed down."""

from __future__ import annotations

import torch

from errors import UserError


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
