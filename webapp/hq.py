"""The page's Wav2Lip-HQ controls: the two weight files (typed or picked from checkpoints/), how the mask
blends and what it lets through, and the preview of that mask over the chosen frame.

The controls are the options of the same names (lipsync/options.py: `sr_path` and `segmentation_path` are
loaded once with the generator, `hq_mode` and `mask_region` are per clip); `/lipsync` takes them as keyword
inputs like every other option.
"""

from __future__ import annotations

import gradio as gr
import numpy as np

from face_detection import Box
from lipsync.face_masks import mask_preview
from lipsync.options import Options
from webapp.controls import control, page_fields, weight_file_control

HQ_MODEL_FIELDS = ("sr_path", "segmentation_path")  # weight files: loaded once per (checkpoint, files) pair
HQ_FIELDS = (*HQ_MODEL_FIELDS, "hq_mode", "mask_region")  # shown here, not among the Advanced options
WEIGHT_HINTS = {"sr_path": "esrgan", "segmentation_path": "segment"}  # a file of checkpoints/ offered first


def hq_controls() -> dict[str, gr.components.Component]:
    """The four controls, keyed by option name: the two files on one row, the two choices below."""
    fields = page_fields()
    with gr.Row():
        controls = {name: weight_file_control(fields[name][0], "off", WEIGHT_HINTS[name]) for name in HQ_MODEL_FIELDS}
    with gr.Row():
        controls |= {name: control(*fields[name]) for name in HQ_FIELDS if name not in HQ_MODEL_FIELDS}
    return controls


def with_mask(sync, frame: np.ndarray, crop: Box, opts: Options) -> tuple[np.ndarray, str]:
    """`frame` with the pixels the generated face will take tinted (as strongly as it takes them), and the
    words for the preview's line; the frame unchanged without a face parser."""
    if sync.enhance.parser is None:
        return frame, ""
    labels = sync.enhance.parser([frame], [crop])[0]
    tinted = mask_preview(frame, crop, labels, opts.hq_mode, opts.mask_region)
    return tinted, (f" Cyan: where the generated face goes (face parser, mask_region {opts.mask_region}, "
                    f"hq_mode {opts.hq_mode}).")  # fmt: skip
