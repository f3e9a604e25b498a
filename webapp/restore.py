"""The page's restoration controls: the enhancer (GFPGAN, CodeFormer, sharpen) and its weights, CodeFormer's
fidelity slider, the unsharp mask's amount, and a before/after picture of the chosen frame.

The controls are the options of the same names (lipsync/options.py: `enhancer` and `enhancer_path` are
loaded once with the generator, `fidelity_weight` and `sharpen_amount` are per clip); `/lipsync` takes them
as keyword inputs like every other option. The picture runs the generator once on the preview frame, with
the frame's own mel window, and pastes its face without and with the restore step, side by side.
"""

from __future__ import annotations

import time

import cv2
import gradio as gr
import numpy as np

import audio
from common.errors import UserError
from face_detection import Box
from lipsync.crops import crop_faces, feather_mask
from lipsync.enhance import Enhance
from lipsync.options import Options
from lipsync.restore import RestoreStep, restore_window
from webapp.controls import control, page_fields, weight_file_control

RESTORE_MODEL_FIELDS = ("enhancer", "enhancer_path")  # loaded once per (checkpoint, enhancer, file)
RESTORE_FIELDS = (*RESTORE_MODEL_FIELDS, "fidelity_weight", "sharpen_amount")  # shown here, not in Advanced
SHOWN_HEIGHT = 320  # the before/after picture is enlarged to at least this height, so a small face shows


def restore_controls() -> dict[str, gr.components.Component]:
    """The four controls, keyed by option name: the enhancer and its file, then its two strengths."""
    fields = page_fields()
    f = fields["enhancer_path"][0]
    with gr.Row():
        controls = {"enhancer": control(*fields["enhancer"])}
        controls["enhancer_path"] = weight_file_control(f, "that default", "gfpgan", "codeformer")
    with gr.Row():
        f = fields["fidelity_weight"][0]
        controls["fidelity_weight"] = gr.Slider(0, 1, value=f.default, step=0.05, label=f.name, elem_id=f"opt-{f.name}",
                                                info=f.metadata["help"])  # fmt: skip
        controls["sharpen_amount"] = control(*fields["sharpen_amount"])
    return controls


def compare_controls() -> tuple[gr.Button, gr.Image, gr.Textbox]:
    """The button, the picture and its line, for the page's right column."""
    button = gr.Button("Before / after the enhancer", elem_id="compare-button")
    image = gr.Image(label="Before (left) and after (right) the enhancer, on the preview frame", interactive=False,
                     elem_id="compare")  # fmt: skip
    return button, image, gr.Textbox(label="Before / after", interactive=False, elem_id="compare-line")


def before_after(sync, frame: np.ndarray, box: Box, speech: str, fps: float, index: int,
                 opts: Options) -> tuple[np.ndarray, str]:  # fmt: skip
    """(RGB picture, line): frame `index` lip-synced to its mel window of `speech`, pasted as the job pastes
    it, without and with the restore step (any super-resolution in both), around the face's window."""
    steps = sync.enhance.steps
    at = next((i for i, step in enumerate(steps) if isinstance(step, RestoreStep)), None)
    if at is None:
        raise UserError("choose an enhancer (gfpgan, codeformer or sharpen) to see its before and after")
    windows = audio.load_speech(speech, fps, sync.hp, opts.audio_range)
    mel = audio.mel_windows(windows.mel, [windows.starts[min(index, len(windows.starts) - 1)]])
    scaled = sync.generator.predict.scaled(crop_faces([frame], [box], sync.hp.img_size), mel)
    labels = sync.enhance.parser([frame], [box])[0] if sync.enhance.parser is not None else None
    paster = sync.enhance.paster(opts, feather_mask(sync.hp.img_size) if opts.blend == "feather" else None)
    pictures, started = [], 0.0
    for upto in (at, at + 1):
        started = time.perf_counter()
        face = Enhance(steps[:upto]).faces(scaled, [frame], [box], opts)[0]
        pasted = frame.copy()
        paster(pasted, box, face, labels)
        pictures.append(around(pasted, box))
    seconds = time.perf_counter() - started
    picture = np.concatenate([pictures[0], np.full((pictures[0].shape[0], 4, 3), 255, np.uint8), pictures[1]], 1)
    how = {"sharpen": f"sharpen_amount {opts.sharpen_amount}", "codeformer": f"fidelity_weight {opts.fidelity_weight}"}
    words = how.get(steps[at].kind, "")
    return cv2.cvtColor(picture, cv2.COLOR_BGR2RGB), (
        f"frame {index}: before (left) and after (right) {steps[at].name}{', ' + words if words else ''}; "
        f"the face took {seconds:.1f} s with it on {sync.device}"
    )


def around(frame: np.ndarray, box: Box) -> np.ndarray:
    """The restorer's window around `box`, within the frame, enlarged to SHOWN_HEIGHT if smaller."""
    x, y, side = restore_window(box)
    part = frame[max(0, y) : y + side, max(0, x) : x + side]
    scale = max(1.0, SHOWN_HEIGHT / part.shape[0])
    return cv2.resize(part, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST) if scale > 1 else part
