"""The detect and smooth stages: one face box (or None) per frame of the face input.

Boxes are found in a pass of their own before generation: they are small (a few hundred bytes a
second), and smoothing needs to see 4 frames ahead. The stage keeps only boxes, never frames (frames are
detected in batches as they stream by); with a cache folder, the raw detections of a video are stored keyed
by its content and every setting they depend on, so a second run on the same video skips detection.

With default options this is the original's computation: S3FD on every frame, each box padded by `pads`
and clipped to the frame, then averaged with the next 4 (`smoothen`). `det_every`, `det_max_side` and
`no_face` are opt-in departures.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.atomic_files import write_text_atomic
from common.devices import BatchLimit, in_chunks
from common.errors import UserError
from face_detection import Box
from lipsync.frames import FrameSource, check_region
from lipsync.options import Options
from lipsync.threads import Report, progress

SMOOTH_WINDOW = 5  # frames averaged by the original's get_smoothened_boxes
LONG_DETECTION_S = 60  # detection expected to take longer than this says so, with the options that shorten it
FAST_MAX_SIDE, FAST_DET_EVERY = 320, 5  # the settings that note suggests: still finds a face filling a frame
CACHE_VERSION = 2  # boxes stored as x1, y1, x2, y2 since version 1
Detect = Callable[[np.ndarray], list]  # [B, H, W, 3] BGR frames → a box (x1, y1, x2, y2) or None each


def pad_and_clip(box: Box, pads: Sequence[int], shape: tuple[int, ...]) -> Box:
    """The original's padding of a detection: pads (top, bottom, left, right), clipped to the frame."""
    top, bottom, left, right = pads
    return Box(
        max(0, box.x1 - left), max(0, box.y1 - top), min(shape[1], box.x2 + right), min(shape[0], box.y2 + bottom)
    )


def smoothen(boxes: np.ndarray, window: int = SMOOTH_WINDOW) -> np.ndarray:
    """The original's get_smoothened_boxes, quirks included: each box becomes the integer-truncated mean
    of itself and the next window-1; the last ones average the final window, which by then already holds
    smoothed boxes (the original updates in place)."""
    out = np.array(boxes, dtype=np.int64)
    n = len(out)
    for i in range(n):
        out[i] = np.mean(out[n - window :] if i + window > n else out[i : i + window], axis=0)
    return out


def smooth_runs(boxes: list[Box | None], window: int = SMOOTH_WINDOW) -> list[Box | None]:
    """Smooth each run of consecutive frames with a face on its own; faceless frames stay None."""
    out: list[Box | None] = list(boxes)
    i = 0
    while i < len(out):
        if out[i] is None:
            i += 1
            continue
        j = i
        while j < len(out) and out[j] is not None:
            j += 1
        out[i:j] = [Box(*(int(v) for v in row)) for row in smoothen(np.array(out[i:j]), window)]
        i = j
    return out


def fill_from_last(boxes: list[Box | None]) -> list[Box | None]:
    """`no_face="last"`: a faceless frame reuses the last box seen (leading ones the first box seen)."""
    last = next((b for b in boxes if b is not None), None)
    out = []
    for b in boxes:
        last = b if b is not None else last
        out.append(last)
    return out


def interpolate(keyframes: dict[int, Box | None], n: int) -> list[Box | None]:
    """Boxes for frames 0..n-1 from boxes detected at `keyframes`, linearly between two detected keys
    (rounded to pixels); frames between a keyframe without a face and its neighbour get none (which
    `frames_near_misses` avoids by detecting them too)."""
    keys = sorted(keyframes)
    out: list[Box | None] = [None] * n
    for a, b in itertools.pairwise(keys + [keys[-1]]):
        ba, bb = keyframes[a], keyframes[b]
        out[a] = ba
        if ba is None or bb is None:
            continue
        for i in range(a + 1, b):
            t = (i - a) / (b - a)
            out[i] = Box(*(int(round(p + (q - p) * t)) for p, q in zip(ba, bb, strict=True)))
    return out


def frames_near_misses(keyframes: dict[int, Box | None]) -> list[int]:
    """Frames between two consecutive keyframes of which one has no face: where the face went (or came
    back) is unknown, so `det_every` detects each of them rather than drop their boxes."""
    keys = sorted(keyframes)
    return [
        i for a, b in itertools.pairwise(keys) if keyframes[a] is None or keyframes[b] is None for i in range(a + 1, b)
    ]


def keyframe_batches(frames: Iterable[np.ndarray], every: int, size: int) -> Iterator[list[tuple[int, np.ndarray]]]:
    """(index, frame) of every `every`-th frame and of the last one, in batches of `size` as they stream by."""
    pending: list[tuple[int, np.ndarray]] = []
    tail = None  # the latest frame that is not a keyframe, kept in case it is the last
    for i, frame in enumerate(frames):
        if i % every:
            tail = (i, frame)
            continue
        tail = None
        pending.append((i, frame))
        if len(pending) == size:
            yield pending
            pending = []
    if tail is not None:
        pending.append(tail)
    if pending:
        yield pending


Detected = list[tuple[int, Box | None]]  # a batch's raw detections: (frame index, box or None)


def detected_batches(frames: Iterable[np.ndarray], detect: Callable[[list[np.ndarray]], list], every: int,
                     size: int) -> Iterator[Detected]:  # fmt: skip
    """Raw detections on every `every`-th frame (and the last), a batch at a time as each is detected."""
    for batch in keyframe_batches(frames, every, size):
        found = detect([frame for _, frame in batch])
        yield [(i, None if b is None else Box(*b)) for (i, _), b in zip(batch, found, strict=True)]


def frames_through(batch: Detected) -> int:
    """How many frames of the video a detected batch completes (the skipped ones before it included)."""
    return batch[-1][0] + 1


def detect_keyframes(batches: Iterable[Detected]) -> tuple[dict[int, Box | None], int]:
    """Raw detections {frame index: box or None} of every batch, and the video's frame count."""
    keyframes: dict[int, Box | None] = {}
    for batch in batches:
        keyframes.update(batch)
    if not keyframes:
        raise UserError("the face video yielded no frames")
    return keyframes, max(keyframes) + 1


def announce_duration(
    batches: Iterable[Detected], total: int, opts: Options, shape: tuple[int, ...], cached: bool
) -> Iterator[Detected]:
    """`batches`, saying once, after the first (the earliest honest rate), how long detection will take when
    that is more than `LONG_DETECTION_S`, and which options shorten it."""
    start = time.perf_counter()
    for k, batch in enumerate(batches):
        if k == 0 and not opts.quiet:
            done = frames_through(batch)
            if note := duration_note(total, done, (time.perf_counter() - start) / done, opts, shape, cached):
                tqdm.write(note, file=sys.stderr)
        yield batch


def duration_note(
    total: int, done: int, per_frame: float, opts: Options, shape: tuple[int, ...], cached: bool
) -> str | None:
    """The line that says how long detecting `total` frames will take at `per_frame` seconds a frame, and
    which of --box, --det_max_side, --det_every and (unless `cached`) --cache_dir would shorten it; None for
    a short run."""
    left = (total - done) * per_frame
    if left < LONG_DETECTION_S:
        return None
    faster = ["--box TOP BOTTOM LEFT RIGHT (no detection)"]
    side = max(shape[:2])
    if side > FAST_MAX_SIDE and (opts.det_max_side is None or opts.det_max_side > FAST_MAX_SIDE):
        now = min(side, opts.det_max_side or side)
        faster.append(f"--det_max_side {FAST_MAX_SIDE} (~{(now / FAST_MAX_SIDE) ** 2:.1f}× less work a frame)")
    if opts.det_every < FAST_DET_EVERY:
        faster.append(f"--det_every {FAST_DET_EVERY} (~{FAST_DET_EVERY / opts.det_every:.0f}× fewer frames)")
    if not cached:
        faster.append("--cache_dir DIR (the next run on this video skips it)")
    return (
        f"note: face detection will take about {minutes(left + done * per_frame)} ({total} frames at "
        f"{per_frame:.2f} s each); faster: " + ", ".join(faster)
    )


def minutes(seconds: float) -> str:
    """`seconds` as a person reads a duration: "45 s", "6 min 19 s", "1 h 2 min"."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def detection_batch_size(opts: Options, source: FrameSource) -> int:
    """`face_det_batch_size`, or fewer frames when that many would not fit the memory budget (4K and up)."""
    return min(opts.face_det_batch_size, opts.frames_within_budget(int(np.prod(source.shape))))


def cache_path(cache_dir: str | Path, opts: Options, source: FrameSource, weights: Path, precision: str) -> Path:
    """Cache file (in `cache_dir`/boxes) for this video's content and every setting the raw detections
    depend on, the detector's precision included (bf16 moves a box by a fraction of a pixel)."""
    key = {
        "precision": precision,
        "version": CACHE_VERSION,
        "video": source.identity(),
        "resize_factor": opts.resize_factor, "rotate": opts.rotate, "crop": source.crop,
        "det_max_side": opts.det_max_side, "det_every": opts.det_every,
        "face_det_batch_size": detection_batch_size(opts, source), "static": source.static,
        "weights": [str(weights.resolve()), weights.stat().st_size if weights.is_file() else None],
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return Path(cache_dir) / "boxes" / f"{digest}.json"


def read_cache(path: Path) -> list[Box | None] | None:
    """The cached detections, or None when absent or unreadable (then detection runs again)."""
    try:
        boxes = json.loads(path.read_text())["boxes"]
        return [None if b is None else Box(*b) for b in boxes]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class FaceBoxes:
    """The detect + smooth stage for one detector, loaded on first use (a run with `--box` never needs it).

    `detector_factory(max_side)` builds any object with face_detection's `get_detections_for_batch`;
    `weights` (the detector's file) and `precision` (its network's, "fp32", "bf16" or "fp16") are part of
    the cache key; `cache_dir` (optional) keeps the raw detections of each video. Keeps one batch limit for
    the detector's life (halved on out-of-memory).
    """

    def __init__(
        self, detector_factory: Callable[[int | None], object], weights: Path, cache_dir: str | Path | None = None,
        quiet: bool = False, precision: str = "fp32",
    ) -> None:  # fmt: skip
        self.factory, self.weights, self.cache_dir = detector_factory, weights, cache_dir
        self.precision = precision
        self.detectors: dict[int | None, object] = {}
        self.limit = BatchLimit(1 << 30, "face detection", quiet)

    def __call__(
        self, source: FrameSource, opts: Options, n_out: int, report: Report | None = None
    ) -> list[Box | None]:
        """One box or None per frame of the video (a single box for a static face or `--box`)."""
        if opts.fixed_box:
            if not opts.quiet:
                print("Using the specified bounding box instead of face detection...", file=sys.stderr)
            return [check_region(opts.box, source.shape, "--box")]
        n_needed = 1 if source.static else n_out
        raw = self.detect(source, opts, n_needed, report)[:n_needed]
        boxes = [None if b is None else pad_and_clip(b, opts.pads, source.shape) for b in raw]
        check_boxes(boxes, raw, opts, source)
        if opts.no_face == "last":
            boxes = fill_from_last(boxes)
        return boxes if opts.nosmooth else smooth_runs(boxes)

    def detect(
        self, source: FrameSource, opts: Options, n_needed: int, report: Report | None = None
    ) -> list[Box | None]:
        """Raw detections for (at least) the first `n_needed` frames, from the cache when it has them."""
        cache = cache_path(self.cache_dir, opts, source, self.weights, self.precision) if self.cache_dir else None
        if cache is not None and (boxes := read_cache(cache)) is not None:
            if not opts.quiet:
                print(f"face boxes from the cache: {cache}", file=sys.stderr)
            return boxes
        detector = self.detector(opts.det_max_side)
        batch_size = detection_batch_size(opts, source)

        def detect(frames: list[np.ndarray]) -> list:
            run = lambda chunk: detector.get_detections_for_batch(np.stack(chunk))  # noqa: E731
            return in_chunks(run, frames, self.limit, batch_size)

        limit = None if cache is not None and not source.static else n_needed  # a cache entry: the whole video
        total = min(n for n in (limit, source.info.n_frames) if n is not None)
        batches = detected_batches(itertools.islice(source, limit), detect, opts.det_every, batch_size)
        batches = announce_duration(batches, total, opts, source.shape, cache is not None)
        keyframes, n = detect_keyframes(progress(batches, total, "detect faces", opts.quiet, report, frames_through))
        if near_misses := frames_near_misses(keyframes):
            wanted = set(near_misses)
            again = (frame for i, frame in enumerate(itertools.islice(source, n)) if i in wanted)
            again = detected_batches(again, detect, 1, batch_size)
            again = progress(again, len(near_misses), "detect faces near misses", opts.quiet, report, frames_through)
            found, _ = detect_keyframes(again)
            keyframes.update(zip(near_misses, (found[k] for k in range(len(near_misses))), strict=True))
        boxes = interpolate(keyframes, n)
        if cache is not None:
            write_text_atomic(cache, json.dumps({"boxes": boxes}))
        return boxes

    def detector(self, max_side: int | None) -> object:
        if max_side not in self.detectors:
            self.detectors[max_side] = self.factory(max_side)
        return self.detectors[max_side]


def check_boxes(boxes: list[Box | None], raw: list[Box | None], opts: Options, source: FrameSource) -> None:
    """Padded boxes must be non-empty; with `no_face="error"` every frame needs one."""
    for i, b in enumerate(boxes):
        if b is not None and (b.x2 <= b.x1 or b.y2 <= b.y1):
            raise UserError(
                f"--pads {' '.join(map(str, opts.pads))} leave an empty face box in frame {i} "
                f"(detected {tuple(raw[i])}); use smaller negative pads"
            )
    if opts.no_face == "error" and None in boxes:
        i = boxes.index(None)
        raise UserError(
            f"{source.info.path}: face not detected in frame {i} ({i / source.fps:.2f} s); ensure the video has "
            "a face in every frame, or use --no_face keep / last, or --box"
        )
