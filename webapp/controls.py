"""The page's controls, one per option: the same declaration (lipsync/options.py) as inference.py's flags.

Every per-clip option and the device options become a control named like the flag, with its default, help
and choices; `/lipsync` takes them as keyword inputs of the same names. `split_options` turns what the page
or the API sent back into the options' own types.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path

import gradio as gr

from common.errors import UserError
from lipsync.options import ModelOptions, Options
from webapp.ranges import RANGE_FIELDS

CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "checkpoints"
PAGE_ONLY = {"quiet"}  # console output: not the page's business
MODEL_FIELDS = ("device", "precision", "backend", "sr_path", "segmentation_path", "enhancer", "enhancer_path")
# the ModelOptions a job may choose (the checkpoint: its own control; the HQ weight files: webapp/hq.py's; the
# restorer: webapp/restore.py's)


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
    if f.name in RANGE_FIELDS:  # a slider at 0: from the beginning, or to the end
        return value or None
    if value is None or value == "":
        return f.default
    if base is int:
        if float(value) != int(float(value)):
            raise UserError(f"--{f.name} takes an integer, got {value}")
        return int(float(value))
    return base(value) if base in (float, bool) else value


def split_options(values: dict[str, object]) -> tuple[dict, dict]:
    """(the job's `ModelOptions` fields, per-clip options) from the keyword inputs of an event."""
    fields = page_fields()
    parsed = {k: option_value(*fields[k], v) for k, v in values.items() if k in fields}
    checkpoint = str(values.get("checkpoint_path") or "").strip()
    if not checkpoint:
        raise UserError("no checkpoint chosen: pick a .pth file from checkpoints/ or type its path")
    model = {k: parsed.pop(k) for k in MODEL_FIELDS if k in parsed} | {"checkpoint_path": checkpoint}
    return model, parsed | {"quiet": True}


def checkpoint_files(*hints: str) -> list[str]:
    """The `.pth` files in checkpoints/, those whose name holds one of `hints` first, as paths the app's
    working directory reads (relative under it, else absolute)."""
    found = sorted(CHECKPOINT_DIR.glob("*.pth"), key=lambda p: (not any(h in p.name.lower() for h in hints), p.name))
    return [os.path.relpath(p, Path.cwd()) if p.is_relative_to(Path.cwd()) else str(p) for p in found]


def checkpoint_choices(default: str | None) -> list[str]:
    """The `.pth` files in checkpoints/ (Wav2Lip's first), with the command line's choice at the top."""
    return ([default] if default else []) + [p for p in checkpoint_files("wav2lip") if p != default]


def weight_file_control(f: dataclasses.Field, empty_means: str, *hints: str) -> gr.Dropdown:
    """A weight file of an optional network: empty (`empty_means`), picked from checkpoints/ (the files named
    after `hints` first), or any path typed in."""
    return gr.Dropdown(["", *checkpoint_files(*hints)], value="", allow_custom_value=True, label=f.name,
                       info=f"{f.metadata['help']}; empty: {empty_means}", elem_id=f"opt-{f.name}")  # fmt: skip
