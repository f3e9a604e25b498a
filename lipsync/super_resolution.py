"""The super-resolution step of the enhance stage: ESRGAN (RRDBNet) over each generated face (Wav2Lip-HQ).

Its input is the generator's prediction before any rounding (pred·255 in float32, what the fork hands to
ESRGAN), or a uint8 face from an earlier step; it runs in RGB on [0, 1] and its output is clamped to
[0, 1], scaled by 255 and rounded half to even into uint8, as the fork's `basicsr/apply_sr.py` does. A ×4
model turns a 96×96 face into 384×384; ×2 and ×1 models (Real-ESRGAN's, pixel-unshuffled) are cheaper and
are accepted where the fork's exact output is not asked for (`hq_mode soft`): the face is resized to its
box afterwards anyway.

The fork runs one face at a time; here faces go `chunk_size` at a time (the output per face is the same up
to float round-off), on the generation workers, in the run's dtype (bf16 where it pays), halving after an
out-of-memory error. A ×4 face costs about 160 GMAC (40× the generator): a GPU feature.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from common.devices import BatchLimit, in_chunks, prepare_network
from lipsync.hq_weights import SR_FLAG, load_rrdbnet

CPU_CHUNK, GPU_CHUNK = 2, 8  # faces per call: a ×4 face's 384×384 activations take ~150 MB in fp32
FORK_SCALE = 4  # esrgan_yunying.pth, the only scale the fork's code builds


def sr_inputs(faces: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n, h, w, 3) BGR faces, float32 0-255 unrounded or uint8 → (n, 3, h, w) RGB in [0, 1] (/255 in float32)."""
    x = torch.from_numpy(np.ascontiguousarray(faces[..., ::-1])).to(device).permute(0, 3, 1, 2)
    return x.float().div(255).to(dtype)


def sr_outputs(y: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) RGB → (n, H, W, 3) BGR uint8: clamped to [0, 1] before ×255, rounded half to even."""
    y = y.float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return y.flip(1).permute(0, 2, 3, 1).contiguous().cpu().numpy()


class TorchSR:
    """RRDBNet in PyTorch, loaded once on a device in the run's dtype."""

    def __init__(self, path: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        model = load_rrdbnet(path)
        self.scale = model.scale
        self.model = prepare_network(model, device, dtype)
        self.memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format

    def __call__(self, faces: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = sr_inputs(faces, self.device, self.dtype).contiguous(memory_format=self.memory_format)
            return sr_outputs(self.model(x))


class OnnxSR:
    """RRDBNet in ONNX Runtime (`export_onnx.py --model esrgan`, or an export cached once)."""

    def __init__(self, onnx_path: str | os.PathLike, scale: int, device: torch.device, threads: int) -> None:
        from common.onnx_export import OnnxNet, open_session
        from lipsync.onnx_models import SPECS

        self.scale = scale
        self.net = OnnxNet(open_session(onnx_path, SPECS["esrgan"], device, threads))

    def __call__(self, faces: np.ndarray) -> np.ndarray:
        x = sr_inputs(faces, torch.device("cpu"), torch.float32).numpy()
        return sr_outputs(torch.from_numpy(self.net.run(None, x)[0]))


class SuperResolve:
    """The step: faces in (float32 0-255 or uint8, BGR), `scale`× larger uint8 faces out, in chunks."""

    name = "super-resolution"

    def __init__(self, forward: TorchSR | OnnxSR, chunk_size: int, quiet: bool = False) -> None:
        self.forward, self.scale, self.chunk_size = forward, forward.scale, chunk_size
        self.limit = BatchLimit(1 << 30, "super-resolution", quiet)

    def out_size(self, size: int) -> int:
        return size * self.scale

    def __call__(
        self, faces: np.ndarray, frames: object = None, boxes: object = None, opts: object = None
    ) -> np.ndarray:
        """Super-resolve each face (the source frames, boxes and clip options are not needed)."""
        if not len(faces):
            return np.zeros((0, *(self.out_size(s) for s in faces.shape[1:3]), 3), np.uint8)
        run = lambda chunk: list(self.forward(np.stack(chunk)))  # noqa: E731
        return np.stack(in_chunks(run, list(faces), self.limit, self.chunk_size))


def load_super_resolution(model, device: torch.device, dtype: torch.dtype, threads: int, quiet: bool) -> SuperResolve:
    """The super-resolution step of `model` (`options.ModelOptions`: sr_path, backend, cache_dir), loaded once."""
    if model.backend == "onnxruntime":
        from common.onnx_export import onnx_file
        from lipsync.onnx_models import SPECS

        scale = load_rrdbnet(model.sr_path).scale  # what the .onnx was exported from (and a check of the file)
        path = onnx_file(SPECS["esrgan"], model.sr_onnx_path, model.sr_path, model.cache_dir, quiet, SR_FLAG)
        forward: TorchSR | OnnxSR = OnnxSR(path, scale, device, threads)
    else:
        forward = TorchSR(model.sr_path, device, dtype)
    return SuperResolve(forward, GPU_CHUNK if device.type == "cuda" else CPU_CHUNK, quiet)
