"""The enhance stage, between generate and paste: optional networks over each generated face, and the face
parser whose mask the paste stage blends through (Wav2Lip-HQ and its successors).

    generate (96×96, pred·255 unrounded) → super-resolve (ESRGAN, optional) → restore (optional)
        → paste: resized to the box, then the mask blend (the parse of the SOURCE crop) or feather

- **Steps** (`Step`) run in order on the generated faces of a batch, on the generation workers, right after
  the generator: `Enhanced` is the forward pass followed by the steps, called like it, so whoever calls the
  generator (the offline batches, a live stream) gets enhanced faces. The first step receives the
  prediction before any rounding (float32, 0-255, BGR), later ones the previous step's uint8 faces; each
  also gets every face's SOURCE frame and box (None where the caller has none: a live session's shared
  generator), for a step that looks around the face, and the clip's options (`fidelity_weight`,
  `sharpen_amount`; None: the defaults); it returns uint8 BGR faces of any size. Each step is
  loaded once, runs in chunks of its own size with its own out-of-memory limit, in the run's dtype, in
  PyTorch or ONNX Runtime (`--backend`). With no step, the prediction is truncated to uint8: the original.
  The restoration step (GFPGAN, CodeFormer, sharpen: restore.py) goes after super-resolution.
- **The parser** (`face_parsing.FaceParser`) reads the source crop of each face and fills `Batch.parses`,
  also on the workers (cached by the crop's content). The paste stage then calls a
  `face_masks.MaskedPaste` per face with that parse.

`bytes_per_frame` is what a frame in flight holds besides its decoded frame (the enhanced face, the
parse), so batches stay within `--memory_budget` at any size (`generation.Generator.plan`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from common.errors import UserError
from face_detection import Box
from lipsync.crops import Batch
from lipsync.face_masks import PARSE_SIZE, MaskedPaste
from lipsync.face_parsing import FaceParser, load_face_parser
from lipsync.options import ModelOptions, Options
from lipsync.restore import load_restore
from lipsync.super_resolution import FORK_SCALE, load_super_resolution

Scaled = Callable[[np.ndarray, np.ndarray], np.ndarray]  # crops, mels → float32 pred·255 faces, unrounded
Sources = Sequence[np.ndarray] | None  # each face's source frame (uint8 BGR, not yet pasted), or None


class Step(Protocol):
    """One optional network over the generated faces (super-resolution, restoration). A step may also declare
    `work_bytes`: the bytes each face holds inside it while it runs, besides its output (`bytes_per_frame`)."""

    name: str

    def __call__(
        self, faces: np.ndarray, frames: Sources, boxes: Sequence[Box] | None, opts: Options | None = None
    ) -> np.ndarray:
        """(n, h, w, 3) BGR faces (float32 0-255 from the generator, or uint8), with each face's source
        frame and box when known, and the clip's options (None: the defaults) → (n, h', w', 3) uint8."""
        ...

    def out_size(self, size: int) -> int:
        """The side of its output faces for input faces of side `size`."""
        ...


def truncate(faces: np.ndarray) -> np.ndarray:
    """The original's store: float pred·255 → uint8 toward zero (`astype(np.uint8)`)."""
    return faces.astype(np.uint8)


@dataclass(frozen=True)
class Enhance:
    """The enhance stage of one `LipSync`: its steps in order and its face parser, each loaded once."""

    steps: tuple[Step, ...] = ()
    parser: FaceParser | None = None

    def __bool__(self) -> bool:
        return bool(self.steps) or self.parser is not None

    def faces(self, scaled: np.ndarray, frames: Sources = None, boxes: Sequence[Box] | None = None,
              opts: Options | None = None) -> np.ndarray:  # fmt: skip
        """Every step over the generator's float faces in order; uint8 faces out."""
        faces = scaled
        for step in self.steps:
            faces = step(faces, frames, boxes, opts)
        return truncate(faces) if faces.dtype != np.uint8 else faces

    def parse_batch(self, batch: Batch) -> None:
        """Fill `batch.parses` (the parse of each face's source crop) unless it came with them (a live avatar
        parses its frames once)."""
        if self.parser is not None and batch.parses is None:
            batch.parses = self.parser(batch.frames, batch.boxes)

    def names(self) -> list[str]:
        """What runs besides the generator, for reports (realtime's figures and /health)."""
        steps = [f"{step.name} ×{step.scale}" if hasattr(step, "scale") else step.name for step in self.steps]
        return steps + (["face parser"] if self.parser is not None else [])

    def bytes_per_frame(self, img_size: int) -> int:
        """Bytes a frame in flight holds besides its decoded frame: its float prediction, each step's face and
        working tensors (`work_bytes`, where a step declares them) and its parse (a ×4 face: 442 kB; a
        parse: 262 kB; a restorer's 512×512 tensors: 7.9 MB). A step holds its working tensors only for the
        faces of the chunk it runs, so counting them for every frame in flight is an upper bound: it shrinks
        the batches, which costs nothing next to a restorer's seconds per face."""
        total, size = img_size * img_size * 3 * 4, img_size
        for step in self.steps:
            size = step.out_size(size)
            total += size * size * 3 + getattr(step, "work_bytes", 0)
        return total + (PARSE_SIZE * PARSE_SIZE if self.parser is not None else 0)

    def paster(self, opts: Options, feather: np.ndarray | None) -> MaskedPaste | None:
        """The paste stage's per-face function for `opts`, or None for the original paste (no HQ network)."""
        self.check(opts)
        return MaskedPaste(opts.hq_mode, opts.mask_region, feather) if self else None

    def check(self, opts: Options) -> None:
        """Clip options that contradict the loaded networks, as one-line errors."""
        if self.parser is not None and opts.blend == "feather":
            raise UserError("--blend feather and --segmentation_path both choose how the face is blended: drop "
                            "one (--hq_mode soft feathers the parser's mask)")  # fmt: skip
        scale = next((s.scale for s in self.steps if hasattr(s, "scale")), FORK_SCALE)
        if opts.hq_mode == "fork" and scale != FORK_SCALE:
            raise UserError(f"--sr_path is a ×{scale} ESRGAN; --hq_mode fork (the default) reproduces Wav2Lip-HQ, "
                            "whose ESRGAN is ×4 (esrgan_yunying.pth, RealESRGAN_x4plus.pth); use --hq_mode soft "
                            "for ×2 and ×1 models")  # fmt: skip


class Enhanced:
    """The generator's forward pass followed by the enhance steps: the generate stage's `predict`, called
    as the forward pass is, `(crops, mels) → uint8 faces`, or with the faces' source frames and boxes."""

    def __init__(self, scaled: Scaled, enhance: Enhance) -> None:
        self.scaled, self.enhance = scaled, enhance

    def __call__(self, crops: np.ndarray, mels: np.ndarray, frames: Sources = None,
                 boxes: Sequence[Box] | None = None, opts: Options | None = None) -> np.ndarray:  # fmt: skip
        return self.enhance.faces(self.scaled(crops, mels), frames, boxes, opts)


def load_enhance(model: ModelOptions, device: torch.device, dtype: torch.dtype, threads: int,
                 quiet: bool = False) -> Enhance:  # fmt: skip
    """The steps and parser that `model` asks for (`sr_path`, `segmentation_path`), loaded once; `threads`
    per ONNX Runtime run (the generation workers' share of the cores)."""
    steps: list[Step] = []
    if model.sr_path is not None:
        steps.append(load_super_resolution(model, device, dtype, threads, quiet))
    if model.enhancer != "none":  # restoration (GFPGAN | CodeFormer | sharpen), after super-resolution
        steps.append(load_restore(model, device, dtype, threads, quiet))
    parser = load_face_parser(model, device, dtype, threads, quiet) if model.segmentation_path is not None else None
    return Enhance(tuple(steps), parser)
