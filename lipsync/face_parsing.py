"""The face parser of the HQ path: BiSeNet over each SOURCE face crop, a 512×512 map of 19 classes.

Wav2Lip-HQ replaces only what its parser calls skin, mouth and lips of the original frame's face; the map
is what `face_masks` blends through. The input is the fork's: the box of the source frame resized to
512×512 (uint8, INTER_LINEAR, aspect not kept), RGB, /255, ImageNet mean and std, in float32; the labels are
the argmax of the main head's logits, taken in float32 (first maximum on ties, as NumPy's).

A parse depends only on the crop's pixels and the parser, so it is cached by their content: in memory for
the run (a video that loops is parsed once per source frame) and, with `--cache_dir`, on disk in
`parsing/` (a second run on the same video, with any speech, parses nothing). The parser runs on the
generation workers, in chunks of `chunk_size` crops, halving after an out-of-memory error.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from common.atomic_files import atomic_path
from common.devices import BatchLimit, in_chunks, prepare_network
from face_detection import Box
from lipsync.face_masks import PARSE_SIZE
from lipsync.hq_weights import PARSER_FLAG, load_bisenet
from models.bisenet import IMAGENET_MEAN, IMAGENET_STD

CPU_CHUNK, GPU_CHUNK = 2, 16  # crops per parser call: 512×512 activations are ~100 MB a crop in fp32
MEMORY_CACHE_BYTES = 64 << 20  # parses kept in memory, PNG-compressed (~10 kB each: thousands of frames)
CACHE_VERSION = 1
Labels = Callable[[np.ndarray], np.ndarray]  # (n, 512, 512, 3) uint8 BGR crops → (n, 512, 512) uint8 labels


def parser_inputs(crops: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n, 512, 512, 3) uint8 BGR → the network's input: RGB, /255, minus ImageNet's mean, over its std, in
    float32 as torchvision's ToTensor and Normalize compute it (then cast to `dtype`)."""
    x = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1])).to(device).permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return x.sub(mean).div(std).to(dtype)


def labels_of(logits: torch.Tensor) -> np.ndarray:
    """(n, classes, H, W) logits → (n, H, W) uint8 class indices, the argmax taken in float32."""
    return logits.float().argmax(1).to(torch.uint8).cpu().numpy()


class TorchParser:
    """BiSeNet's main head in PyTorch, loaded once on a device in the run's dtype."""

    def __init__(self, path: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.model = prepare_network(load_bisenet(path), device, dtype)
        self.memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = parser_inputs(crops, self.device, self.dtype).contiguous(memory_format=self.memory_format)
            return labels_of(self.model.parse(x))


class OnnxParser:
    """BiSeNet's main head in ONNX Runtime (`export_onnx.py --model bisenet`, or an export cached once)."""

    def __init__(self, onnx_path: str | os.PathLike, device: torch.device, threads: int) -> None:
        from common.onnx_export import OnnxNet, open_session
        from lipsync.onnx_models import SPECS

        self.net = OnnxNet(open_session(onnx_path, SPECS["bisenet"], device, threads))

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        x = parser_inputs(crops, torch.device("cpu"), torch.float32).numpy()
        return labels_of(torch.from_numpy(self.net.run(None, x)[0]))


def pack(labels: np.ndarray) -> bytes:
    """A parse as PNG bytes: lossless, ~10 kB instead of 262 kB (a parse is a few large regions)."""
    return cv2.imencode(".png", labels)[1].tobytes()


def unpack(data: bytes) -> np.ndarray | None:
    """The parse of `pack`'s bytes, or None when they are not a whole 512×512 one (a torn file)."""
    labels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return labels if labels is not None and labels.shape == (PARSE_SIZE, PARSE_SIZE) else None


class ParseCache:
    """Parses by the content of their crop: PNG bytes in memory (the newest `MEMORY_CACHE_BYTES`) and, with
    a folder, one PNG file each, written atomically. Shared by the worker threads."""

    def __init__(self, identity: str, folder: str | os.PathLike | None) -> None:
        self.identity = identity  # the parser's weights, dtype and backend: part of every key
        self.folder = Path(folder) / "parsing" if folder is not None else None
        self.memory: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.size, self.lock = 0, threading.Lock()

    def key(self, crop: np.ndarray) -> str:
        digest = hashlib.blake2b(crop.tobytes(), digest_size=16, key=self.identity.encode()[:64])
        return digest.hexdigest()

    def get(self, key: str) -> np.ndarray | None:
        with self.lock:
            data = self.memory.get(key)
            if data is not None:
                self.memory.move_to_end(key)
        if data is None and self.folder is not None and (path := self.folder / f"{key}.png").is_file():
            data = path.read_bytes()
        return unpack(data) if data else None

    def put(self, key: str, labels: np.ndarray) -> None:
        data = pack(labels)
        with self.lock:
            if key not in self.memory:
                self.memory[key], self.size = data, self.size + len(data)
            while self.size > MEMORY_CACHE_BYTES:
                self.size -= len(self.memory.popitem(last=False)[1])
        if self.folder is not None and not (path := self.folder / f"{key}.png").is_file():
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)


def weights_identity(path: str | os.PathLike, dtype: torch.dtype, backend: str) -> str:
    """What a parse depends on besides the crop: the weight file (path, size, time), dtype and backend."""
    source = Path(path).expanduser().resolve()
    stat = source.stat()
    text = f"{source}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|{backend}|{CACHE_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def source_crop(frame: np.ndarray, box: Box) -> np.ndarray:
    """The parser's view of a face: the box of the source frame at 512×512 (uint8 INTER_LINEAR, as the fork)."""
    return cv2.resize(frame[box.y1 : box.y2, box.x1 : box.x2], (PARSE_SIZE, PARSE_SIZE))


class FaceParser:
    """The parse of each face box of a batch of frames, from the cache or from `labels` (a network's
    forward pass), `chunk_size` crops at a time. Workers that meet the same crop at once (a looping
    video's laps in two batches side by side) parse it once: the others wait for it."""

    def __init__(self, labels: Labels, cache: ParseCache, chunk_size: int, quiet: bool = False) -> None:
        self.labels, self.cache, self.chunk_size = labels, cache, chunk_size
        self.limit = BatchLimit(1 << 30, "the face parser", quiet)
        self.pending: dict[str, threading.Event] = {}  # keys being parsed by some worker now
        self.lock = threading.Lock()

    def __call__(self, frames: Sequence[np.ndarray], boxes: Sequence[Box | None]) -> list[np.ndarray]:
        """(512, 512) uint8 labels for each frame that has a box, in order."""
        keys, crops = [], {}  # each face's key; key → crop, each content once
        for frame, box in zip(frames, boxes, strict=True):
            if box is not None:
                crop = source_crop(frame, box)
                keys.append(self.cache.key(crop))
                crops.setdefault(keys[-1], crop)
        known = {k: labels for k in crops if (labels := self.cache.get(k)) is not None}
        mine, theirs = self._claim(set(crops) - set(known))
        try:
            todo = [k for k in crops if k in mine]
            run = lambda chunk: list(self.labels(np.stack(chunk)))  # noqa: E731
            for key, labels in zip(todo, in_chunks(run, [crops[k] for k in todo], self.limit, self.chunk_size),
                                   strict=True):  # fmt: skip
                self.cache.put(key, labels)
                known[key] = labels
        finally:
            self._release(mine)
        for key, event in theirs.items():
            event.wait()
            if (labels := self.cache.get(key)) is not None:
                known[key] = labels
        if len(known) < len(crops):  # another worker's parse failed, or left the memory cache already
            return self(frames, boxes)
        return [known[k] for k in keys]

    def _claim(self, keys: set[str]) -> tuple[set[str], dict[str, threading.Event]]:
        """(keys this worker parses, {key: event} of those another worker is parsing now)."""
        with self.lock:
            theirs = {k: self.pending[k] for k in keys if k in self.pending}
            mine = keys - set(theirs)
            self.pending.update((k, threading.Event()) for k in mine)
        return mine, theirs

    def _release(self, keys: set[str]) -> None:
        with self.lock:
            for k in keys:
                self.pending.pop(k).set()


def load_face_parser(model, device: torch.device, dtype: torch.dtype, threads: int, quiet: bool) -> FaceParser:
    """The face parser of `model` (`options.ModelOptions`: segmentation_path, backend, cache_dir), loaded once."""
    if model.backend == "onnxruntime":
        from common.onnx_export import onnx_file
        from lipsync.onnx_models import SPECS

        path = onnx_file(SPECS["bisenet"], model.segmentation_onnx_path, model.segmentation_path,
                         model.cache_dir, quiet, PARSER_FLAG)  # fmt: skip
        labels: Labels = OnnxParser(path, device, threads)
    else:
        labels = TorchParser(model.segmentation_path, device, dtype)
    cache = ParseCache(weights_identity(model.segmentation_path, dtype, model.backend), model.cache_dir)
    return FaceParser(labels, cache, GPU_CHUNK if device.type == "cuda" else CPU_CHUNK, quiet)
