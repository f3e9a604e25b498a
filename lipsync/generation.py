"""The generate stage: batches of face crops and mel windows through Wav2Lip.

A batch is consecutive output frames; those with a face carry their crop and their mel window. On a GPU
one batch runs at a time, on a thread that overlaps it with pasting and encoding; on a CPU, whole batches
run side by side on one core each (`generator_workers`). The stage keeps nothing between batches but the
generator's batch limit, which halves for good after an out-of-memory error.

The forward pass is a `Predict` function handed to `Generator`: Wav2Lip in PyTorch (`Wav2LipTorch`, here)
or in ONNX Runtime (`onnx_models.OnnxWav2Lip`); batching, chunking and threads are the same for both.
Inputs are the original's datagen: the crop with its lower half zeroed, stacked with the unmasked crop as
6 channels /255; outputs ×255 truncated to uint8. The enhance stage (enhance.py) runs on the same workers:
its steps take the outputs before the truncation (`scaled`), and its face parser fills each batch's `parses`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from audio import mel_windows
from common.devices import BatchLimit, in_chunks, in_dtype_of, prepare_network
from common.errors import UserError
from common.weight_cache import load_prepared
from common.weights import load_model, missing_file_message, skeleton
from lipsync.crops import Batch
from lipsync.options import Options
from lipsync.threads import ordered_map
from models import Wav2Lip
from models.conv import Conv2d, Conv2dTranspose, fold_batchnorm

GPU_BATCH_SIZE = 128  # the original's --wav2lip_batch_size
CPU_BATCH_SIZE = 16  # on a CPU, smaller activation buffers are faster (cache, page faults): 16 vs 128 ≈ 1.8x
CPU_FINE_CHUNK = 4  # frames at a time through the generator's finest stages on a CPU (cache-sized)
CPU_WORKERS_MAX = 4  # generator batches run side by side on a CPU, each on its share of the cores
PREPARED = (
    "wav2lip-{dtype}-v2"  # the weight cache's tag of the prepared generator: bump when `prepare_generator` changes
)
BATCHES_BESIDE_WORKERS = 3  # in flight besides the workers': being cropped, queued, being pasted and encoded
Predict = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (n, S, S, 3) uint8 crops, (n, 1, 80, 16) mels → faces


def batches_in_flight(workers: int) -> int:
    """Batches alive at once between the decode and encode stages, each holding its full frames."""
    return workers + BATCHES_BESIDE_WORKERS


def batch_sizes(n: int, batch_size: int, workers: int) -> list[int]:
    """`n` frames in near-equal batches of at most `batch_size`, as many as a multiple of `workers`: the
    workers then finish together, instead of one running a short last batch while the others wait."""
    rounds = -(-n // (batch_size * workers))
    count = min(n, rounds * workers)
    small, extra = divmod(n, count) if count else (0, 0)
    return [small + 1] * extra + [small] * (count - extra)


def generator_workers(device: torch.device) -> tuple[int, int]:
    """(threads running generator batches, torch threads each).

    On a CPU, whole batches side by side on one core each (up to CPU_WORKERS_MAX) beat one batch split
    over every core: the two threads of a split convolution wait for each other at every layer, and
    any time decoding or encoding takes from one of them idles the other (2 cores: 14.8 vs 13.1
    frames/s end to end). A GPU runs one batch at a time; its thread overlaps it with pasting and encoding.
    """
    if device.type != "cpu":
        return 1, torch.get_num_threads()
    threads = torch.get_num_threads()
    workers = max(1, min(CPU_WORKERS_MAX, threads))
    return workers, max(1, threads // workers)


def generator_inputs(
    faces: np.ndarray, mels: np.ndarray, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's datagen in tensors: [lower half zeroed, unmasked] as 6 channels, /255."""
    x = torch.from_numpy(faces).to(device).permute(0, 3, 1, 2).float().div_(255)
    masked = x.clone()
    masked[:, :, x.shape[2] // 2 :] = 0
    face_input = torch.cat([masked, x], dim=1).to(dtype)
    return torch.from_numpy(mels).to(device, dtype), face_input


def to_scaled(pred: torch.Tensor) -> np.ndarray:
    """(n, 3, S, S) in [0, 1] → (n, S, S, 3) float32 ×255, not rounded: what Wav2Lip-HQ's ESRGAN reads."""
    return pred.float().cpu().numpy().transpose(0, 2, 3, 1) * 255.0


def to_uint8(pred: torch.Tensor) -> np.ndarray:
    """(n, 3, S, S) in [0, 1] → (n, S, S, 3) uint8, truncated as the original's `astype(np.uint8)`."""
    return to_scaled(pred).astype(np.uint8)


class OwnDtypeConv(nn.Conv2d):
    """A convolution that computes in its weights' dtype whatever its input's (`in_dtype_of`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(in_dtype_of(x, self))


def prepare_generator(model: Wav2Lip, device: torch.device, dtype: torch.dtype) -> Wav2Lip:
    """The generator as it runs: BatchNorm folded into the convolutions, in `dtype` (channels-last on a
    CPU); below float32, its output block's last 1x1 convolution (32 to 3 channels) and sigmoid in float32,
    with the checkpoint's float32 weights exactly (`prepare_network`'s `keep_float32`).

    They make the pixels: in bf16 the sigmoid's input carries 8 bits of mantissa, and rounding it there moved
    the 96x96 faces by 0.7 dB PSNR against fp32 on the real clips (README, "Precision"), for 0.1 % of the FLOPs.
    Works on the meta device too (the weight cache's skeleton); the state dict's keys stay the checkpoint's.
    """
    model = fold_batchnorm(model)
    return prepare_network(model, device, dtype, keep_float32=[own_dtype_tail(model)])


def own_dtype_tail(model: Wav2Lip) -> OwnDtypeConv:
    """The output block's last convolution, made an `OwnDtypeConv`: the same layer, weights and state dict
    keys, fed through `in_dtype_of` (a no-op in float32)."""
    tail = model.output_block[1]
    tail.__class__ = OwnDtypeConv
    return tail


def prepared_skeleton(dtype: torch.dtype) -> Wav2Lip:
    """`prepare_generator`'s network on the meta device, for the weight cache's tensors to fill.

    Its BatchNorms are dropped as `fold_batchnorm` drops them, without its arithmetic: the first operation on
    a meta tensor runs a Python meta kernel that imports torch._dynamo, 1.2-1.5 CPU-s before the first frame
    (about a tenth of a bf16 run). The cache's strict load checks that the keys match `prepare_generator`'s.
    """
    model = skeleton(Wav2Lip)
    for block in model.modules():
        if isinstance(block, Conv2d | Conv2dTranspose) and isinstance(block.conv_block[1], nn.BatchNorm2d):
            block.conv_block[1] = nn.Identity()
            block.act.inplace = True
    return prepare_network(model, torch.device("meta"), dtype, keep_float32=[own_dtype_tail(model)])


def load_generator(checkpoint_path: str | os.PathLike, device: torch.device, dtype: torch.dtype,
                   cache_dir: str | os.PathLike | None = None) -> Wav2Lip:  # fmt: skip
    """The prepared generator of `checkpoint_path`; on a CPU mapped from the weight cache after the first
    run (`common.weight_cache`, in `cache_dir`/weights or ~/.cache/wav2lip/weights)."""

    def load() -> Wav2Lip:
        return prepare_generator(load_model(skeleton(Wav2Lip), checkpoint_path, "Wav2Lip"), device, dtype)

    if device.type != "cpu":
        return load()
    tag = PREPARED.format(dtype=str(dtype).removeprefix("torch."))
    return load_prepared(checkpoint_path, tag, cache_dir, load, lambda: prepared_skeleton(dtype))


def in_background(fn: Callable[..., object], *args: object) -> Future:
    """`fn(*args)` on a thread of its own; the future holds its result or its exception."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="load")
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


class Wav2LipTorch:
    """Wav2Lip's forward pass in PyTorch, loaded once on a device (`prepare_generator`), for any number of clips.

    The weights load on a thread of their own while the run probes the video and reads the speech; `ready`
    (the pipeline calls it before detection) and the first forward pass wait for them, and a file that is not
    a Wav2Lip checkpoint is reported there; a missing file is reported at once.
    """

    def __init__(
        self, checkpoint_path: str | os.PathLike | Path, device: torch.device, dtype: torch.dtype = torch.float32,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:  # fmt: skip
        if not Path(checkpoint_path).is_file():
            raise UserError(missing_file_message(checkpoint_path, "Wav2Lip"))
        self.device, self.dtype = device, dtype
        # oneDNN's convolutions run ~10-20 % faster on NHWC tensors; outputs agree to float round-off
        self.memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        self.fine_chunk = CPU_FINE_CHUNK if device.type == "cpu" else None
        self._loading = in_background(load_generator, checkpoint_path, device, dtype, cache_dir)

    @property
    def model(self) -> Wav2Lip:
        """The prepared generator, once loaded (waiting for it; its loading's error is raised here)."""
        return self._loading.result()

    def ready(self) -> None:
        """Wait for the weights: a wrong or unsafe file is reported here, before a clip's own work."""
        self._loading.result()

    def __call__(self, faces: np.ndarray, mels: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) uint8 crops + (n, 1, 80, 16) mel windows → (n, S, S, 3) uint8 generated faces."""
        return self.scaled(faces, mels).astype(np.uint8)

    def scaled(self, faces: np.ndarray, mels: np.ndarray) -> np.ndarray:
        """The generated faces before the truncation: float32 pred·255 (`to_scaled`)."""
        model = self.model
        with torch.inference_mode():
            inputs = generator_inputs(faces, mels, self.device, self.dtype)
            inputs = (x.contiguous(memory_format=self.memory_format) for x in inputs)
            return to_scaled(model(*inputs, fine_chunk=self.fine_chunk))


class EnhanceStage(Protocol):
    """What the generate stage asks of the enhance stage (`enhance.Enhance`), which runs on its workers."""

    def parse_batch(self, batch: Batch) -> None:
        """Fill `batch.parses` from the batch's source frames and boxes."""
        ...


class Generator:
    """The generate stage around a forward pass (`predict`), for any number of clips.

    With an `enhance` stage, `predict` is the forward pass followed by its steps (`enhance.Enhanced`) and is
    also given each face's source frame and box; the stage's face parser runs first, on the same worker.
    `extra_bytes`: what a frame in flight holds besides its decoded frame (enhanced faces, parses), which
    `plan` counts."""

    def __init__(self, predict: Predict, device: torch.device, quiet: bool = False, *,
                 enhance: EnhanceStage | None = None, extra_bytes: int = 0) -> None:  # fmt: skip
        self.predict, self.device, self.enhance, self.extra_bytes = predict, device, enhance, extra_bytes
        self.default_batch_size = GPU_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE
        self.limit = BatchLimit(1 << 30, "the generator", quiet)

    def plan(self, n_frames: int, opts: Options, frame_bytes: int) -> tuple[int, list[int]]:
        """(cap, batch sizes) of `n_frames` frames: the one batch plan of the offline run and of a stream
        that wants its frames (`live.stream.AvatarStream(layout=...)`). The cap is `wav2lip_batch_size`, or
        the device's default, or fewer frames when the batches in flight would exceed the memory budget."""
        workers = generator_workers(self.device)[0]
        cap = opts.wav2lip_batch_size or self.default_batch_size
        cap = min(cap, opts.frames_within_budget(frame_bytes + self.extra_bytes, batches_in_flight(workers)))
        return cap, batch_sizes(n_frames, cap, workers)

    def generate(self, batch: Batch, mel: np.ndarray, cap: int, opts: Options | None = None) -> Batch:
        """Fill `batch.generated` (and, with an enhance stage, `batch.parses`), in chunks of at most `cap`
        (and the batch limit)."""
        if not len(batch.faces):
            batch.generated = batch.faces
            return batch
        if self.enhance is not None:
            self.enhance.parse_batch(batch)
        sources = [(f, b) for f, b in zip(batch.frames, batch.boxes, strict=True) if b is not None]
        items = list(zip(mel_windows(mel, batch.mel_starts), batch.faces, sources, strict=True))

        def run(chunk: list[tuple[np.ndarray, np.ndarray, tuple]]) -> list[np.ndarray]:
            mels, faces, chunk_sources = zip(*chunk, strict=True)
            if self.enhance is None:
                return list(self.predict(np.stack(faces), np.stack(mels)))
            frames, boxes = zip(*chunk_sources, strict=True)
            return list(self.predict(np.stack(faces), np.stack(mels), frames, boxes, opts))

        batch.generated = np.stack(in_chunks(run, items, self.limit, cap))
        return batch

    def __call__(
        self, batches: Iterable[Batch], mel: np.ndarray, cap: int, opts: Options | None = None
    ) -> Iterator[Batch]:
        """The stage: batches in, the same batches with their faces generated out, in order (`opts`: the
        clip's options, for the enhance steps)."""
        workers, threads = generator_workers(self.device)
        return ordered_map(lambda batch: self.generate(batch, mel, cap, opts), batches, workers, threads)
