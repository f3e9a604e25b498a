"""The face restorers of the enhance stage, GFPGAN v1.4 and CodeFormer: loaded once, run on batches of
512×512 faces in PyTorch (`TorchRestorer`) or ONNX Runtime (`onnx_models.OnnxRestorer`, with their specs).

Both references feed a face as RGB in [-1, 1], (N, 3, 512, 512), and bring the output back with BasicSR's
`tensor2img(min_max=(-1, 1))`: clamp, rescale to [0, 255], round. A `Restore` is that, for either
backend: (n, 512, 512, 3) uint8 BGR crops and CodeFormer's fidelity weight → restored crops, same layout.

Precision: GFPGAN runs in the run's dtype. CodeFormer's encoder and transformer stay in float32 whatever
it is; only its generator (72 % of its FLOPs at w > 0) runs in bf16. The transformer picks each cell's code
by an argmax over 1024 logits, which bf16 flips where two nearly tie (2.7 % of the golden input's cells),
and a flipped code redraws a 32×32 patch; the generator's output is an image, where bf16's round-off stays
within a few levels (`bench/restore_speed.py` measures both).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from common.devices import prepare_network
from common.weights import load_model, skeleton
from models.codeformer import CodeFormer
from models.gfpgan import GFPGANv1Clean

SIZE = 512  # both restorers' input and output side
FLAG = "--enhancer_path"  # how a user passes the weights, for errors
ARCH = {"gfpgan": "GFPGANv1Clean", "codeformer": "CodeFormer"}  # `--enhancer` name → `common.weights.ARCHS` name
BUILD = {"gfpgan": GFPGANv1Clean, "codeformer": CodeFormer}
Restore = Callable[[np.ndarray, float], np.ndarray]  # (n, 512, 512, 3) uint8 BGR, fidelity w → restored crops


def load_restorer(name: str, path: str | os.PathLike, flag: str = FLAG) -> nn.Module:
    """The restorer `name` ("gfpgan" or "codeformer") with the weights of `path`, float32 on the CPU, in
    eval mode; a one-line `UserError` for a missing, damaged or wrong file (`common.weights`)."""
    return load_model(skeleton(BUILD[name]), path, ARCH[name], "cpu", flag)


def restorer_inputs(crops: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n, 512, 512, 3) uint8 BGR → (n, 3, 512, 512) RGB in [-1, 1], as both references normalise."""
    x = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1])).to(device).permute(0, 3, 1, 2)
    return x.float().div_(127.5).sub_(1.0).to(dtype)


def restored_crops(out: torch.Tensor) -> np.ndarray:
    """(n, 3, 512, 512) RGB in [-1, 1] → (n, 512, 512, 3) uint8 BGR, rounded as BasicSR's `tensor2img`."""
    rgb = out.float().clamp_(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8)
    return np.ascontiguousarray(rgb.permute(0, 2, 3, 1).cpu().numpy()[..., ::-1])


def prepare_codeformer(model: CodeFormer, device: torch.device, dtype: torch.dtype) -> CodeFormer:
    """CodeFormer for inference: the encoder, transformer and codebook in float32, the generator and the
    fuse blocks in `dtype`; see the module's docstring."""
    model = prepare_network(model, device, torch.float32)
    for part in (model.generator, model.fuse_convs_dict):
        part.to(dtype)
    return model


class TorchRestorer:
    """A restorer in PyTorch on `device` in `dtype` (CodeFormer: its generator only)."""

    def __init__(self, name: str, path: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> None:
        self.name, self.device, self.dtype = name, device, dtype
        model = load_restorer(name, path)
        if name == "codeformer":
            self.model = prepare_codeformer(model, device, dtype)
        else:
            self.model = prepare_network(model, device, dtype)
        self.layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format

    def __call__(self, crops: np.ndarray, fidelity: float) -> np.ndarray:
        """(n, 512, 512, 3) uint8 BGR crops → restored, same layout. `fidelity` is CodeFormer's w."""
        with torch.inference_mode():
            if self.name == "gfpgan":
                x = restorer_inputs(crops, self.device, self.dtype).contiguous(memory_format=self.layout)
                return restored_crops(self.model(x))
            x = restorer_inputs(crops, self.device, torch.float32).contiguous(memory_format=self.layout)
            return restored_crops(self.model.generate(*self.model.encode(x), fidelity))
