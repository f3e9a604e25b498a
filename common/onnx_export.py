"""Networks through ONNX Runtime, for any network: export to a checked `.onnx`, the export cache, sessions.

This module knows no network. Each owner declares its networks as `Spec`s (the engine's in
`lipsync/onnx_models.py`, SyncNet's in `evaluation/onnx_syncnet.py`): the input and output names, the
dynamic axes, how to build the torch module from a weight file, and example inputs. An export is checked
with `onnx.checker` and against PyTorch on inputs of another batch size than the trace's before it is
renamed into place. Without an `.onnx` path, a weight file is exported once into a cache folder
(`cached_export`) and reused. The execution provider follows the device: TensorRT, then CUDA, on a CUDA
device when the installed onnxruntime has them; the CPU otherwise.
"""

from __future__ import annotations

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

from common.atomic_files import atomic_path, check_writable
from common.errors import UserError

OPSET = 20  # the newest opset of torch's TorchScript exporter (torch 2.13); no onnxscript needed
TRACE_BATCH, VERIFY_BATCH = 1, 2  # checked at another batch size than traced: the batch axis is dynamic
VERIFY_RTOL = 1e-4  # an export may differ from PyTorch by this fraction of the output's largest value
CACHE_VERSION = 1  # part of the cache key: bump when the exported graphs change
ORT_LOAD_ERRORS = (ort_state.InvalidProtobuf, ort_state.InvalidGraph, ort_state.Fail, ort_state.NoSuchFile)
CUDA_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")  # preferred first, when installed
Examples = Callable[[int, int, bool], tuple]  # (batch, seed, for the trace) → input tensors


@dataclass(frozen=True)
class Spec:
    """One network's ONNX interface and where it comes from.

    `network(checkpoint_path, flag)` builds the torch module to export (CPU, eval mode) or raises the weight
    loader's one-line error naming `flag`; `examples(batch, seed, trace)` makes inputs in the network's
    range (the trace's and the check's may differ in size, to prove the dynamic axes).
    """

    name: str  # `export_onnx.py --model` and the file's `wav2lip.model` metadata
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]]
    network: Callable[[str | os.PathLike, str], nn.Module]
    examples: Examples
    flag: str  # how a user passes the `.onnx` file, for errors


def export(
    spec: Spec, checkpoint_path: str | os.PathLike, out: str | os.PathLike, flag: str = "--checkpoint_path"
) -> Path:
    """Export `spec`'s network with the weights of `checkpoint_path` to `out`.

    The file is written under a temporary name, checked with `onnx.checker`, run against PyTorch on
    random inputs of another batch size than the trace's, and only then renamed to `out`; an unwritable
    folder or a wrong checkpoint stops before any work, and nothing is left behind.
    """
    import onnx

    out = Path(out)
    check_writable(out.parent, "--out")
    network = spec.network(checkpoint_path, flag)
    with atomic_path(out) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            network, spec.examples(TRACE_BATCH, 0, True), str(tmp), dynamo=False, opset_version=OPSET,
            input_names=list(spec.inputs), output_names=list(spec.outputs), dynamic_axes=spec.dynamic,
        )  # fmt: skip
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto, full_check=True)
        onnx.helper.set_model_props(proto, {"wav2lip.model": spec.name, "wav2lip.source": Path(checkpoint_path).name})
        onnx.save(proto, str(tmp))
        verify(spec, network, tmp, out)
    return out


def verify(spec: Spec, network: nn.Module, path: Path, out: Path) -> None:
    """Every output of the ONNX file equals PyTorch's to `VERIFY_RTOL` of its scale on inputs of another
    batch size than the trace's, or a one-line `UserError` (nothing is then written)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = spec.examples(VERIFY_BATCH, 1, False)
    want = network(*inputs)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)})
    for name, a, b in zip(spec.outputs, got, want, strict=True):
        scale = max(float(b.abs().max()), 1e-6)
        if a.shape != tuple(b.shape) or (err := float(np.abs(a - b.numpy()).max())) > VERIFY_RTOL * scale:
            detail = f"shape {a.shape}" if a.shape != tuple(b.shape) else f"by {err:.3g} (scale {scale:.3g})"
            raise UserError(f"{out}: the ONNX export of {spec.name} differs from PyTorch in {name} {detail}; "
                            "not written (report it with your torch and onnx versions)")  # fmt: skip


def default_cache_dir() -> Path:
    """Where exports made on the fly go without `--cache_dir`: $XDG_CACHE_HOME/wav2lip/onnx (~/.cache/...)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wav2lip" / "onnx"


def cached_export(
    spec: Spec, checkpoint_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
    quiet: bool = False, flag: str = "--checkpoint_path",
) -> Path:  # fmt: skip
    """The `.onnx` of `checkpoint_path` in `cache_dir`/onnx (default: `default_cache_dir()`), exported on first
    use. The key is the weight file (path, size, modification time), the torch version and `CACHE_VERSION`,
    so a replaced file is exported again."""
    source = Path(checkpoint_path).expanduser().resolve()
    if not source.is_file():  # the loader's one-line error names the file and where to get it
        spec.network(source, flag)
    stat = source.stat()
    key = f"{spec.name}|{source}|{stat.st_size}|{stat.st_mtime_ns}|{torch.__version__}|{CACHE_VERSION}"
    folder = Path(cache_dir) / "onnx" if cache_dir is not None else default_cache_dir()
    path = folder / f"{spec.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"
    if not path.is_file():
        if not quiet:
            print(f"exporting {source.name} to ONNX (once): {path}", file=sys.stderr)
        check_writable(folder, "--cache_dir")
        export(spec, source, path, flag)
    return path


def onnx_file(
    spec: Spec, onnx_path: str | os.PathLike | None, checkpoint_path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None, quiet: bool = False, flag: str = "--checkpoint_path",
) -> Path:  # fmt: skip
    """`onnx_path` when given, else the cached export of `checkpoint_path` (`flag` names it in errors)."""
    return Path(onnx_path) if onnx_path is not None else cached_export(spec, checkpoint_path, cache_dir, quiet, flag)


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


def open_session(path: str | os.PathLike, spec: Spec, device: torch.device, threads: int) -> ort.InferenceSession:
    """An ONNX Runtime session of `spec`'s file, `threads` intra-op threads per run, or a one-line error.

    Threads do not spin while waiting: on a busy CPU (the pipeline decodes and encodes beside the
    network) spinning takes cores from the other stages.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path}: ONNX file not found; make it with export_onnx.py --model {spec.name}, or drop {spec.flag}"
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
    if made_for not in (None, spec.name) or [i.name for i in session.get_inputs()] != list(spec.inputs):
        raise UserError(f"{path}: this is not an ONNX export of {spec.name} ({made_for or 'unknown model'}); "
                        f"export one with export_onnx.py --model {spec.name}")  # fmt: skip
    return session


class OnnxNet:
    """A session called like a torch module: tensors in, the list of output tensors out (on the inputs'
    device). Also `run(outputs, *arrays)` for NumPy arrays."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]

    def run(self, outputs: Sequence[str] | None, *arrays: np.ndarray) -> list[np.ndarray]:
        return self.session.run(outputs, dict(zip(self.inputs, arrays, strict=True)))

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        arrays = [np.ascontiguousarray(t.detach().float().cpu().numpy()) for t in tensors]
        return [torch.from_numpy(a).to(tensors[0].device) for a in self.run(None, *arrays)]
