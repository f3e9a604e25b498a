"""The networks through ONNX Runtime: export to `.onnx`, and sessions that stand in for the torch modules.

Three networks export (`export`): the Wav2Lip generator (BatchNorm folded, as the torch path runs it), S3FD
(dynamic batch, height and width) and syncnet_python's SyncNet (lip and audio streams, one file). Each
export is checked with `onnx.checker` and against PyTorch on random inputs before it is renamed into place.

With `--backend onnxruntime` only the forward passes change: `OnnxGenerator` is the generate stage's
`Generator` with its `predict` in ONNX Runtime (same batches, chunks and worker threads), `OnnxNet` is
S3FD's forward pass for `face_detection` (its decoding and NMS stay the same code) and `OnnxSyncNet` is
SyncNet for `evaluation.lse`. Without an `.onnx` path, the checkpoint is exported once into a cache
folder (`cached_export`) and reused. The execution provider follows the device: TensorRT, then CUDA, on a
CUDA device when the installed onnxruntime has them; the CPU otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from torch import nn

from checkpoints import load_model, skeleton
from devices import BatchLimit
from errors import UserError
from files import atomic_path, check_writable
from generation import CPU_BATCH_SIZE, GPU_BATCH_SIZE, Generator, generator_inputs, generator_workers, to_uint8
from options import BACKEND_CHOICES

MODELS = ("wav2lip", "s3fd", "syncnet")
OPSET = 20  # the newest opset of torch's TorchScript exporter (torch 2.13); no onnxscript needed
TRACE_BATCH, VERIFY_BATCH = 1, 2  # checked at another batch size than traced: the batch axis is dynamic
VERIFY_RTOL = 1e-4  # an export may differ from PyTorch by this fraction of the output's largest value
CACHE_VERSION = 1  # part of the cache key: bump when the exported graphs change
FLAGS = {"wav2lip": "--onnx_path", "s3fd": "--detector_onnx_path", "syncnet": "--onnx_path"}  # how users pass each file
ORT_LOAD_ERRORS = (ort_state.InvalidProtobuf, ort_state.InvalidGraph, ort_state.Fail, ort_state.NoSuchFile)
CUDA_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")  # preferred first, when installed


@dataclass(frozen=True)
class Spec:
    """One network's ONNX interface: input and output names, dynamic axes, and the weight file it comes from."""

    arch: str  # checkpoints.ARCHS name
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]]


_S3FD_OUT = tuple(f"{kind}{level}" for level in range(1, 7) for kind in ("cls", "reg"))
SPECS = {
    "wav2lip": Spec("Wav2Lip", ("mel", "face"), ("generated",),
                    {"mel": {0: "batch"}, "face": {0: "batch"}, "generated": {0: "batch"}}),
    "s3fd": Spec("s3fd", ("image",), _S3FD_OUT,
                 {n: {0: "batch", 2: f"{n}_height", 3: f"{n}_width"} for n in _S3FD_OUT}
                 | {"image": {0: "batch", 2: "height", 3: "width"}}),
    "syncnet": Spec("syncnet_python_S", ("lip", "mfcc"), ("lip_embedding", "audio_embedding"),
                    {"lip": {0: "lip_batch"}, "mfcc": {0: "audio_batch"}, "lip_embedding": {0: "lip_batch"},
                     "audio_embedding": {0: "audio_batch"}}),
}  # fmt: skip


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


class _SyncNetStreams(nn.Module):
    """Both streams of syncnet_python's S in one graph; the batches are independent (either may be empty)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, lip: torch.Tensor, mfcc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_lip(lip), self.model.forward_aud(mfcc)


def torch_network(model: str, checkpoint_path: str | os.PathLike, flag: str = "--checkpoint_path") -> nn.Module:
    """The network to export, with the weights of `checkpoint_path`, on the CPU in eval mode.

    A missing file or one of another model is a one-line `UserError` naming it (checkpoints.py).
    """
    if model == "wav2lip":
        from models import Wav2Lip
        from models.conv import fold_batchnorm

        return _PlainWav2Lip(fold_batchnorm(load_model(skeleton(Wav2Lip), checkpoint_path, "Wav2Lip", "cpu", flag)))
    if model == "s3fd":
        from face_detection.detection.sfd.net_s3fd import s3fd

        return load_model(skeleton(s3fd), checkpoint_path, "s3fd", "cpu", flag)
    if model == "syncnet":
        from evaluation.syncnet import load_syncnet

        return _SyncNetStreams(load_syncnet(checkpoint_path)).eval()
    raise UserError(f"--model {model}: choose one of {', '.join(MODELS)}")


def example_inputs(model: str, batch: int, seed: int = 0, size: tuple[int, int] = (96, 160)) -> tuple:
    """Random inputs in each network's range: mel windows and /255 faces; mean-subtracted pixels; raw
    0..255 lip frames and MFCCs. `size` is S3FD's (height, width)."""
    g = torch.Generator().manual_seed(seed)
    if model == "wav2lip":
        return torch.randn(batch, 1, 80, 16, generator=g), torch.rand(batch, 6, 96, 96, generator=g)
    if model == "s3fd":
        return (torch.rand(batch, 3, *size, generator=g) * 255 - 120,)
    return torch.rand(batch, 3, 5, 224, 224, generator=g) * 255, torch.randn(batch, 1, 13, 20, generator=g) * 10


def export(
    model: str, checkpoint_path: str | os.PathLike, out: str | os.PathLike, flag: str = "--checkpoint_path"
) -> Path:
    """Export `model` from `checkpoint_path` to `out` (dynamic batch; S3FD also height and width).

    The file is written under a temporary name, checked with `onnx.checker`, run against PyTorch on
    random inputs of another batch size (and S3FD frame size) than the trace's, and only then renamed to
    `out`; an unwritable folder or a wrong checkpoint stops before any work, and nothing is left behind.
    """
    import onnx

    out = Path(out)
    check_writable(out.parent, "--out")
    network = torch_network(model, checkpoint_path, flag)
    spec = SPECS[model]
    with atomic_path(out) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            network, example_inputs(model, TRACE_BATCH, size=(128, 128)), str(tmp), dynamo=False, opset_version=OPSET,
            input_names=list(spec.inputs), output_names=list(spec.outputs), dynamic_axes=spec.dynamic,
        )  # fmt: skip
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto, full_check=True)
        onnx.helper.set_model_props(proto, {"wav2lip.model": model, "wav2lip.source": Path(checkpoint_path).name})
        onnx.save(proto, str(tmp))
        verify(network, tmp, model, out)
    return out


def verify(network: nn.Module, path: Path, model: str, out: Path) -> None:
    """Every output of the ONNX file equals PyTorch's to `VERIFY_RTOL` of its scale on inputs of another
    batch size (and S3FD frame size) than the trace's, or a one-line `UserError` (nothing is then written)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = example_inputs(model, VERIFY_BATCH, seed=1)
    want = network(*inputs)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)})
    for name, a, b in zip(SPECS[model].outputs, got, want, strict=True):
        scale = max(float(b.abs().max()), 1e-6)
        if a.shape != tuple(b.shape) or (err := float(np.abs(a - b.numpy()).max())) > VERIFY_RTOL * scale:
            detail = f"shape {a.shape}" if a.shape != tuple(b.shape) else f"by {err:.3g} (scale {scale:.3g})"
            raise UserError(f"{out}: the ONNX export of {model} differs from PyTorch in {name} {detail}; "
                            "not written (report it with your torch and onnx versions)")  # fmt: skip


# ------------------------------------------------------------------------------------- cache and sessions


def default_cache_dir() -> Path:
    """Where exports made on the fly go without `--cache_dir`: $XDG_CACHE_HOME/wav2lip/onnx (~/.cache/...)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wav2lip" / "onnx"


def cached_export(
    model: str, checkpoint_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
    quiet: bool = False, flag: str = "--checkpoint_path",
) -> Path:  # fmt: skip
    """The `.onnx` of `checkpoint_path` in `cache_dir`/onnx (default: `default_cache_dir()`), exported on first
    use. The key is the weight file (path, size, modification time), the torch version and `CACHE_VERSION`,
    so a replaced file is exported again."""
    source = Path(checkpoint_path).expanduser().resolve()
    if not source.is_file():  # the loader's one-line error names the file and where to get it
        torch_network(model, source, flag)
    stat = source.stat()
    key = f"{model}|{source}|{stat.st_size}|{stat.st_mtime_ns}|{torch.__version__}|{CACHE_VERSION}"
    folder = Path(cache_dir) / "onnx" if cache_dir is not None else default_cache_dir()
    path = folder / f"{model}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"
    if not path.is_file():
        if not quiet:
            print(f"exporting {source.name} to ONNX (once): {path}", file=sys.stderr)
        check_writable(folder, "--cache_dir")
        export(model, source, path, flag)
    return path


def providers(device: torch.device) -> list:
    """ONNX Runtime execution providers for `device`: TensorRT and CUDA on a CUDA device when installed
    (on its index), then the CPU; only the CPU for any other device (Apple's MPS included)."""
    available = ort.get_available_providers()
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    options = {"device_id": device.index or 0}
    gpu = [(name, options) for name in CUDA_PROVIDERS if name in available]
    if not gpu:
        raise UserError(
            "--backend onnxruntime on CUDA needs onnxruntime-gpu (pip install onnxruntime-gpu); "
            "or use --device cpu or --backend torch"
        )
    return [*gpu, "CPUExecutionProvider"]


def open_session(path: str | os.PathLike, model: str, device: torch.device, threads: int) -> ort.InferenceSession:
    """An ONNX Runtime session of `model`'s file, `threads` intra-op threads per run, or a one-line error.

    Threads do not spin while waiting: on a busy CPU (the pipeline decodes and encodes beside the
    network) spinning takes cores from the other stages.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path}: ONNX file not found; make it with export_onnx.py --model {model}, or drop {FLAGS[model]}"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(str(path), options, providers=providers(device))
    except (*ORT_LOAD_ERRORS, RuntimeError, ValueError) as e:
        raise UserError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0][:120]})") from None
    made_for = session.get_modelmeta().custom_metadata_map.get("wav2lip.model")
    if made_for not in (None, model) or [i.name for i in session.get_inputs()] != list(SPECS[model].inputs):
        raise UserError(f"{path}: this is not an ONNX export of {model} ({made_for or 'unknown model'}); "
                        f"export one with export_onnx.py --model {model}")  # fmt: skip
    return session


def onnx_file(
    model: str, onnx_path: str | os.PathLike | None, checkpoint_path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None, quiet: bool = False, flag: str = "--checkpoint_path",
) -> Path:  # fmt: skip
    """`onnx_path` when given, else the cached export of `checkpoint_path` (`flag` names it in errors)."""
    return Path(onnx_path) if onnx_path is not None else cached_export(model, checkpoint_path, cache_dir, quiet, flag)


# ------------------------------------------------------------------------------- the stand-in networks


class OnnxNet:
    """A session called like a torch module: tensors in, the list of output tensors out (on the inputs'
    device). S3FD's forward pass for `face_detection.FaceAlignment(network=...)`."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]

    def run(self, outputs: Sequence[str] | None, *arrays: np.ndarray) -> list[np.ndarray]:
        return self.session.run(outputs, dict(zip(self.inputs, arrays, strict=True)))

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        arrays = [np.ascontiguousarray(t.detach().float().cpu().numpy()) for t in tensors]
        return [torch.from_numpy(a).to(tensors[0].device) for a in self.run(None, *arrays)]


def s3fd_network(
    onnx_path: str | os.PathLike | None, cache_dir: str | os.PathLike | None, quiet: bool,
    weights: str | os.PathLike, device: torch.device,
) -> OnnxNet:  # fmt: skip
    """S3FD's forward pass in ONNX Runtime, from `onnx_path` or the cached export of `weights`, with as
    many threads as torch has (detection runs on the calling thread)."""
    path = onnx_file("s3fd", onnx_path, weights, cache_dir, quiet, "--detector_path")
    return OnnxNet(open_session(path, "s3fd", device, torch.get_num_threads()))


class OnnxGenerator(Generator):
    """The generate stage with Wav2Lip's forward pass in ONNX Runtime.

    Batching, chunking after out-of-memory and the worker threads are `Generator`'s (`generate`,
    `__call__`): on a CPU whole batches run side by side, each on a one-thread session run (one session,
    whose `run` is thread-safe), as the torch path runs them.
    """

    def __init__(
        self, onnx_path: str | os.PathLike, device: torch.device, quiet: bool = False, threads: int | None = None
    ) -> None:
        """`threads`: per session run (default: the torch path's threads per worker)."""
        self.device = device
        self.dtype = torch.float32
        self.net = OnnxNet(open_session(onnx_path, "wav2lip", device, threads or generator_workers(device)[1]))
        self.default_batch_size = GPU_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE
        self.limit = BatchLimit(1 << 30, "the generator", quiet)

    def predict(self, faces: np.ndarray, mels: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) uint8 crops + (n, 1, 80, 16) mel windows → (n, S, S, 3) uint8 generated faces."""
        mel, face = generator_inputs(faces, mels, torch.device("cpu"), torch.float32)
        return to_uint8(torch.from_numpy(self.net.run(None, mel.numpy(), face.numpy())[0]))


class OnnxSyncNet:
    """syncnet_python's SyncNet in ONNX Runtime, with the two methods `evaluation.lse` calls."""

    def __init__(self, onnx_path: str | os.PathLike, device: torch.device) -> None:
        self.device = device
        self.net = OnnxNet(open_session(onnx_path, "syncnet", device, torch.get_num_threads()))
        self._empty = {"lip": np.zeros((0, 3, 5, 224, 224), np.float32), "mfcc": np.zeros((0, 1, 13, 20), np.float32)}

    def _one(self, stream: str, x: torch.Tensor) -> torch.Tensor:
        arrays = {**self._empty, stream: np.ascontiguousarray(x.detach().float().cpu().numpy())}
        output = "lip_embedding" if stream == "lip" else "audio_embedding"
        return torch.from_numpy(self.net.run([output], arrays["lip"], arrays["mfcc"])[0]).to(x.device)

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        return self._one("lip", x)

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        return self._one("mfcc", x)


def add_syncnet_arguments(parser: argparse.ArgumentParser) -> None:
    """--backend, --onnx_path and --cache_dir for the evaluation scripts' SyncNet."""
    parser.add_argument(
        "--backend", default="torch", choices=BACKEND_CHOICES, help="run SyncNet in PyTorch or ONNX Runtime"
    )
    parser.add_argument("--onnx_path", help="with --backend onnxruntime: SyncNet's .onnx (export_onnx.py --model "
                        "syncnet); default: exported from --initial_model once, into the cache")  # fmt: skip
    parser.add_argument("--cache_dir", help="where that export is cached (default: ~/.cache/wav2lip/onnx)")


def syncnet_loader(
    backend: str, onnx_path: str | None, cache_dir: str | None = None
) -> Callable[[str, torch.device], object]:
    """`(initial_model, device) -> model` for the evaluation scripts: syncnet_python's S in torch, or its
    ONNX export (`onnx_path`, else exported into the cache) in ONNX Runtime."""
    from evaluation.syncnet import load_syncnet

    if backend == "torch":
        return load_syncnet
    return lambda path, device: OnnxSyncNet(onnx_file("syncnet", onnx_path, path, cache_dir), device)
