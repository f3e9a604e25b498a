"""Lip-sync a face video (or image) to any speech: the inference pipeline of Wav2Lip as a stream of stages.

    decode → detect → smooth boxes → crop + mask → mel windows → generate → paste / blend → encode + mux

Each stage is a generator over frames or batches, so only a few batches are ever in memory whatever the
length of the clip; decoding runs on a thread of its own and the generator on worker threads (one on a
GPU, one per core on a CPU), overlapped with pasting and encoding on the calling thread. Faces are found
in a first pass (boxes are small and kept for the whole video; smoothing looks 4 frames ahead), then a
second pass re-reads the video to generate, re-reading it again each time the audio outlasts it.

With default options the mouth region is the original's computation: S3FD boxes padded by `pads` and
clipped, smoothed over 5 frames (the original's in-place window), crops resized to 96×96 with
INTER_LINEAR, lower half zeroed and stacked with the unmasked crop as 6 channels /255, mel windows of 16
columns starting at int(i·80/fps), output ×255 truncated to uint8, resized back to the box and pasted.

Where we differ, on purpose:
- the output covers the whole audio (ceil(duration·fps) frames; frames past the original's last mel window
  use that window, flush with the end of the mel); the original stops up to 4 frames short;
- a frame without a face passes through unchanged by default (`no_face="keep"`) instead of aborting;
- `resize_factor`, `rotate` and `crop` also apply to a still image (the original ignored them there);
- a variable-frame-rate video is read on a constant timeline at its average rate (`video.iter_frames`).
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import itertools
import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import torch
from tqdm import tqdm

import audio
import video
from checkpoints import load_model, skeleton
from devices import select_device
from errors import UserError
from hparams import HParams, hparams
from models import Wav2Lip
from models.conv import fold_batchnorm

DEFAULT_OUTFILE = "results/result_voice.mp4"
SMOOTH_WINDOW = 5  # frames averaged by the original's get_smoothened_boxes
UNSET_REGION = (-1, -1, -1, -1)  # the original's "no --box" value
NO_FACE_CHOICES = ("keep", "last", "error")
BLEND_CHOICES = ("paste", "feather")
GPU_BATCH_SIZE = 128  # the original's --wav2lip_batch_size
CPU_BATCH_SIZE = 16  # on a CPU, smaller activation buffers are faster (cache, page faults): 16 vs 128 ≈ 1.8x
QUEUE_DEPTH = 1  # batches waiting between two threads; each holds wav2lip_batch_size full frames
CPU_FINE_CHUNK = 4  # frames at a time through the generator's finest stages on a CPU (cache-sized)
CPU_WORKERS_MAX = 4  # generator batches run side by side on a CPU, each on its share of the cores
FEATHER_FRACTION = 12  # feather margin = img_size / 12 (8 px of the 96×96 face)
CACHE_VERSION = 1
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap for the next batch

T = TypeVar("T")
R = TypeVar("R")
Rect = tuple[int, int, int, int]  # x1, y1, x2, y2: the detector's order
Box = tuple[int, int, int, int]  # y1, y2, x1, x2: the original's coords order, as --box takes it


@dataclass(frozen=True)
class Options:
    """Everything that may change from one clip to the next; defaults reproduce the original."""

    static: bool = False
    fps: float = 25.0  # frame rate for a still image (a video keeps its own)
    pads: Sequence[int] = (0, 10, 0, 0)  # top, bottom, left, right
    face_det_batch_size: int = 16
    wav2lip_batch_size: int | None = None  # None: 128 on a GPU, 16 on a CPU
    resize_factor: int = 1
    crop: Sequence[int] = (0, -1, 0, -1)  # top, bottom, left, right; -1: to the edge
    box: Sequence[int] = UNSET_REGION  # top, bottom, left, right; skips detection
    rotate: bool = False
    nosmooth: bool = False
    no_face: str = "keep"
    det_max_side: int | None = None
    det_every: int = 1
    cache_dir: str | Path | None = None
    blend: str = "paste"
    quiet: bool = False

    def check(self) -> None:
        for name in ("pads", "crop", "box"):
            if len(getattr(self, name)) != 4:
                raise UserError(
                    f"--{name} takes 4 integers (top, bottom, left, right), got {list(getattr(self, name))}"
                )
        if self.no_face not in NO_FACE_CHOICES:
            raise UserError(f"--no_face {self.no_face}: choose one of {', '.join(NO_FACE_CHOICES)}")
        if self.blend not in BLEND_CHOICES:
            raise UserError(f"--blend {self.blend}: choose one of {', '.join(BLEND_CHOICES)}")
        positive = {"resize_factor": self.resize_factor, "det_every": self.det_every,
                    "face_det_batch_size": self.face_det_batch_size, "wav2lip_batch_size": self.wav2lip_batch_size,
                    "det_max_side": self.det_max_side, "fps": self.fps}  # fmt: skip
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise UserError(f"--{name} must be positive, got {value}")

    @property
    def fixed_box(self) -> bool:
        return tuple(self.box) != UNSET_REGION


@dataclass
class Summary:
    """What a run did; `line()` is the one-line report the command line prints."""

    outfile: Path
    frames: int
    duration: float  # seconds of output video
    elapsed: float  # seconds the run took
    device: str
    missing: int = 0  # output frames without a face (passed through unchanged)
    missing_ranges: list[tuple[float, float]] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed if self.elapsed > 0 else float("inf")

    def line(self) -> str:
        ranges = ", ".join(f"{a:.2f}-{b:.2f} s" for a, b in self.missing_ranges)
        faces = f"no face in {self.missing} frames ({ranges})" if self.missing else "a face in every frame"
        return (
            f"{self.frames} frames ({self.duration:.2f} s) in {self.elapsed:.1f} s, {self.fps:.1f} frames/s "
            f"on {self.device}; {faces}; wrote {self.outfile}"
        )


# --- frames -------------------------------------------------------------------------------------------


def region(values: Sequence[int], shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) with the original's -1 meaning "to the edge" resolved for `shape`."""
    y1, y2, x1, x2 = values
    return y1, shape[0] if y2 == -1 else y2, x1, shape[1] if x2 == -1 else x2


def check_region(values: Sequence[int], shape: tuple[int, ...], flag: str) -> tuple[int, int, int, int]:
    y1, y2, x1, x2 = region(values, shape)
    if not (0 <= y1 < y2 <= shape[0] and 0 <= x1 < x2 <= shape[1]):
        raise UserError(
            f"{flag} {' '.join(map(str, values))} (top bottom left right) is not a non-empty region inside "
            f"the {shape[1]}x{shape[0]} frame; choose values within it"
        )
    return y1, y2, x1, x2


def prepare_frame(frame: np.ndarray, resize_factor: int, rotate: bool, crop: tuple[int, int, int, int]) -> np.ndarray:
    """The original's per-frame preparation, in its order: shrink, turn right by 90°, crop."""
    if resize_factor > 1:
        frame = cv2.resize(frame, (frame.shape[1] // resize_factor, frame.shape[0] // resize_factor))
    if rotate:
        frame = cv2.rotate(frame, cv2.ROTATE_90_CLOCKWISE)
    y1, y2, x1, x2 = crop
    return frame[y1:y2, x1:x2]


class FrameSource:
    """Re-readable stream of prepared frames of the face input (each `iter()` decodes from the start)."""

    def __init__(self, info: video.VideoInfo, opts: Options) -> None:
        self.info, self.opts = info, opts
        self.rate = None if info.is_image else info.fps  # constant timeline at the average rate
        raw = next(video.iter_frames(info.path, fps=self.rate))
        shrunk = prepare_frame(raw, opts.resize_factor, opts.rotate, (0, raw.shape[0], 0, raw.shape[1])).shape
        self.crop = check_region(opts.crop, shrunk, "--crop")
        self.shape = prepare_frame(raw, opts.resize_factor, opts.rotate, self.crop).shape

    def __iter__(self) -> Iterator[np.ndarray]:
        for frame in video.iter_frames(self.info.path, fps=self.rate):
            yield prepare_frame(frame, self.opts.resize_factor, self.opts.rotate, self.crop)


def cycle_frames(source: Iterable[np.ndarray], n: int, static: bool) -> Iterator[tuple[int, np.ndarray]]:
    """(video index, frame) for `n` output frames: the first frame over and over if `static`, else the
    video looping forward (re-read from the start) as the original's `i % len(frames)`."""
    if static:
        first = next(iter(source))
        for _ in range(n):
            yield 0, first.copy()
        return
    produced = 0
    while produced < n:
        index = 0
        for index, frame in enumerate(source):  # noqa: B007 - a fresh read of the video each lap
            if produced == n:
                return
            yield index, frame
            produced += 1
        if index == 0 and produced == 0:
            raise UserError("the face video yielded no frames")


# --- face boxes ---------------------------------------------------------------------------------------


def pad_and_clip(rect: Rect, pads: Sequence[int], shape: tuple[int, ...]) -> Rect:
    """The original's padding of a detection: pads (top, bottom, left, right), clipped to the frame."""
    pady1, pady2, padx1, padx2 = pads
    x1, y1, x2, y2 = rect
    return max(0, x1 - padx1), max(0, y1 - pady1), min(shape[1], x2 + padx2), min(shape[0], y2 + pady2)


def smoothen(rects: np.ndarray, window: int = SMOOTH_WINDOW) -> np.ndarray:
    """The original's get_smoothened_boxes, quirks included: each box becomes the integer-truncated mean
    of itself and the next window-1; the last ones average the final window, which by then already holds
    smoothed boxes (the original updates in place)."""
    boxes = np.array(rects, dtype=np.int64)
    n = len(boxes)
    for i in range(n):
        boxes[i] = np.mean(boxes[n - window :] if i + window > n else boxes[i : i + window], axis=0)
    return boxes


def smooth_runs(rects: list[Rect | None], window: int = SMOOTH_WINDOW) -> list[Rect | None]:
    """Smooth each run of consecutive frames with a face on its own; faceless frames stay None."""
    out: list[Rect | None] = list(rects)
    i = 0
    while i < len(out):
        if out[i] is None:
            i += 1
            continue
        j = i
        while j < len(out) and out[j] is not None:
            j += 1
        out[i:j] = [tuple(int(v) for v in row) for row in smoothen(np.array(out[i:j]), window)]
        i = j
    return out


def fill_from_last(rects: list[Rect | None]) -> list[Rect | None]:
    """`no_face="last"`: a faceless frame reuses the last box seen (leading ones the first box seen)."""
    first = next((r for r in rects if r is not None), None)
    out, last = [], first
    for r in rects:
        last = r if r is not None else last
        out.append(last)
    return out


def interpolate(keyframes: dict[int, Rect | None], n: int) -> list[Rect | None]:
    """Boxes for frames 0..n-1 from boxes detected at `keyframes`, linearly between two detected keys
    (rounded to pixels); frames between a keyframe without a face and its neighbour get none (which
    `frames_near_misses` avoids by detecting them too)."""
    keys = sorted(keyframes)
    out: list[Rect | None] = [None] * n
    for a, b in itertools.pairwise(keys + [keys[-1]]):
        ra, rb = keyframes[a], keyframes[b]
        out[a] = ra
        if ra is None or rb is None:
            continue
        for i in range(a + 1, b):
            t = (i - a) / (b - a)
            out[i] = tuple(int(round(p + (q - p) * t)) for p, q in zip(ra, rb, strict=True))
    return out


def missing_ranges(missing: Sequence[bool], fps: float) -> list[tuple[float, float]]:
    """Time ranges (start, end) in seconds of the runs of frames flagged in `missing`."""
    ranges, start = [], None
    for i, flag in enumerate([*missing, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            ranges.append((start / fps, i / fps))
            start = None
    return ranges


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


class Batcher:
    """Runs a function over a list in chunks, halving the chunk after an out-of-memory error."""

    def __init__(self, fn: Callable[[Sequence], list], size: int, what: str, quiet: bool) -> None:
        self.fn, self.size, self.what, self.quiet = fn, size, what, quiet

    def __call__(self, items: Sequence) -> list:
        out: list = []
        while len(out) < len(items):
            chunk = items[len(out) : len(out) + self.size]
            try:
                out.extend(self.fn(chunk))
            except (RuntimeError, torch.OutOfMemoryError) as e:
                if not is_oom(e):
                    raise
                if self.size == 1:
                    raise UserError(
                        f"out of memory running {self.what} on a single frame; use --resize_factor, "
                        "--det_max_side or --device cpu"
                    ) from None
                self.size //= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if not self.quiet:
                    print(f"out of memory in {self.what}: retrying with batches of {self.size}", file=sys.stderr)
        return out


def frames_near_misses(keyframes: dict[int, Rect | None]) -> list[int]:
    """Frames between two consecutive keyframes of which one has no face: where the face went (or came
    back) is unknown, so `det_every` detects each of them rather than drop their boxes."""
    keys = sorted(keyframes)
    return [
        i for a, b in itertools.pairwise(keys) if keyframes[a] is None or keyframes[b] is None for i in range(a + 1, b)
    ]


def detect_keyframes(
    frames: Iterable[np.ndarray], detect: Callable[[Sequence[np.ndarray]], list], every: int
) -> tuple[dict[int, Rect | None], int]:
    """Raw detections on every `every`-th frame of `frames` (and the last).

    Returns ({frame index: rect or None}, number of frames). Frames are detected in batches as they
    stream by, so only a batch of frames is held at a time.
    """
    keyframes: dict[int, Rect | None] = {}
    pending: list[tuple[int, np.ndarray]] = []
    batch_size = getattr(detect, "size", 16)
    tail = None  # the latest frame that is not a keyframe
    n = 0

    def flush() -> None:
        found = detect([frame for _, frame in pending])
        keyframes.update((i, r) for (i, _), r in zip(pending, found, strict=True))
        pending.clear()

    for n, frame in enumerate(frames, start=1):
        if (n - 1) % every:
            tail = (n - 1, frame)
            continue
        tail = None
        pending.append((n - 1, frame))
        if len(pending) >= batch_size:
            flush()
    if tail is not None:
        pending.append(tail)
    if pending:
        flush()
    if n == 0:
        raise UserError("the face video yielded no frames")
    return keyframes, n


# --- audio --------------------------------------------------------------------------------------------


def mel_starts(n_columns: int, fps: float, n_frames: int) -> list[int]:
    """Start column of each output frame's window: the original's rule (`audio.mel_chunk_starts`),
    continued with its last window (flush with the end of the mel) until `n_frames` frames."""
    starts = audio.mel_chunk_starts(n_columns, fps)
    return starts + [starts[-1]] * (n_frames - len(starts))


def mel_windows(mel: np.ndarray, starts: Sequence[int]) -> np.ndarray:
    """(n, 1, num_mels, 16) float32 windows: the generator's audio input."""
    return np.stack([mel[:, s : s + audio.MEL_STEP_SIZE] for s in starts])[:, None]


# --- generation ---------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Consecutive output frames; those with a face carry a crop and a mel window for the generator."""

    frames: list[np.ndarray]
    boxes: list[Box | None]
    faces: np.ndarray  # (n_with_face, S, S, 3) uint8
    mel_starts: list[int]
    generated: np.ndarray | None = None  # (n_with_face, S, S, 3) uint8


def batch_sizes(n: int, batch_size: int, workers: int) -> list[int]:
    """`n` frames in near-equal batches of at most `batch_size`, as many as a multiple of `workers`: the
    workers then finish together, instead of one running a short last batch while the others wait."""
    rounds = -(-n // (batch_size * workers))
    count = min(n, rounds * workers)
    small, extra = divmod(n, count) if count else (0, 0)
    return [small + 1] * extra + [small] * (count - extra)


def make_batches(
    items: Iterable[tuple[np.ndarray, Box | None, int]], img_size: int, sizes: Iterable[int]
) -> Iterator[Batch]:
    """Group (frame, box, mel start) into batches of `sizes`, cropping each face and resizing it as the original."""
    iterator = iter(items)
    for size in sizes:
        if not (chunk := tuple(itertools.islice(iterator, size))):
            return
        frames, boxes, starts = zip(*chunk, strict=True)
        faces = [cv2.resize(f[y1:y2, x1:x2], (img_size, img_size)) for f, (y1, y2, x1, x2) in _with_box(frames, boxes)]
        faces_array = np.stack(faces) if faces else np.zeros((0, img_size, img_size, 3), np.uint8)
        face_starts = [s for b, s in zip(boxes, starts, strict=True) if b is not None]
        yield Batch(list(frames), list(boxes), faces_array, face_starts)


def _with_box(frames: Sequence[np.ndarray], boxes: Sequence[Box | None]) -> Iterator[tuple[np.ndarray, Box]]:
    return ((f, b) for f, b in zip(frames, boxes, strict=True) if b is not None)


def generator_inputs(faces: np.ndarray, mels: np.ndarray, device: torch.device, dtype: torch.dtype):
    """The original's datagen in tensors: [lower half zeroed, unmasked] as 6 channels, /255."""
    x = torch.from_numpy(faces).to(device).permute(0, 3, 1, 2).float().div_(255)
    masked = x.clone()
    masked[:, :, x.shape[2] // 2 :] = 0
    face_input = torch.cat([masked, x], dim=1).to(dtype)
    return torch.from_numpy(mels).to(device, dtype), face_input


def to_uint8(pred: torch.Tensor) -> np.ndarray:
    """(n, 3, S, S) in [0, 1] → (n, S, S, 3) uint8, truncated as the original's `astype(np.uint8)`."""
    return (pred.float().cpu().numpy().transpose(0, 2, 3, 1) * 255.0).astype(np.uint8)


def feather_mask(img_size: int) -> np.ndarray:
    """(S, S) float32 weights of the generated face: 1 over the lower face, fading to exactly 0 at the
    crop's edges and above its middle (a Gaussian of radius `margin` over a rectangle inset by it)."""
    margin = max(1, img_size // FEATHER_FRACTION)
    hard = np.zeros((img_size, img_size), np.float32)
    hard[img_size // 2 + margin : img_size - margin, margin : img_size - margin] = 1.0
    kernel = 2 * margin + 1
    return cv2.GaussianBlur(hard, (kernel, kernel), sigmaX=margin / 4, borderType=cv2.BORDER_CONSTANT)


def paste(frame: np.ndarray, box: Box, face: np.ndarray, mask: np.ndarray | None) -> None:
    """Put a generated face back into its box, resized as the original (cv2 default INTER_LINEAR)."""
    y1, y2, x1, x2 = box
    patch = cv2.resize(face, (x2 - x1, y2 - y1))
    if mask is None:
        frame[y1:y2, x1:x2] = patch
        return
    weight = cv2.resize(mask, (x2 - x1, y2 - y1))[..., None]
    region_ = frame[y1:y2, x1:x2].astype(np.float32)
    frame[y1:y2, x1:x2] = np.rint(region_ + (patch.astype(np.float32) - region_) * weight).astype(np.uint8)


# --- threads ------------------------------------------------------------------------------------------


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


def background(items: Iterable[T], depth: int = QUEUE_DEPTH) -> Iterator[T]:
    """Run a stage on a thread of its own, handing its items over through a queue of `depth`.

    Decoding, the network and encoding all release the GIL, so stages on different threads overlap.
    An exception in the stage is raised again in the consumer; a consumer that stops early stops it.
    """
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put(item):
                    break
            else:
                put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failure(e))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := handoff.get()) is not _DONE:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


def tune_cpu_allocator() -> None:
    """Keep freed activation buffers in the heap instead of returning them to the OS after each batch.

    glibc maps buffers above 128 KiB with mmap and unmaps them on free, so every batch page-faults its
    activations in again (about a third of the original's CPU time). Raising the mmap and trim thresholds
    (what GLIBC_TUNABLES would do at start-up) lets the heap reuse them. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD_MAX)
    libc.mallopt(m_trim_threshold, TRIM_THRESHOLD)


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


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, threads: int) -> Iterator[R]:
    """`map(fn, items)` on `workers` threads with `threads` torch threads each, results in order.

    At most workers + 1 items are in flight, so memory stays bounded whatever the length of `items`.
    """
    main_threads = torch.get_num_threads()
    pending: collections.deque[Future] = collections.deque()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="generator", initializer=torch.set_num_threads,
                              initargs=(threads,))  # fmt: skip
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(main_threads)  # new threads start from the last value set, the workers'


# --- the pipeline -------------------------------------------------------------------------------------


class LipSync:
    """The generator (and, when first needed, the face detector) loaded once, for any number of clips.

    sync = LipSync("checkpoints/wav2lip_gan.pth")
    for face, speech, out in jobs:
        print(sync(face, speech, out).line())
    """

    def __init__(
        self,
        checkpoint_path: str | Path,
        device: str = "auto",
        *,
        fp16: bool = False,
        detector_path: str | Path | None = None,
        detector: object | None = None,
        hp: HParams = hparams,
        quiet: bool = False,
    ) -> None:
        self.device = select_device(device)
        if fp16 and self.device.type != "cuda":
            raise UserError(f"--fp16 needs a CUDA GPU; the device is {self.device.type} (drop --fp16)")
        self.dtype = torch.float16 if fp16 else torch.float32
        self.hp, self.detector_path = hp, detector_path
        if not quiet:
            print(f"Using {self.device} for inference{' in float16' if fp16 else ''}.", file=sys.stderr)
        if self.device.type == "cpu":
            tune_cpu_allocator()
        model = load_model(skeleton(Wav2Lip), checkpoint_path, "Wav2Lip", self.device)
        self.model = fold_batchnorm(model).to(self.dtype)
        # oneDNN's convolutions run ~10-20 % faster on NHWC tensors; outputs agree to float round-off
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.fine_chunk = CPU_FINE_CHUNK if self.device.type == "cpu" else None
        self._detector = detector  # any object with face_detection's get_detections_for_batch
        self._detectors: dict[int | None, object] = {}
        self._generate_size: int | None = None

    def detector(self, max_side: int | None):
        """S3FD on this device, built on first use (a run with `box` never needs s3fd.pth)."""
        if self._detector is not None:
            return self._detector
        if max_side not in self._detectors:
            import face_detection

            self._detectors[max_side] = face_detection.FaceAlignment(
                face_detection.LandmarksType._2D, flip_input=False, device=self.device,
                path_to_detector=self.detector_path, max_side=max_side,
            )  # fmt: skip
        return self._detectors[max_side]

    def detector_weights(self) -> Path:
        from face_detection.detection.sfd.sfd_detector import default_weights_path

        return Path(self.detector_path) if self.detector_path is not None else default_weights_path()

    def __call__(
        self,
        face: str | Path,
        audio_path: str | Path,
        outfile: str | Path = DEFAULT_OUTFILE,
        *,
        on_frame: Callable[[int, np.ndarray], None] | None = None,
        **options,
    ) -> Summary:
        """Lip-sync `face` (video or image) to the speech of `audio_path` into `outfile`.

        `options` are the fields of `Options`. `on_frame(i, frame_bgr)` sees every output frame before it
        is encoded (the exact pixels, for tests and previews).
        """
        opts = Options(**options)
        opts.check()
        started = time.perf_counter()
        outfile = Path(outfile)
        check_writable(outfile.parent)
        info = video.probe(face)
        static = opts.static or info.is_image
        fps = float(opts.fps if info.is_image else info.fps)
        source = FrameSource(info, opts)

        wav = audio.load_wav(audio_path, self.hp.sample_rate)
        mel = audio.melspectrogram(wav, self.hp)
        if np.isnan(mel).any():
            raise UserError(f"{audio_path}: the mel spectrogram contains NaN; add a little noise to the audio")
        n_out = video.frames_to_cover(len(wav) / self.hp.sample_rate, fps)
        starts = mel_starts(mel.shape[1], fps, n_out)
        n_out = len(starts)

        boxes = self.face_boxes(source, opts, static, n_out, fps)
        batch_size = opts.wav2lip_batch_size or (GPU_BATCH_SIZE if self.device.type == "cuda" else CPU_BATCH_SIZE)
        generate = self._generator(batch_size, opts.quiet)
        mask = feather_mask(self.hp.img_size) if opts.blend == "feather" else None

        items = (
            (frame, boxes[index % len(boxes)], starts[i])
            for i, (index, frame) in enumerate(cycle_frames(source, n_out, static))
        )
        workers, threads = generator_workers(self.device)
        batches = background(make_batches(items, self.hp.img_size, batch_sizes(n_out, batch_size, workers)))
        generated = ordered_map(lambda batch: self._generate_batch(batch, mel, generate), batches, workers, threads)
        height, width = source.shape[:2]
        missing = []
        with (
            video.VideoWriter(outfile, opts.fps if info.is_image else info.fps, width, height, audio_path) as writer,
            tqdm(total=n_out, desc="lip-sync", unit="frame", disable=opts.quiet, file=sys.stderr) as bar,
        ):
            for batch in generated:
                faces = iter(batch.generated)
                for frame, box in zip(batch.frames, batch.boxes, strict=True):
                    if box is not None:
                        paste(frame, box, next(faces), mask)
                    if on_frame is not None:
                        on_frame(writer.n_frames, frame)
                    missing.append(box is None)
                    writer.write(frame)
                bar.update(len(batch.frames))
        summary = Summary(
            outfile, n_out, n_out / fps, time.perf_counter() - started, str(self.device),
            sum(missing), missing_ranges(missing, fps),
        )  # fmt: skip
        return summary

    def _generator(self, batch_size: int, quiet: bool) -> Batcher:
        """The network over (mel windows, faces) in chunks, shrinking the chunk for good after an OOM."""
        size = min(batch_size, self._generate_size or batch_size)

        def run(chunk: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
            mels, faces = (np.stack(parts) for parts in zip(*chunk, strict=True))
            return list(self.predict(faces, mels))

        return Batcher(run, size, "the generator", quiet)

    def predict(self, faces: np.ndarray, mels: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) uint8 crops + (n, 1, 80, 16) mel windows → (n, S, S, 3) uint8 generated faces."""
        with torch.inference_mode():
            inputs = generator_inputs(faces, mels, self.device, self.dtype)
            inputs = (x.contiguous(memory_format=self.memory_format) for x in inputs)
            return to_uint8(self.model(*inputs, fine_chunk=self.fine_chunk))

    def _generate_batch(self, batch: Batch, mel: np.ndarray, generate: Batcher) -> Batch:
        if len(batch.faces):
            windows = mel_windows(mel, batch.mel_starts)
            batch.generated = np.stack(generate(list(zip(windows, batch.faces, strict=True))))
        else:
            batch.generated = batch.faces
        self._generate_size = generate.size
        return batch

    def face_boxes(self, source: FrameSource, opts: Options, static: bool, n_out: int, fps: float) -> list[Box | None]:
        """One box (y1, y2, x1, x2) or None per frame of the video (one for a static face)."""
        if opts.fixed_box:
            y1, y2, x1, x2 = check_region(opts.box, source.shape, "--box")
            if not opts.quiet:
                print("Using the specified bounding box instead of face detection...", file=sys.stderr)
            return [(y1, y2, x1, x2)]
        n_needed = 1 if static else n_out
        rects = self.detect(source, opts, n_needed)[:n_needed]
        padded = [None if r is None else pad_and_clip(r, opts.pads, source.shape) for r in rects]
        for i, r in enumerate(padded):
            if r is not None and (r[2] <= r[0] or r[3] <= r[1]):
                raise UserError(
                    f"--pads {' '.join(map(str, opts.pads))} leave an empty face box in frame {i} "
                    f"(detected {rects[i]}); use smaller negative pads"
                )
        if opts.no_face == "error" and None in padded:
            i = padded.index(None)
            raise UserError(
                f"{source.info.path}: face not detected in frame {i} ({i / fps:.2f} s); ensure the video has a "
                "face in every frame, or use --no_face keep / last, or --box"
            )
        if opts.no_face == "last":
            padded = fill_from_last(padded)
        if not opts.nosmooth:
            padded = smooth_runs(padded)
        return [None if r is None else (r[1], r[3], r[0], r[2]) for r in padded]

    def detect(self, source: FrameSource, opts: Options, n_needed: int) -> list[Rect | None]:
        """Raw S3FD rects for the first `n_needed` frames, from the cache when it has them."""
        cache = detection_cache_path(opts, source, self.detector_weights()) if opts.cache_dir else None
        if cache is not None and cache.is_file():
            rects = [None if r is None else tuple(r) for r in json.loads(cache.read_text())["rects"]]
            if not opts.quiet:
                print(f"face boxes from the cache: {cache}", file=sys.stderr)
            return rects
        detector = self.detector(opts.det_max_side)
        detect = Batcher(
            lambda frames: detector.get_detections_for_batch(np.stack(frames)),
            opts.face_det_batch_size, "face detection", opts.quiet,
        )  # fmt: skip
        whole_video = cache is not None and not (opts.static or source.info.is_image)
        limit = None if whole_video else n_needed  # a cache entry covers the whole video, for any audio
        total = min(n for n in (limit, source.info.n_frames) if n is not None)
        frames = tqdm(
            itertools.islice(source, limit), total=total, desc="detect faces", unit="frame",
            disable=opts.quiet, file=sys.stderr,
        )  # fmt: skip
        keyframes, n = detect_keyframes(frames, detect, opts.det_every)
        if near_misses := frames_near_misses(keyframes):
            wanted = set(near_misses)
            again = (frame for i, frame in enumerate(itertools.islice(source, n)) if i in wanted)
            again = tqdm(again, total=len(near_misses), desc="detect faces near misses", unit="frame",
                         disable=opts.quiet, file=sys.stderr)  # fmt: skip
            found, _ = detect_keyframes(again, detect, 1)
            keyframes.update(zip(near_misses, (found[k] for k in range(len(near_misses))), strict=True))
        rects = interpolate(keyframes, n)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({"rects": rects}))
            tmp.replace(cache)
        return rects


def check_writable(folder: Path) -> None:
    """Fail before any work if the output folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe_file = folder / f".write-test-{threading.get_ident()}"
        probe_file.touch()
        probe_file.unlink()
    except OSError as e:
        raise UserError(f"{folder}: cannot write the output there ({e.strerror}); choose another --outfile") from None


def detection_cache_path(opts: Options, source: FrameSource, weights: Path) -> Path:
    """Cache file for this video's content and every setting the raw detections depend on."""
    key = {
        "version": CACHE_VERSION,
        "video": video.file_hash(source.info.path),
        "resize_factor": opts.resize_factor, "rotate": opts.rotate, "crop": source.crop,
        "det_max_side": opts.det_max_side, "det_every": opts.det_every,
        "face_det_batch_size": opts.face_det_batch_size, "static": opts.static or source.info.is_image,
        "weights": [str(weights.resolve()), weights.stat().st_size if weights.is_file() else None],
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return Path(opts.cache_dir) / f"{digest}.json"


def lipsync(
    face: str | Path,
    audio_path: str | Path,
    checkpoint_path: str | Path,
    outfile: str | Path = DEFAULT_OUTFILE,
    *,
    device: str = "auto",
    fp16: bool = False,
    detector_path: str | Path | None = None,
    hp: HParams = hparams,
    **options,
) -> Summary:
    """Lip-sync one clip: `LipSync(checkpoint_path, ...)(face, audio_path, outfile, **options)`."""
    quiet = options.get("quiet", False)
    sync = LipSync(checkpoint_path, device, fp16=fp16, detector_path=detector_path, hp=hp, quiet=quiet)
    return sync(face, audio_path, outfile, **options)
