"""syncnet_python's SyncNet in ONNX Runtime: its export spec, and a stand-in with the two methods LSE calls.

With `--backend onnxruntime` the LSE scripts score with `OnnxSyncNet` instead of `syncnet.S`; both streams
are one graph (`export_onnx.py --model syncnet`), and without `--onnx_path` the weights are exported once
into the cache (`common.onnx_export.cached_export`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from common.errors import UserError
from common.onnx_export import OnnxNet, Spec, onnx_file, open_session
from evaluation.syncnet import load_syncnet


class _SyncNetStreams(nn.Module):
    """Both streams of syncnet_python's S in one graph; the batches are independent (either may be empty)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, lip: torch.Tensor, mfcc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_lip(lip), self.model.forward_aud(mfcc)


def _network(checkpoint_path: str | os.PathLike, flag: str) -> nn.Module:
    return _SyncNetStreams(load_syncnet(checkpoint_path)).eval()


def _examples(batch: int, seed: int, trace: bool) -> tuple:
    """Raw 0..255 lip frames and MFCCs."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 5, 224, 224, generator=g) * 255, torch.randn(batch, 1, 13, 20, generator=g) * 10


SPEC = Spec("syncnet", ("lip", "mfcc"), ("lip_embedding", "audio_embedding"),
            {"lip": {0: "lip_batch"}, "mfcc": {0: "audio_batch"}, "lip_embedding": {0: "lip_batch"},
             "audio_embedding": {0: "audio_batch"}}, _network, _examples, "--onnx_path")  # fmt: skip
SPECS = {SPEC.name: SPEC}


class OnnxSyncNet:
    """syncnet_python's SyncNet in ONNX Runtime, with the two methods `evaluation.lse` calls."""

    def __init__(self, onnx_path: str | os.PathLike, device: torch.device) -> None:
        self.device = device
        self.net = OnnxNet(open_session(onnx_path, SPEC, device, torch.get_num_threads()))
        self._empty = {"lip": np.zeros((0, 3, 5, 224, 224), np.float32), "mfcc": np.zeros((0, 1, 13, 20), np.float32)}

    def _one(self, stream: str, x: torch.Tensor) -> torch.Tensor:
        arrays = {**self._empty, stream: np.ascontiguousarray(x.detach().float().cpu().numpy())}
        output = "lip_embedding" if stream == "lip" else "audio_embedding"
        return torch.from_numpy(self.net.run([output], arrays["lip"], arrays["mfcc"])[0]).to(x.device)

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        return self._one("lip", x)

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        return self._one("mfcc", x)


def syncnet_loader(
    backend: str, onnx_path: str | None, cache_dir: str | None = None, dtype: torch.dtype = torch.float32
) -> Callable[[str, torch.device], object]:
    """`(initial_model, device) -> model` for the evaluation scripts: syncnet_python's S in torch (its lip
    stream in `dtype`, `syncnet.prepare_syncnet`), or its ONNX export (`onnx_path`, else exported into the
    cache) in ONNX Runtime, which runs float32 only."""
    if backend == "torch":
        return lambda path, device: load_syncnet(path, device, dtype)
    if dtype != torch.float32:
        raise UserError("--precision bf16 and fp16 run with --backend torch only (ONNX Runtime scores in fp32)")
    return lambda path, device: OnnxSyncNet(onnx_file(SPEC, onnx_path, path, cache_dir), device)
