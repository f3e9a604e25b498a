"""The app's jobs over shared state: the networks loaded once, one workspace folder, and the page's actions
(preview, generate, the `/lipsync` API, cancel).

Models are loaded once for every job; Gradio's queue runs one generation at a time and shows the others their
place; all files live in one temporary folder (`Workspace`); bad input shows its one-line `UserError`.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

import cv2
import gradio as gr
import numpy as np

from common import video
from common.errors import UserError
from evaluation import lse, media
from evaluation.syncnet import load_syncnet
from face_detection import Box
from hparams import hparams
from lipsync.face_boxes import pad_and_clip
from lipsync.frames import FrameSource, check_region
from lipsync.options import ModelOptions, Options
from lipsync.pipeline import LipSync
from webapp.controls import split_options
from webapp.hq import with_mask
from webapp.restore import before_after

KEEP_JOBS = 8  # result folders kept in the workspace; older ones go when a new job starts
MODELS_KEPT = 2  # (checkpoint, device) pairs kept loaded, for colleagues comparing two checkpoints
STAGES = {"detect faces": "detecting faces", "lip-sync": "generating and encoding"}  # the pipeline's, for people
PROGRESS = gr.Progress()  # Gradio recognises a progress parameter by this default; it reports per event
RAW_COLOR, CROP_COLOR, MOUTH_COLOR = (0, 200, 255), (0, 255, 0), (255, 0, 255)  # BGR, drawn on the preview


class JobCancelledError(Exception):
    """Raised from the progress callback when the user presses Cancel: the pipeline then stops, writing nothing."""


class Models:
    """The networks, loaded once and shared by every job: one `LipSync` per (checkpoint, device, precision), the
    most recent `MODELS_KEPT` kept; one lock per device, so one job at a time runs on each."""

    def __init__(self, detector_path: str | None, detector: object | None, syncnet_path: str | None) -> None:
        self.detector_path, self.detector, self.syncnet_path = detector_path, detector, syncnet_path
        self.loaded: OrderedDict[tuple, LipSync] = OrderedDict()
        self.syncnets: dict[str, object] = {}
        self.loading = threading.Lock()
        self.locks: dict[str, threading.Lock] = {}

    def lipsync(self, **model: object) -> LipSync:
        """The `LipSync` of these `ModelOptions` fields (with the app's detector), loaded on first use."""
        options = ModelOptions(**model | {"detector_path": self.detector_path})
        path = Path(options.checkpoint_path).expanduser()
        stamp = path.stat().st_mtime if path.is_file() else None  # a file replaced on disk is loaded again
        key = (options, str(path.resolve()), stamp)
        with self.loading:
            if key not in self.loaded:
                self.loaded[key] = LipSync(options, detector=self.detector, quiet=True)
                while len(self.loaded) > MODELS_KEPT:
                    self.loaded.popitem(last=False)
            self.loaded.move_to_end(key)
            return self.loaded[key]

    def device_lock(self, device: object) -> threading.Lock:
        with self.loading:
            return self.locks.setdefault(str(device), threading.Lock())

    def syncnet(self, device: object) -> object | None:
        """SyncNet for LSE on `device`, when a model is configured."""
        with self.loading:
            if self.syncnet_path and str(device) not in self.syncnets:
                self.syncnets[str(device)] = load_syncnet(self.syncnet_path, device)
            return self.syncnets.get(str(device))


class Workspace:
    """One temporary folder for everything the app writes, so disk use is bounded.

    `gradio/`: Gradio's uploads and its copies of results and previews, deleted after `MAX_AGE` (Gradio's
    `delete_cache`) and when the server stops. `jobs/TIME-XXXX/`: each job's result, of which the newest
    `KEEP_JOBS` are kept. A folder the app made itself is removed when the process exits.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="wav2lip-app-"))
        self.jobs = self.root / "jobs"
        self.jobs.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def new_job(self) -> Path:
        """A new folder (named by the time, so names sort by age); the oldest go, leaving `KEEP_JOBS`."""
        with self.lock:
            folders = sorted(self.jobs.iterdir())
            for old in folders[: max(0, len(folders) - KEEP_JOBS + 1)]:
                shutil.rmtree(old, ignore_errors=True)
            return Path(tempfile.mkdtemp(prefix=f"{time.time_ns()}-", dir=self.jobs))


def draw_preview(frame: np.ndarray, raw: Box | None, crop: Box | None, shade: bool = True) -> np.ndarray:
    """The frame (RGB, for the page) with the detection, the padded crop the generator sees, and the lower
    half of that crop, which is what the generator redraws, shaded (unless the face parser's mask is drawn)."""
    image = frame.copy()
    if crop is not None:
        if shade:
            mouth = image[(crop.y1 + crop.y2) // 2 : crop.y2, crop.x1 : crop.x2]
            mouth[:] = (0.6 * mouth + 0.4 * np.array(MOUTH_COLOR)).astype(np.uint8)
        cv2.rectangle(image, (crop.x1, crop.y1), (crop.x2 - 1, crop.y2 - 1), CROP_COLOR, 2)
    if raw is not None:
        cv2.rectangle(image, (raw.x1, raw.y1), (raw.x2 - 1, raw.y2 - 1), RAW_COLOR, 1)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def nth_frame(source: FrameSource, index: int) -> tuple[int, np.ndarray]:
    """Frame `index` of the prepared frames, or the last one when the video is shorter than its estimate."""
    last = deque(zip(range(index + 1), source, strict=False), maxlen=1)
    if not last:
        raise UserError(f"{source.info.path}: the face video yielded no frames")
    return last[0]


def describe(index: int, shape: tuple[int, ...], raw: Box | None, crop: Box | None, fixed: bool) -> str:
    """The line under the preview; it warns when there is no face to lip-sync."""
    size = f"frame {index} ({shape[1]}x{shape[0]} after resize, rotate and crop)"
    if crop is None:
        return (f"Warning: no face found in {size}. Such frames are passed through unchanged (no_face); try "
                "another frame, a larger det_max_side, or set box by hand.")  # fmt: skip
    if crop.x2 <= crop.x1 or crop.y2 <= crop.y1:
        return f"Warning: the pads leave an empty box in {size}; use smaller negative pads."
    found = "box (fixed)" if fixed else f"face detected at {tuple(raw)}"
    return (f"{size}: {found}; crop {tuple(crop)} (x1, y1, x2, y2; green) is resized to 96x96, and its "
            "shaded lower half is what the generator redraws.")  # fmt: skip


@dataclass
class Result:
    video: Path
    line: str
    scores: str


class App:
    """The page's actions over shared models and one workspace."""

    def __init__(self, models: Models, workspace: Workspace) -> None:
        self.models, self.workspace = models, workspace
        self.cancel_flags: dict[str, threading.Event] = {}

    def find_face(self, face: str | None, frame_index: float, model: dict, opts: Options) -> tuple:
        """(index, frame, fps, detected box or None, padded crop or None) of the chosen frame, as the job
        would find them (`--box`, or the detector)."""
        source = FrameSource(video.probe(require(face, "face video or image")), opts, hparams.fps)
        index, frame = nth_frame(source, int(frame_index or 0))
        if opts.fixed_box:
            return index, frame, source.fps, None, check_region(opts.box, frame.shape, "--box")
        detector = self.models.lipsync(**model).face_boxes.detector(opts.det_max_side)
        found = detector.get_detections_for_batch(np.stack([frame]))[0]
        raw = None if found is None else Box(*map(int, found[:4]))
        return index, frame, source.fps, raw, None if raw is None else pad_and_clip(raw, opts.pads, frame.shape)

    def preview(self, face: str | None, frame_index: float, **options) -> tuple[np.ndarray | None, str]:
        """The chosen frame with the face box and mouth crop drawn on it, as the job would find them."""
        try:
            model, clip = split_options(options)
            opts = Options(**clip)
            index, frame, _, raw, crop = self.find_face(face, frame_index, model, opts)
            parsed = crop is not None and model.get("segmentation_path")  # the face parser's mask, drawn
            masked, mask_words = with_mask(self.models.lipsync(**model), frame, crop, opts) if parsed else (frame, "")
        except UserError as e:
            return None, f"Error: {e}"
        message = describe(index, frame.shape, raw, crop, opts.fixed_box)
        if message.startswith("Warning"):
            gr.Warning(message)
        if mask_words:  # the mask is drawn instead of the shaded half
            message = message.replace(", and its shaded lower half is what the generator redraws.", ".") + mask_words
        return draw_preview(masked, raw, crop, shade=not mask_words), message

    def compare(
        self, face: str | None, speech: str | None, frame_index: float, **options
    ) -> tuple[np.ndarray | None, str]:
        """The chosen frame lip-synced without and with the enhancer, side by side (webapp/restore.py)."""
        try:
            model, clip = split_options(options)
            opts = Options(**clip)
            index, frame, fps, _, crop = self.find_face(face, frame_index, model, opts)
            if crop is None:
                return None, f"Warning: no face found in frame {index}: nothing to restore"
            sync = self.models.lipsync(**model)
            with self.models.device_lock(sync.device):
                return before_after(sync, frame, crop, require(speech, "speech audio"), fps, index, opts)
        except UserError as e:
            return None, f"Error: {e}"

    def run(self, face: str | None, speech: str | None, options: dict, session: str, progress: gr.Progress) -> Result:
        """One job: the pipeline into a new job folder, reporting to `progress`, stopped by the session's Cancel."""
        face, speech = require(face, "face video or image"), require(speech, "speech audio")
        model, clip = split_options(options)
        Options(**clip)  # every value checked before a model is loaded
        sync = self.models.lipsync(**model)
        cancel = self.cancel_flags[session] = threading.Event()

        def on_progress(stage: str, done: int, total: int | None) -> None:
            if cancel.is_set():
                raise JobCancelledError
            label = "encoding: closing the file" if stage == "lip-sync" and done == total else STAGES.get(stage, stage)
            progress((done, total), desc=f"{label}: {done}/{total or '?'} frames", unit="frames")

        try:
            progress(0, desc="waiting for the device")
            with self.models.device_lock(sync.device):
                out = self.workspace.new_job() / "result.mp4"
                summary = sync(face, speech, out, on_progress=on_progress, **clip)
                progress(1, desc="scoring lip sync (SyncNet)")
                scores = self.scores(sync.device, face, speech, out)
        finally:
            if self.cancel_flags.get(session) is cancel:
                del self.cancel_flags[session]
        return Result(out, summary.line().split("; wrote ")[0], scores)  # the server's path is no use here

    def scores(self, device: object, face: str, speech: str, result: Path) -> str:
        """A table of LSE-D / LSE-C for the result and the input, when a SyncNet model is configured."""
        model = self.models.syncnet(device)
        if model is None:
            return ""
        rows = [("result", lambda: lse.evaluate_video(model, result))]
        info = video.probe(face)
        if info.has_audio:
            rows.append(("input video, its own audio", lambda: lse.evaluate_video(model, face)))
        elif not info.is_image:
            rows.append(("input frames, this speech", lambda: lse.evaluate_clip(
                model, media.read_frames(face), media.read_audio(speech), name=face)))  # fmt: skip
        lines = ["| SyncNet (whole frame, LRS protocol) | LSE-D (lower: better) | LSE-C (higher: better) |",
                 "| --- | --- | --- |"]  # fmt: skip
        for name, score in rows:
            try:
                r = score()
                lines.append(f"| {name} | {r.lse_d:.3f} | {r.lse_c:.3f} |")
            except UserError as e:
                lines.append(f"| {name} | {str(e).replace('|', '/')} | |")
        return "\n".join(lines)

    def generate(self, face: str | None, speech: str | None, request: gr.Request, progress: gr.Progress = PROGRESS,
                 **options) -> tuple:  # fmt: skip
        """The Generate button: the result, its download, and a line, or the one-line error, in the page."""
        hidden = gr.DownloadButton(visible=False)
        try:
            result = self.run(face, speech, options, request.session_hash, progress)
        except UserError as e:
            return None, hidden, f"Error: {e}", ""
        except JobCancelledError:
            return None, hidden, "Cancelled: the job stopped and wrote no file.", ""
        download = gr.DownloadButton("Download the result", value=str(result.video), visible=True)
        return str(result.video), download, result.line, result.scores

    def lipsync(self, face: str | None, audio: str | None, request: gr.Request, progress: gr.Progress = PROGRESS,
                **options) -> str:  # fmt: skip
        """`/lipsync`: face file, audio file and the options named like the flags → the result video file."""
        try:
            return str(self.run(face, audio, options, request.session_hash, progress).video)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except JobCancelledError:
            raise gr.Error("cancelled", print_exception=False) from None

    def cancel(self, request: gr.Request) -> str:
        """Stop this tab's running job at its next frame (Gradio itself drops a job still in the queue)."""
        if flag := self.cancel_flags.get(request.session_hash):
            flag.set()
        return "Cancelled: the job stopped and wrote no file."

    def frame_slider(self, face: str | None) -> gr.Slider:
        """The preview's frame slider, reaching the last frame of a newly chosen face input."""
        try:
            count = video.probe(face).n_frames if face else 1
        except UserError:
            count = 1
        return gr.Slider(minimum=0, maximum=max(1, count - 1), value=0, step=1)


def require(path: str | None, what: str) -> str:
    """The path of an input the user must give, or the line telling them to give it."""
    if not path:
        raise UserError(f"no {what}: upload one (or record it)")
    return str(path)
