"""The page's time ranges: sliders for `start`/`end` (the face video) and `audio_start`/`audio_end` (the speech),
sized to each input when it is chosen, and a preview of the first frame of the face's range.

The sliders are the options of the same names (lipsync/options.py; `/lipsync` takes them as keyword inputs):
0 on a start slider means from the beginning, 0 on an end slider to the end (`controls.option_value`).
"""

from __future__ import annotations

import gradio as gr
import numpy as np

import audio
from common import video
from common.errors import UserError
from common.time_ranges import TimeRange, format_time
from lipsync.options import Options

RANGE_FIELDS = ("start", "end", "audio_start", "audio_end")  # shown here, not among the Advanced options
STEP_S = 0.04  # the sliders' step: a frame at 25 fps
LABELS = {
    "start": "Face video from (s)", "end": "… to (s; 0: its end)",
    "audio_start": "Speech from (s)", "audio_end": "… to (s; 0: its end)",
}  # fmt: skip


def range_controls() -> dict[str, gr.Slider]:
    """The four sliders, keyed by option name (0 to 1 s until an input is chosen)."""
    info = {name: Options.__dataclass_fields__[name].metadata["help"] for name in RANGE_FIELDS}
    return {name: gr.Slider(0, 1, value=0, step=STEP_S, label=LABELS[name], info=info[name], elem_id=f"opt-{name}")
            for name in RANGE_FIELDS}  # fmt: skip


def slider_pair(duration: float | None) -> tuple[gr.Slider, gr.Slider]:
    """A start and an end slider reaching `duration` (a still image, or none: both off)."""
    top = max(STEP_S, round(duration or 0, 2))
    return (gr.Slider(maximum=top, value=0, interactive=bool(duration)),
            gr.Slider(maximum=top, value=0, interactive=bool(duration)))  # fmt: skip


def face_sliders(face: str | None) -> tuple[gr.Slider, gr.Slider]:
    """`start`/`end` for a newly chosen face input."""
    try:
        info = video.probe(face) if face else None
    except UserError:
        info = None
    return slider_pair(None if info is None or info.is_image else info.duration)


def speech_sliders(speech: str | None) -> tuple[gr.Slider, gr.Slider]:
    """`audio_start`/`audio_end` for newly chosen speech."""
    try:
        duration = audio.media_duration(speech) if speech else None
    except UserError:
        duration = None
    return slider_pair(duration)


def range_preview(face: str | None, start: float | None, end: float | None) -> tuple[np.ndarray | None, str]:
    """The first frame of the face's range (RGB), as the run will use it, and a line saying which it is."""
    if not face:
        return None, "Choose a face video to see its range."
    try:
        info = video.probe(face)
        span = TimeRange.of(start or None, end or None, ("--start", "--end"))
        if span.is_set:
            span.check(info.path, info.duration, info.fps, 1 / (2 * info.fps))
        frame = next(video.iter_frames(face, fps=None if info.is_image else info.fps, span=span), None)
        if frame is None:
            raise span.empty_error(info.path, info.duration, "frames")
    except UserError as e:
        return None, f"Error: {e}"
    first = span.first(info.fps)
    where = "the image" if info.is_image else f"frame {first} at {format_time(first / info.fps)}"
    return frame[..., ::-1].copy(), f"First frame of the range: {where} of {format_time(info.duration)}."


def wire(face: gr.File, speech: gr.Audio, sliders: dict[str, gr.Slider], image: gr.Image, line: gr.Textbox) -> None:
    """The events: sliders resized to a new input; the preview redrawn when the face or its range changes."""
    pair = [sliders["start"], sliders["end"]]
    face.change(face_sliders, inputs=face, outputs=pair, api_visibility="private").then(
        range_preview, inputs=[face, *pair], outputs=[image, line], api_visibility="private"
    )
    speech.change(speech_sliders, inputs=speech, outputs=[sliders["audio_start"], sliders["audio_end"]],
                  api_visibility="private")  # fmt: skip
    for slider in pair:
        slider.release(range_preview, inputs=[face, *pair], outputs=[image, line], api_visibility="private")
