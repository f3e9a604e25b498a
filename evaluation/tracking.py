"""syncnet_python's `run_pipeline.py` for real videos, in memory: shots, faces, tracks, 224x224 crops.

The original re-encodes the video at 25 fps, detects faces on every frame at a quarter of the size,
splits it into shots (PySceneDetect's ContentDetector), links detections of a shot into tracks by IoU,
fills the gaps, median-smooths the box size and centre, and crops a square around the mouth-centred box.
Each track is then scored with LSE on its crops and the matching slice of the audio.

Differences from the original, all deliberate:
- Frames stay in memory (two decoding passes: one for boxes and shot cuts, one for crops); the original's
  lossy intermediate files (MPEG-4 `video.avi` at qscale 2, JPEG frames at qscale 2, XVID crop videos)
  are skipped. The crops still go through the default JPEG round trip of the LSE step, as `evaluate()`
  extracts them that way.
- Faces come from syncnet_python's own S3FD when its `sfd_face.pth` is given (every face above 0.9, as the
  original; see `face_detection/detection/sfd/sfd_face.py`), and from our Wav2Lip S3FD otherwise, which
  returns the best face of each frame, so with several people in a shot only the best face is tracked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np
import torch
from scipy import signal

import face_detection
from common import video
from common.errors import UserError
from evaluation import lse, media
from face_detection import Box
from face_detection.detection.sfd import sfd_face

# BGR batch [N, H, W, 3] -> faces per frame, each a Box or a plain (x1, y1, x2, y2)
Detector = Callable[[np.ndarray], list[Sequence[Box]]]

FACEDET_SCALE = 0.25  # frames are shrunk by this before face detection
CROP_SCALE = 0.40  # the crop extends the box by this fraction of its size
MIN_TRACK = 100  # a track needs more than this many detections
NUM_FAILED_DET = 25  # frames a track may go without a detection
MIN_FACE_SIZE = 100  # pixels, mean box width or height over the track
IOU_THRESHOLD = 0.5  # between consecutive detections of one track
SMOOTH_KERNEL = 13  # scipy.signal.medfilt kernel on box size and centre
PAD_VALUE = 110  # grey that fills crops reaching outside the frame
SCENE_THRESHOLD = 30.0  # ContentDetector's default threshold on the mean HSV change
SCENE_MIN_LEN = 15  # ContentDetector's default minimum shot length in frames
# PySceneDetect 0.5's automatic downscale (`set_downscale_factor()`): factor by minimum frame width.
SCENE_DOWNSCALE = ((3200, 12), (2100, 8), (1700, 6), (1200, 5), (900, 4), (600, 3), (400, 2))
DETECT_BATCH = 16  # frames per face-detector call


@dataclass(frozen=True)
class Face:
    frame: int
    bbox: Box  # in full-frame pixels, as floats once scaled back from the shrunk detection frame


@dataclass
class Track:
    frames: np.ndarray  # consecutive frame indices [T]
    bboxes: np.ndarray  # interpolated boxes [T, 4]


@dataclass(frozen=True)
class CropPath:
    """Smoothed crop geometry of a track: half box size and centre per frame."""

    frames: np.ndarray
    s: np.ndarray
    x: np.ndarray
    y: np.ndarray


# ---------------------------------------------------------------- frames at syncnet_python's 25 fps


def retimed_frames(path: str | os.PathLike, fps: int = media.FPS) -> Iterator[np.ndarray]:
    """BGR frames at a constant `fps`, like `ffmpeg -r 25`: each frame lands on its nearest output tick
    and fills the ticks up to the next frame's; a frame landing on a tick already taken is dropped."""
    src_fps = video.probe(path).fps
    prev, prev_tick, next_tick = None, -1, 0
    for i, (frame, orientation) in enumerate(video.with_orientation(media.decode_frames(path))):
        t = Fraction(frame.time).limit_denominator(1 << 20) if frame.time is not None else i / src_fps
        tick = round(t * fps)
        if tick <= prev_tick:
            continue
        while prev is not None and next_tick < tick:
            yield prev
            next_tick += 1
        prev, prev_tick = orientation.apply(frame.to_ndarray(format="bgr24")), tick  # as ffmpeg autorotates
    while prev is not None and next_tick <= prev_tick:
        yield prev
        next_tick += 1


# ---------------------------------------------------------------- shot cuts


def scene_downscale(width: int) -> int:
    return next((f for w, f in SCENE_DOWNSCALE if width >= w), 1)


def hsv_change(prev_hsv: np.ndarray, hsv: np.ndarray) -> float:
    """ContentDetector's score: the mean absolute change of H, S and V, averaged over the channels."""
    d = np.abs(hsv.astype(np.int32) - prev_hsv.astype(np.int32))
    return float(d.reshape(-1, 3).mean(0).sum() / 3.0)


class ContentDetector:
    """A shot cut where the HSV change reaches `threshold` at least `min_len` frames after the last cut.

    Our own equivalent of PySceneDetect's ContentDetector (threshold 30, min_scene_len 15) on frames
    subsampled by its automatic downscale factor, so run_pipeline's shots come out the same.
    """

    def __init__(self, threshold: float = SCENE_THRESHOLD, min_len: int = SCENE_MIN_LEN):
        self.threshold, self.min_len = threshold, min_len
        self.prev_hsv: np.ndarray | None = None
        self.last_cut: int | None = None
        self.cuts: list[int] = []

    def __call__(self, index: int, frame_bgr: np.ndarray) -> None:
        f = scene_downscale(frame_bgr.shape[1])
        hsv = cv2.cvtColor(np.ascontiguousarray(frame_bgr[::f, ::f]), cv2.COLOR_BGR2HSV)
        changed = self.prev_hsv is not None and hsv_change(self.prev_hsv, hsv) >= self.threshold
        if changed and (self.last_cut is None or index - self.last_cut >= self.min_len):
            self.cuts.append(index)
            self.last_cut = index
        self.prev_hsv = hsv


def scenes_from_cuts(cuts: Sequence[int], n_frames: int) -> list[tuple[int, int]]:
    """[start, end) of each shot; the whole video when there is no cut."""
    edges = [0, *cuts, n_frames]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


# ---------------------------------------------------------------- faces


def face_alignment_detector(
    device: str | None = None, path_to_detector: str | None = None, dtype: torch.dtype = torch.float32
) -> Detector:
    """Our S3FD behind the `Detector` interface (best face per frame)."""
    if path_to_detector is not None:
        check_detector_file(path_to_detector)
    fa = face_detection.FaceAlignment(
        face_detection.LandmarksType._2D, flip_input=False, device=device, path_to_detector=path_to_detector,
        dtype=dtype,
    )  # fmt: skip

    def detect(frames: np.ndarray) -> list[Sequence[Box]]:
        return [[] if box is None else [box] for box in fa.get_detections_for_batch(frames)]

    return detect


def check_detector_file(path: str) -> None:
    """Refuse syncnet_python's `sfd_face.pth` for our S3FD: it is another layout (see `load_detector`)."""
    if sfd_face.is_sfd_face(sfd_face.read_weights(path)):
        raise UserError(
            f"{path}: this is syncnet_python's own S3FD (sfd_face.pth), which face_detection's S3FD cannot load; "
            "load it with evaluation.tracking.load_detector (what --facedet_model does)"
        )


def sfd_face_detector(
    weights: Mapping, device: str | torch.device = "cpu", name: str = "sfd_face.pth", dtype: torch.dtype = torch.float32
) -> Detector:
    """syncnet_python's S3FD behind the `Detector` interface: every face scoring above 0.9."""
    net = sfd_face.build_net(weights, device, name, dtype)

    def detect(frames: np.ndarray) -> list[Sequence[Box]]:
        rgb = torch.from_numpy(np.ascontiguousarray(frames[..., ::-1])).to(device)
        return [[Box(*map(float, d[:4])) for d in dets] for dets in sfd_face.detect_faces(net, rgb)]

    return detect


def load_detector(
    path: str | None = None, device: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Detector, str]:
    """The detector of `--facedet_model` and a line saying which it is: syncnet_python's S3FD for its
    `sfd_face.pth` (told by its keys), our S3FD for Wav2Lip's `s3fd.pth` or when no file is given; its
    trunk in `dtype` (the run's --precision)."""
    device = device or "cpu"
    if path is None:
        detector = face_alignment_detector(device, dtype=dtype)
        return detector, "our S3FD (face_detection, Wav2Lip's s3fd.pth), best face per frame"
    weights = sfd_face.read_weights(path)
    if sfd_face.is_sfd_face(weights):
        detector = sfd_face_detector(weights, device, path, dtype)
        return detector, f"syncnet_python's S3FD ({path}), every face above 0.9"
    return face_alignment_detector(device, path, dtype), f"our S3FD (face_detection, {path}), best face per frame"


def detect_faces(frames: np.ndarray, detector: Detector, scale: float, start: int) -> list[list[Face]]:
    """Faces of a batch of full-size frames, detected at `scale` and mapped back to full size.

    As syncnet_python, boxes go back by full size / detected size per axis (cv2 rounds the shrunk size).
    """
    small = np.stack([cv2.resize(f, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR) for f in frames])
    sx, sy = frames.shape[2] / small.shape[2], frames.shape[1] / small.shape[1]
    return [
        [Face(start + i, Box(x1 * sx, y1 * sy, x2 * sx, y2 * sy)) for x1, y1, x2, y2 in boxes]
        for i, boxes in enumerate(detector(small))
    ]


# ---------------------------------------------------------------- tracks


def iou(a: Box, b: Box) -> float:
    """Intersection over union as syncnet_python computes it (continuous coordinates)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _grow_track(shot: list[list[Face]], num_failed_det: int) -> list[Face]:
    """One pass over the shot: take the first free face, then each face overlapping the track's last
    one within `num_failed_det` frames (one per frame); taken faces leave the pool."""
    track: list[Face] = []
    for faces in shot:
        for face in faces:
            if track and face.frame - track[-1].frame > num_failed_det:
                break
            if not track or iou(face.bbox, track[-1].bbox) > IOU_THRESHOLD:
                track.append(face)
                faces.remove(face)
                break
    return track


def track_shot(
    shot_faces: Sequence[Sequence[Face]],
    num_failed_det: int = NUM_FAILED_DET,
    min_track: int = MIN_TRACK,
    min_face_size: float = MIN_FACE_SIZE,
) -> list[Track]:
    """syncnet_python's `track_shot`: grow tracks until no face is left, keep the long and large ones,
    with boxes linearly interpolated over the frames a detection missed."""
    pool = [list(faces) for faces in shot_faces]
    tracks = []
    while track := _grow_track(pool, num_failed_det):
        if len(track) <= min_track:
            continue
        known = np.array([f.frame for f in track])
        boxes = np.array([f.bbox for f in track], dtype=np.float64)
        frames = np.arange(known[0], known[-1] + 1)
        filled = np.stack([np.interp(frames, known, boxes[:, j]) for j in range(4)], 1)
        size = max(np.mean(filled[:, 2] - filled[:, 0]), np.mean(filled[:, 3] - filled[:, 1]))
        if size > min_face_size:
            tracks.append(Track(frames, filled))
    return tracks


def smooth_track(track: Track) -> CropPath:
    """Half the larger box side and the box centre, each median-filtered (zero-padded at the ends)."""
    b = track.bboxes
    s = np.maximum(b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]) / 2
    y, x = (b[:, 1] + b[:, 3]) / 2, (b[:, 0] + b[:, 2]) / 2
    k = SMOOTH_KERNEL
    return CropPath(track.frames, signal.medfilt(s, k), signal.medfilt(x, k), signal.medfilt(y, k))


def crop_face(image: np.ndarray, s: float, x: float, y: float, crop_scale: float = CROP_SCALE) -> np.ndarray:
    """The original's crop: a window of the frame padded by `int(s(1+2cs))` grey pixels on each side,
    from `s` above the centre to `s(1+2cs)` below and `s(1+cs)` to each side, resized to 224x224."""
    h, w = image.shape[:2]
    pad = int(s * (1 + 2 * crop_scale))
    my, mx = y + pad, x + pad  # centre in padded coordinates
    r0, r1 = int(my - s), int(my + s * (1 + 2 * crop_scale))
    c0, c1 = int(mx - s * (1 + crop_scale)), int(mx + s * (1 + crop_scale))
    # Slicing the padded frame: clip to its extent, fill what lies outside the image with grey.
    r0, r1 = max(r0, 0), min(r1, h + 2 * pad)
    c0, c1 = max(c0, 0), min(c1, w + 2 * pad)
    out = np.full((max(r1 - r0, 0), max(c1 - c0, 0), 3), PAD_VALUE, np.uint8)
    ir0, ir1, ic0, ic1 = max(r0 - pad, 0), min(r1 - pad, h), max(c0 - pad, 0), min(c1 - pad, w)
    if ir1 > ir0 and ic1 > ic0:
        out[ir0 + pad - r0 : ir1 + pad - r0, ic0 + pad - c0 : ic1 + pad - c0] = image[ir0:ir1, ic0:ic1]
    if out.size == 0:
        raise UserError("face crop is empty: the tracked box lies outside the frame")
    return cv2.resize(out, (lse.FRAME_SIZE, lse.FRAME_SIZE))


# ---------------------------------------------------------------- the pipeline


@dataclass
class TrackClip:
    """One face track ready for LSE: its crops at `media.FPS` and the audio of the same frames."""

    index: int
    frames: np.ndarray  # frame indices in the video retimed to `media.FPS`
    crops: np.ndarray  # BGR uint8 [T, 224, 224, 3]
    audio: np.ndarray  # int16 at 16 kHz


@dataclass(frozen=True)
class PipelineOptions:
    facedet_scale: float = FACEDET_SCALE
    crop_scale: float = CROP_SCALE
    min_track: int = MIN_TRACK
    num_failed_det: int = NUM_FAILED_DET
    min_face_size: float = MIN_FACE_SIZE
    scene_threshold: float = SCENE_THRESHOLD


def find_tracks(
    path: str | os.PathLike, detector: Detector, opts: PipelineOptions = PipelineOptions()
) -> tuple[list[Track], int]:
    """First pass: faces and shot cuts of every 25 fps frame, then tracks per long-enough shot."""
    cut = ContentDetector(opts.scene_threshold)
    faces: list[list[Face]] = []
    batch: list[np.ndarray] = []
    n = 0
    for frame in retimed_frames(path):
        cut(n, frame)
        batch.append(frame)
        n += 1
        if len(batch) == DETECT_BATCH:
            faces += detect_faces(np.stack(batch), detector, opts.facedet_scale, n - len(batch))
            batch = []
    if batch:
        faces += detect_faces(np.stack(batch), detector, opts.facedet_scale, n - len(batch))
    tracks = []
    for start, end in scenes_from_cuts(cut.cuts, n):
        if end - start >= opts.min_track:
            tracks += track_shot(faces[start:end], opts.num_failed_det, opts.min_track, opts.min_face_size)
    return tracks, n


def crop_tracks(
    path: str | os.PathLike, tracks: Sequence[Track], audio: np.ndarray, crop_scale: float = CROP_SCALE
) -> list[TrackClip]:
    """Second pass: each track's crops, and its audio from frame start/25 s to (end+1)/25 s."""
    paths = [smooth_track(t) for t in tracks]
    crops: list[list[np.ndarray]] = [[] for _ in tracks]
    for n, frame in enumerate(retimed_frames(path)):
        for k, p in enumerate(paths):
            i = n - int(p.frames[0])
            if 0 <= i < len(p.frames):
                crops[k].append(crop_face(frame, p.s[i], p.x[i], p.y[i], crop_scale))
    per_frame = lse.SAMPLES_PER_FRAME
    clips = []
    for k, p in enumerate(paths):
        a = audio[int(p.frames[0]) * per_frame : (int(p.frames[-1]) + 1) * per_frame]
        clips.append(TrackClip(k, p.frames, np.stack(crops[k]), a))
    return clips


def jpeg_round_trip(frames_bgr: np.ndarray, fps: int = media.FPS) -> np.ndarray:
    """What `evaluate()` sees of a crop video: each frame through FFmpeg's JPEG (default rate control)."""
    import av

    jpeg = media.JpegRoundTrip(Fraction(fps))
    return np.stack(
        [jpeg(av.VideoFrame.from_ndarray(f, format="bgr24").reformat(format="yuv420p")) for f in frames_bgr]
    )


def score_real_video(
    model,
    path: str | os.PathLike,
    detector: Detector,
    opts: PipelineOptions = PipelineOptions(),
    vshift: int = lse.DEFAULT_VSHIFT,
    batch_size: int = lse.DEFAULT_BATCH_SIZE,
    lossless: bool = False,
) -> list[tuple[TrackClip, lse.LSEResult]]:
    """LSE of every face track of a real video; an empty list when no track is long enough."""
    audio = media.read_audio(path)
    tracks, _ = find_tracks(path, detector, opts)
    results = []
    for clip in crop_tracks(path, tracks, audio, opts.crop_scale):
        frames = clip.crops if lossless else jpeg_round_trip(clip.crops)
        name = f"{os.fspath(path)} (track {clip.index})"
        results.append((clip, lse.evaluate_clip(model, frames, clip.audio, vshift, batch_size, name)))
    return results
