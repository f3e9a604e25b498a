"""The page: inputs, Advanced options, preview, progress, result and scores, and the events between them.

What the command line cannot show: a preview of the face box and of the mouth region the generator redraws
(to tune --pads, --crop and --box by eye), progress through the stages, Cancel, and the result's LSE-D / LSE-C
next to the input's.
"""

from __future__ import annotations

import atexit
import os
import shutil
from pathlib import Path

import gradio as gr

from lipsync.options import ModelOptions
from webapp.controls import checkpoint_choices, control, page_fields
from webapp.hq import HQ_FIELDS, hq_controls
from webapp.jobs import App, Models, Workspace
from webapp.ranges import RANGE_FIELDS, range_controls, wire
from webapp.restore import RESTORE_FIELDS, compare_controls, restore_controls

MAX_AGE = 3600  # seconds Gradio keeps its copies of uploads and results (checked every MAX_AGE / 6)


def inputs_column(checkpoint_path: str | None) -> tuple[gr.File, gr.Audio, dict[str, gr.components.Component]]:
    """Face, speech, and the options (checkpoint, then Advanced) keyed by the name the API gives each."""
    face = gr.File(label="Face: a video or an image", elem_id="face", file_count="single")
    webcam = gr.Video(sources=["webcam"], label="... or record the face", include_audio=True,
                      webcam_options=gr.WebcamOptions(mirror=False), elem_id="webcam")  # fmt: skip
    webcam.change(lambda path: path, inputs=webcam, outputs=face, api_visibility="private")
    audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Speech", elem_id="audio")
    with gr.Accordion("Time ranges", open=False):
        sliders = range_controls()
        with gr.Row():
            range_image = gr.Image(label="First frame of the range", interactive=False, height=200,
                                   elem_id="range-preview")  # fmt: skip
            range_line = gr.Textbox(label="Range", interactive=False, elem_id="range-line")
    wire(face, audio, sliders, range_image, range_line)
    choices = checkpoint_choices(checkpoint_path)
    checkpoint = gr.Dropdown(choices, value=choices[0] if choices else None, allow_custom_value=True,
                             label="checkpoint_path", info=ModelOptions.__dataclass_fields__["checkpoint_path"]
                             .metadata["help"] + "; pick one from checkpoints/ or type a path",
                             elem_id="opt-checkpoint_path")  # fmt: skip
    options = {"checkpoint_path": checkpoint, **sliders}
    with gr.Accordion("Wav2Lip-HQ: a sharper mouth, no box (ESRGAN, face parser)", open=False, elem_id="hq"):
        options |= hq_controls()
    with gr.Accordion("Restoration: GFPGAN, CodeFormer or sharpen, after lip-sync", open=False, elem_id="restore"):
        options |= restore_controls()
    with gr.Accordion("Advanced", open=False):
        shown_apart = RANGE_FIELDS + HQ_FIELDS + RESTORE_FIELDS
        fields = [(f, hint) for f, hint in page_fields().values() if f.name not in shown_apart]
        for start in range(0, len(fields), 3):
            with gr.Row():
                options |= {f.name: control(f, hint) for f, hint in fields[start : start + 3]}
    return face, audio, {"checkpoint_path": checkpoint} | {name: options[name] for name in page_fields()}  # API order


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
            compare_button, compare, compare_line = compare_controls()
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
    compare_button.click(app.compare, inputs=[face, audio, frame], inputs_kwargs=options, outputs=[compare, compare_line],
                         api_visibility="private", concurrency_id="generate", concurrency_limit=1)  # fmt: skip
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
