"""The engine's networks in ONNX Runtime: their export specs, and forward passes that stand in for torch's.

With `--backend onnxruntime` only the forward passes change: `OnnxWav2Lip` is the generate stage's
`Predict` (same batches, chunks and worker threads as `generation.Wav2LipTorch`), and `s3fd_network` is
S3FD's forward pass for `face_detection` (its decoding and NMS stay the same code). Without an `.onnx`
path, a weight file is exported once into the cache (`common.onnx_export.cached_export`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from common.onnx_export import OnnxNet, Spec, onnx_file, open_session
from common.weights import load_model, skeleton
from lipsync.generation import generator_inputs, generator_workers, to_scaled
from lipsync.restorers import load_restorer, restored_crops, restorer_inputs


class _PlainWav2Lip(nn.Module):
    """Wav2Lip's forward pass on the whole batch (the original's), without `fine_chunk`'s split, which a
    trace would fix to the example's batch size."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, mel: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        from models.wav2lip import decode, encode

        m = self.model
        feats = encode(m.face_encoder_blocks, face)
        return m.output_block(decode(m.face_decoder_blocks, m.audio_encoder(mel), feats))


def _wav2lip(checkpoint_path: str | os.PathLike, flag: str) -> nn.Module:
    from models import Wav2Lip
    from models.conv import fold_batchnorm

    return _PlainWav2Lip(fold_batchnorm(load_model(skeleton(Wav2Lip), checkpoint_path, "Wav2Lip", "cpu", flag)))


def _wav2lip_examples(batch: int, seed: int, trace: bool) -> tuple:
    """Mel windows and /255 faces."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 80, 16, generator=g), torch.rand(batch, 6, 96, 96, generator=g)


def _s3fd(checkpoint_path: str | os.PathLike, flag: str) -> nn.Module:
    from face_detection.detection.sfd.net_s3fd import s3fd

    return load_model(skeleton(s3fd), checkpoint_path, "s3fd", "cpu", flag)


def _s3fd_examples(batch: int, seed: int, trace: bool) -> tuple:
    """Mean-subtracted pixels, at another frame size for the check than for the trace."""
    size = (128, 128) if trace else (96, 160)
    return (torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed)) * 255 - 120,)


def _esrgan(checkpoint_path: str | os.PathLike, flag: str) -> nn.Module:
    from lipsync.hq_weights import load_rrdbnet

    return load_rrdbnet(checkpoint_path, flag)


def _esrgan_examples(batch: int, seed: int, trace: bool) -> tuple:
    """RGB faces in [0, 1], another size for the check than for the trace (multiples of 4: ×1 models fold
    4×4 blocks)."""
    size = (32, 32) if trace else (24, 40)
    return (torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed)),)


class _ParserHead(nn.Module):
    """BiSeNet's main head alone (`parse`): what the paste stage's mask needs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.parse(image)


def _bisenet(checkpoint_path: str | os.PathLike, flag: str) -> nn.Module:
    from lipsync.hq_weights import load_bisenet

    return _ParserHead(load_bisenet(checkpoint_path, flag)).eval()  # eval throughout: the export restores the mode


def _bisenet_examples(batch: int, seed: int, trace: bool) -> tuple:
    """ImageNet-normalised crops, smaller than the 512×512 the pipeline gives (any size runs; another for
    the check than for the trace)."""
    size = (128, 128) if trace else (96, 160)
    return (torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed)),)


def _restorer(name: str) -> Callable[[str | os.PathLike, str], nn.Module]:
    """GFPGAN's or CodeFormer's network builder: the whole forward pass, as both references' scripts call it."""
    return lambda checkpoint_path, flag: load_restorer(name, checkpoint_path, flag)


def _faces(batch: int, seed: int) -> torch.Tensor:
    """Smooth RGB images in [-1, 1] at 512×512, like a face's low frequencies (noise would put CodeFormer's
    logits near ties, where float round-off alone can change a chosen code)."""
    coarse = torch.rand(batch, 3, 6, 6, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(512, 512), mode="bicubic").clamp(-1, 1)


def _codeformer_examples(batch: int, seed: int, trace: bool) -> tuple:
    """Faces and the fidelity weight w, a float tensor of shape [1] (0.5 for the trace; any w runs)."""
    w = 0.5 if trace else float(torch.rand(1, generator=torch.Generator().manual_seed(seed)))
    return _faces(batch, seed), torch.tensor([w])


_S3FD_OUT = tuple(f"{kind}{level}" for level in range(1, 7) for kind in ("cls", "reg"))
SPECS = {
    "wav2lip": Spec("wav2lip", ("mel", "face"), ("generated",),
                    {"mel": {0: "batch"}, "face": {0: "batch"}, "generated": {0: "batch"}},
                    _wav2lip, _wav2lip_examples, "--onnx_path"),
    "s3fd": Spec("s3fd", ("image",), _S3FD_OUT,
                 {n: {0: "batch", 2: f"{n}_height", 3: f"{n}_width"} for n in _S3FD_OUT}
                 | {"image": {0: "batch", 2: "height", 3: "width"}},
                 _s3fd, _s3fd_examples, "--detector_onnx_path"),
    "esrgan": Spec("esrgan", ("image",), ("upscaled",),
                   {"image": {0: "batch", 2: "height", 3: "width"}, "upscaled": {0: "batch", 2: "out_height",
                                                                              3: "out_width"}},
                   _esrgan, _esrgan_examples, "--sr_onnx_path"),
    "bisenet": Spec("bisenet", ("image",), ("logits",),
                    {n: {0: "batch", 2: f"{n}_height", 3: f"{n}_width"} for n in ("image", "logits")},
                    _bisenet, _bisenet_examples, "--segmentation_onnx_path"),
    # the restorers: face (N, 3, 512, 512) RGB in [-1, 1] (and CodeFormer's w, shape [1]) → restored, same range
    "gfpgan": Spec("gfpgan", ("face",), ("restored",), {"face": {0: "batch"}, "restored": {0: "batch"}},
                   _restorer("gfpgan"), lambda batch, seed, trace: (_faces(batch, seed),), "--enhancer_onnx_path"),
    "codeformer": Spec("codeformer", ("face", "w"), ("restored", "logits", "lq_feat"),
                       {n: {0: "batch"} for n in ("face", "restored", "logits", "lq_feat")},
                       _restorer("codeformer"), _codeformer_examples, "--enhancer_onnx_path"),
}  # fmt: skip


class OnnxWav2Lip:
    """Wav2Lip's forward pass in ONNX Runtime: one session whose `run` is thread-safe, so the generate
    stage's workers share it, each run on `threads` threads (default: the torch path's per worker)."""

    def __init__(self, onnx_path: str | os.PathLike, device: torch.device, threads: int | None = None) -> None:
        threads = threads or generator_workers(device)[1]
        self.net = OnnxNet(open_session(onnx_path, SPECS["wav2lip"], device, threads))

    def __call__(self, faces: np.ndarray, mels: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) uint8 crops + (n, 1, 80, 16) mel windows → (n, S, S, 3) uint8 generated faces."""
        return self.scaled(faces, mels).astype(np.uint8)

    def scaled(self, faces: np.ndarray, mels: np.ndarray) -> np.ndarray:
        """The generated faces before the truncation: float32 pred·255 (`generation.to_scaled`)."""
        mel, face = generator_inputs(faces, mels, torch.device("cpu"), torch.float32)
        return to_scaled(torch.from_numpy(self.net.run(None, mel.numpy(), face.numpy())[0]))


class OnnxRestorer:
    """GFPGAN's or CodeFormer's export in ONNX Runtime (`restorers.Restore`): one session, thread-safe,
    shared by the workers, each run on `threads` threads."""

    def __init__(self, name: str, onnx_path: str | os.PathLike, device: torch.device, threads: int) -> None:
        self.name = name
        self.net = OnnxNet(open_session(onnx_path, SPECS[name], device, threads))

    def __call__(self, crops: np.ndarray, fidelity: float) -> np.ndarray:
        """(n, 512, 512, 3) uint8 BGR crops → restored, same layout; `fidelity` is CodeFormer's w."""
        x = restorer_inputs(crops, torch.device("cpu"), torch.float32).numpy()
        inputs = (x,) if self.name == "gfpgan" else (x, np.array([fidelity], np.float32))
        return restored_crops(torch.from_numpy(self.net.run(["restored"], *inputs)[0]))


def s3fd_network(
    onnx_path: str | os.PathLike | None, cache_dir: str | os.PathLike | None, quiet: bool,
    weights: str | os.PathLike, device: torch.device,
) -> OnnxNet:  # fmt: skip
    """S3FD's forward pass in ONNX Runtime, from `onnx_path` or the cached export of `weights`, with as
    many threads as torch has (detection runs on the calling thread)."""
    path = onnx_file(SPECS["s3fd"], onnx_path, weights, cache_dir, quiet, "--detector_path")
    return OnnxNet(open_session(path, SPECS["s3fd"], device, torch.get_num_threads()))
