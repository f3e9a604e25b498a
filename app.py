"""The web app: a Gradio page over the same pipeline as inference.py, for a GPU box shared with colleagues.

    python app.py [--checkpoint_path CK] [--detector_path S3FD] [--syncnet_model M] [--host H] [--port P] [--share]

What the command line cannot show: a preview of the face box and of the mouth region the generator redraws
(to tune --pads, --crop and --box by eye), progress through the stages, Cancel, and the result's LSE-D / LSE-C
next to the input's. The Advanced controls come from the one declaration of options (options.py), as
inference.py's flags do; `/lipsync` takes them as keyword inputs named like the flags (for `gradio_client`).
Models are loaded once for every job; Gradio's queue runs one generation at a time and shows the others their
place; all files live in one temporary folder (`Workspace`); bad input shows its one-line `UserError`.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import shutil
import signal
import tempfile
import threading
import time
import types
import typing
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

import cv2
import gradio as gr
import numpy as np

import video
from errors import UserError, run_cli
from evaluation import lse, media
from evaluation.syncnet import load_syncnet
from face_boxes import pad_and_clip
from face_detection import Box
from frames import FrameSource, check_region
from hparams import hparams
from lipsync import LipSync
from options import ModelOptions, Options, add_arguments

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
SYNCNET_DEFAULT = CHECKPOINT_DIR / "syncnet_v2.model"  # used when present and --syncnet_model is not given
KEEP_JOBS = 8  # result folders kept in the workspace; older ones go when a new job starts
MAX_AGE = 3600  # seconds Gradio keeps its copies of uploads and results (checked every MAX_AGE / 6)
MAX_UPLOAD = "200mb"  # the largest upload Gradio accepts
MODELS_KEPT = 2  # (checkpoint, device) pairs kept loaded, for colleagues comparing two checkpoints
PAGE_ONLY = {"quiet", "cache_dir"}  # console output and a server-side folder: not the page's business
MODEL_FIELDS = ("device", "fp16", "backend")  # the ModelOptions a job may choose (the checkpoint: its own control)
STAGES = {"detect faces": "detecting faces", "lip-sync": "generating and encoding"}  # the pipeline's, for people
PROGRESS = gr.Progress()  # Gradio recognises a progress parameter by this default; it reports per event
RAW_COLOR, CROP_COLOR, MOUTH_COLOR = (0, 200, 255), (0, 255, 0), (255, 0, 255)  # BGR, drawn on the preview


class JobCancelledError(Exception):
    """Raised from the progress callback when the user presses Cancel: the pipeline then stops, writing nothing."""


# ---------------------------------------------------------------- the options, from options.py


def page_fields() -> dict[str, tuple[dataclasses.Field, object]]:
    """The options the page and the API take: every per-clip option, and the device ones, with type hints."""
    hints = typing.get_type_hints(Options) | typing.get_type_hints(ModelOptions)
    fields = [f for f in dataclasses.fields(Options) if f.name not in PAGE_ONLY]
    fields += [f for f in dataclasses.fields(ModelOptions) if f.name in MODEL_FIELDS]
    return {f.name: (f, hints[f.name]) for f in fields}


def base_type(hint: object) -> object:
    """`int` for `int | None`: what a control holds when it holds anything."""
    if isinstance(hint, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def control(f: dataclasses.Field, hint: object) -> gr.components.Component:
    """The control of one option, its label the flag's name, its default, help and choices the declared ones."""
    base, info, choices = base_type(hint), f.metadata["help"], f.metadata["choices"]
    common = {"label": f.name, "info": info, "elem_id": f"opt-{f.name}"}
    if base is bool:
        return gr.Checkbox(value=f.default, **common)
    if choices:
        return gr.Dropdown(list(choices), value=f.default, **common)
    if typing.get_origin(base) is tuple:  # the CLI's syntax, as one string: "0 10 0 0"
        return gr.Textbox(" ".join(map(str, f.default)), **common)
    if base in (int, float) and f.default is not None:
        return gr.Number(f.default, precision=0 if base is int else None, **common)
    return gr.Textbox("" if f.default is None else str(f.default), placeholder="default", **common)  # empty: None


def parse_numbers(name: str, value: object) -> tuple[int, ...]:
    """`"130 480 140 440"` (or with commas) as the CLI reads `--box 130 480 140 440`."""
    text = " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value or "")
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise UserError(f'--{name} {text!r}: expected integers separated by spaces, e.g. "0 10 0 0"') from None


def option_value(f: dataclasses.Field, hint: object, value: object) -> object:
    """A value from the page or the API as the field wants it; an empty control means the declared default."""
    base = base_type(hint)
    if typing.get_origin(base) is tuple:
        return parse_numbers(f.name, value)
    if value is None or value == "":
        return f.default
    if base is int:
        if float(value) != int(float(value)):
            raise UserError(f"--{f.name} takes an integer, got {value}")
        return int(float(value))
    return base(value) if base in (float, bool) else value


def split_options(values: dict[str, object]) -> tuple[str, dict, dict]:
    """(checkpoint path, device options, per-clip options) from the keyword inputs of an event."""
    fields = page_fields()
    parsed = {k: option_value(*fields[k], v) for k, v in values.items() if k in fields}
    checkpoint = str(values.get("checkpoint_path") or "").strip()
    if not checkpoint:
        raise UserError("no checkpoint chosen: pick a .pth file from checkpoints/ or type its path")
    model = {k: parsed.pop(k) for k in MODEL_FIELDS if k in parsed}
    return checkpoint, model, parsed | {"quiet": True}


def checkpoint_choices(default: str | None) -> list[str]:
    """The `.pth` files in checkpoints/ (Wav2Lip's first), with the command line's choice at the top."""
    found = sorted(CHECKPOINT_DIR.glob("*.pth"), key=lambda p: ("wav2lip" not in p.name, p.name))
    paths = [os.path.relpath(p, Path.cwd()) if p.is_relative_to(Path.cwd()) else str(p) for p in found]
    return ([default] if default else []) + [p for p in paths if p != default]


# ---------------------------------------------------------------- shared state: models and files


class Models:
    """The networks, loaded once and shared by every job: one `LipSync` per (checkpoint, device, fp16), the
    most recent `MODELS_KEPT` kept; one lock per device, so one job at a time runs on each."""

    def __init__(self, detector_path: str | None, detector: object | None, syncnet_path: str | None) -> None:
        self.detector_path, self.detector, self.syncnet_path = detector_path, detector, syncnet_path
        self.loaded: OrderedDict[tuple, LipSync] = OrderedDict()
        self.syncnets: dict[str, object] = {}
        self.loading = threading.Lock()
        self.locks: dict[str, threading.Lock] = {}

    def lipsync(self, checkpoint: str, device: str = "auto", fp16: bool = False, backend: str = "torch") -> LipSync:
        path = Path(checkpoint).expanduser()
        stamp = path.stat().st_mtime if path.is_file() else None  # a file replaced on disk is loaded again
        key = (str(path.resolve()), stamp, device, fp16, backend)
        with self.loading:
            if key not in self.loaded:
                self.loaded[key] = LipSync(path, device, fp16=fp16, detector_path=self.detector_path,
                                           detector=self.detector, quiet=True, backend=backend)  # fmt: skip
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


def draw_preview(frame: np.ndarray, raw: Box | None, crop: Box | None) -> np.ndarray:
    """The frame (RGB, for the page) with the detection, the padded crop the generator sees, and the lower
    half of that crop, which is what the generator redraws, shaded."""
    image = frame.copy()
    if crop is not None:
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

    def preview(self, face: str | None, frame_index: float, **options) -> tuple[np.ndarray | None, str]:
        """The chosen frame with the face box and mouth crop drawn on it, as the job would find them."""
        try:
            checkpoint, model, clip = split_options(options)
            opts = Options(**clip)
            source = FrameSource(video.probe(require(face, "face video or image")), opts, hparams.fps)
            index, frame = nth_frame(source, int(frame_index or 0))
            raw = None
            if opts.fixed_box:
                crop = check_region(opts.box, frame.shape, "--box")
            else:
                detector = self.models.lipsync(checkpoint, **model).face_boxes.detector(opts.det_max_side)
                found = detector.get_detections_for_batch(np.stack([frame]))[0]
                raw = None if found is None else Box(*map(int, found[:4]))
                crop = None if raw is None else pad_and_clip(raw, opts.pads, frame.shape)
        except UserError as e:
            return None, f"Error: {e}"
        message = describe(index, frame.shape, raw, crop, opts.fixed_box)
        if message.startswith("Warning"):
            gr.Warning(message)
        return draw_preview(frame, raw, crop), message

    def run(self, face: str | None, speech: str | None, options: dict, session: str, progress: gr.Progress) -> Result:
        """One job: the pipeline into a new job folder, reporting to `progress`, stopped by the session's Cancel."""
        face, speech = require(face, "face video or image"), require(speech, "speech audio")
        checkpoint, model, clip = split_options(options)
        Options(**clip)  # every value checked before a model is loaded
        sync = self.models.lipsync(checkpoint, **model)
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


# ---------------------------------------------------------------- the page


def inputs_column(checkpoint_path: str | None) -> tuple[gr.File, gr.Audio, dict[str, gr.components.Component]]:
    """Face, speech, and the options (checkpoint, then Advanced) keyed by the name the API gives each."""
    face = gr.File(label="Face: a video or an image", elem_id="face", file_count="single")
    webcam = gr.Video(sources=["webcam"], label="... or record the face", include_audio=True,
                      webcam_options=gr.WebcamOptions(mirror=False), elem_id="webcam")  # fmt: skip
    webcam.change(lambda path: path, inputs=webcam, outputs=face, api_visibility="private")
    audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Speech", elem_id="audio")
    choices = checkpoint_choices(checkpoint_path)
    checkpoint = gr.Dropdown(choices, value=choices[0] if choices else None, allow_custom_value=True,
                             label="checkpoint_path", info=ModelOptions.__dataclass_fields__["checkpoint_path"]
                             .metadata["help"] + "; pick one from checkpoints/ or type a path",
                             elem_id="opt-checkpoint_path")  # fmt: skip
    options = {"checkpoint_path": checkpoint}
    with gr.Accordion("Advanced", open=False):
        fields = list(page_fields().values())
        for start in range(0, len(fields), 3):
            with gr.Row():
                options |= {f.name: control(f, hint) for f, hint in fields[start : start + 3]}
    return face, audio, options


def layout(app: App, checkpoint_path: str | None) -> None:
    """The page: inputs on the left; preview, progress, result and scores on the right; then the events."""
    gr.Markdown("# Wav2Lip\nA face video (or image) and speech in; the face lip-synced to the speech out.")
    with gr.Row():
        with gr.Column():
            face, audio, options = inputs_column(checkpoint_path)
        with gr.Column():
            frame = gr.Slider(0, 1, value=0, step=1, label="Preview frame", elem_id="frame")
            preview_button = gr.Button("Preview", elem_id="preview-button")
            preview = gr.Image(label="Preview: face box and mouth crop", interactive=False, elem_id="preview")
            preview_line = gr.Textbox(label="Preview", interactive=False, elem_id="preview-line")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
            result = gr.Video(label="Result", interactive=False, elem_id="result")
            download = gr.DownloadButton("Download the result", visible=False, elem_id="download")
            status = gr.Textbox(label="Status", interactive=False, elem_id="status")
            scores = gr.Markdown(elem_id="scores")
    face.change(app.frame_slider, inputs=face, outputs=frame, api_visibility="private")
    preview_button.click(app.preview, inputs=[face, frame], inputs_kwargs=options, outputs=[preview, preview_line],
                         api_visibility="private", concurrency_id="preview", concurrency_limit=1)  # fmt: skip
    job = generate.click(app.generate, inputs=[face, audio], inputs_kwargs=options,
                         outputs=[result, download, status, scores], api_visibility="private",
                         concurrency_id="generate", concurrency_limit=1)  # fmt: skip
    cancel.click(app.cancel, outputs=status, cancels=[job], queue=False, api_visibility="private")
    api_file = gr.File(visible=False)
    gr.Button(visible=False).click(app.lipsync, inputs=[face, audio], inputs_kwargs=options, outputs=api_file,
                                   api_name="lipsync", concurrency_id="generate", concurrency_limit=1)  # fmt: skip


def build_app(checkpoint_path: str | None = None, detector_path: str | None = None, syncnet_model: str | None = None,
              *, detector: object | None = None, work_dir: str | Path | None = None) -> gr.Blocks:  # fmt: skip
    """The page, not yet launched. `detector`: any object with `get_detections_for_batch`, instead of S3FD
    (tests inject one). Points Gradio's temporary folder (process-wide) into the workspace."""
    workspace = Workspace(work_dir)
    os.environ["GRADIO_TEMP_DIR"] = str(workspace.root / "gradio")
    if work_dir is None:
        atexit.register(shutil.rmtree, workspace.root, ignore_errors=True)
    app = App(Models(detector_path, detector, syncnet_model), workspace)
    with gr.Blocks(title="Wav2Lip", delete_cache=(MAX_AGE // 6, MAX_AGE)) as demo:
        layout(app, checkpoint_path)
    demo.queue(default_concurrency_limit=1)
    return demo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Wav2Lip in the browser: preview, progress, queue, LSE scores")
    add_arguments(p, ModelOptions, only=("checkpoint_path", "detector_path"))
    p.add_argument("--syncnet_model", default=str(SYNCNET_DEFAULT) if SYNCNET_DEFAULT.is_file() else None,
                   help="syncnet_v2.model: show each result's LSE-D / LSE-C next to its input's")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C: the server closes, files go
    demo = build_app(args.checkpoint_path, args.detector_path, args.syncnet_model)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD)


if __name__ == "__main__":
    run_cli(main)
