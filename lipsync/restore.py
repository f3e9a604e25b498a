"""The restore step of the enhance stage: each generated face through GFPGAN or CodeFormer (or an unsharp
mask), before it is pasted; only the face's box changes.

**Alignment.** Both restorers were trained on faces aligned to FFHQ's 512×512 template by five landmarks
(their scripts find them with RetinaFace, through facexlib). We have S3FD's padded box instead, and the
generated face inside it, so the face reaches the restorer through a square window around the box, in the
frame's own geometry (the 96×96 face is the box squashed square; the window is not):

- the window's side is `CONTEXT` × the box's longer side and its centre `LIFT` box heights above the box's,
  which puts an S3FD box (brows to chin, cheek to cheek) where the template's face is: in the 512 px
  template the eyes lie at y = 240, the mouth at y = 371 and such a box spans about 130-382 × 175-452;
- the window is cut from the source frame (mirrored where it leaves the frame, as FFHQ's crops are padded)
  with the generated face resized into the box, then resized to 512×512 and restored;
- the box is cut back out of the restored window at the restorer's own resolution (`FACE_SIZE`, 277 px
  across the box's longer side, squashed square as the generated faces are) and replaces the generated
  face through weights that fall to 0 at the box's edge (`seam_weights`): the edge keeps the generated
  face's pixels, so the paste stage meets the frame exactly as without a restorer (its `--blend feather`
  or face-parsing mask apply unchanged), and no second seam appears between the restored face and the
  rest of the box. A face that the paste will shrink into a smaller box is band-limited to that box here
  (`fit_to_box`), so a bilinear paste does not alias the restored detail.

Without landmarks, a face turned or tilted away from the template is restored in the pose the box gives.
A caller without frames (a live session's shared generator) gets the generated face restored in a window
of its own mirrored pixels.

**Sharpen.** `--enhancer sharpen` is an unsharp mask on the generated face at its own resolution (sigma 1
px per 96 px, where Wav2Lip's blur is), faded to nothing at the face's edge as the restorers are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from common.devices import BatchLimit, in_chunks
from common.errors import UserError
from face_detection import Box
from lipsync.options import ModelOptions, Options
from lipsync.restorers import FLAG, SIZE, Restore, TorchRestorer

CONTEXT = 1.85  # the window's side over the box's longer side: 512 / 277, the template's box height
LIFT = 0.2  # the window's centre above the box's, in box heights: (313 - 256) / 277 in the template
FACE_SIZE = round(SIZE / CONTEXT)  # 277: the restorer's pixels across the box's longer side; the step's output
SEAM_FRACTION = 10  # the restored face fades into the generated one over 1/10 of the box's shorter side
SHARPEN_SIGMA = 1.0 / 96  # the unsharp mask's Gaussian sigma, per pixel of the generated face's side
WINDOW_BYTES = SIZE * SIZE * 3 * (1 + 4 + 4 + 1)  # a face's 512×512 tensors: window, float32 in and out, restored
CPU_CHUNK, GPU_CHUNK = 1, 8  # faces per restorer call: a face's activations take ~0.5 GB in fp32, ~0.2 in bf16
CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
DEFAULT_FILES = {"gfpgan": "GFPGANv1.4.pth", "codeformer": "codeformer.pth"}  # in checkpoints/ (README)


def restore_window(box: Box) -> tuple[int, int, int]:
    """(x, y, side) of the square window the restorer sees, in frame pixels (it may leave the frame)."""
    side = max(SIZE // 8, round(CONTEXT * max(box.width, box.height)))
    cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2 - LIFT * box.height
    return round(cx - side / 2), round(cy - side / 2), side


def cut_window(frame: np.ndarray, x: int, y: int, side: int) -> np.ndarray:
    """The frame's pixels in the square window at (x, y), mirrored beyond the frame's edges (a copy)."""
    height, width = frame.shape[:2]
    top, left = max(0, -y), max(0, -x)
    bottom, right = max(0, y + side - height), max(0, x + side - width)
    inside = frame[max(0, y) : min(height, y + side), max(0, x) : min(width, x + side)]
    if not (top or left or bottom or right):
        return inside.copy()
    return cv2.copyMakeBorder(inside, top, bottom, left, right, cv2.BORDER_REFLECT_101)


def resized(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """`image` at width × height: area-averaged when shrinking (no aliasing), bilinear when enlarging."""
    shrink = width < image.shape[1] and height < image.shape[0]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def as_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 as it is; the generator's float pred·255 truncated, as the original stores it."""
    return image if image.dtype == np.uint8 else np.clip(image, 0, 255).astype(np.uint8)


def window_crop(frame: np.ndarray, box: Box, face: np.ndarray) -> np.ndarray:
    """(512, 512, 3) uint8: the restorer's input, the window around `box` with `face` resized into the box."""
    x, y, side = restore_window(box)
    window = cut_window(frame, x, y, side)
    window[box.y1 - y : box.y2 - y, box.x1 - x : box.x2 - x] = resized(as_uint8(face), box.width, box.height)
    return resized(window, SIZE, SIZE)


def box_in_window(restored: np.ndarray, box: Box) -> np.ndarray:
    """(FACE_SIZE, FACE_SIZE, 3): the box's part of a restored 512×512 window, sampled straight from it
    (pixel centres mapped, bilinear), squashed square as the generated faces are."""
    x, y, side = restore_window(box)
    scale = SIZE / side
    sx, sy = box.width * scale / FACE_SIZE, box.height * scale / FACE_SIZE  # window pixels per output pixel
    to_window = np.float32([[sx, 0, (box.x1 - x) * scale + 0.5 * sx - 0.5],
                            [0, sy, (box.y1 - y) * scale + 0.5 * sy - 0.5]])  # fmt: skip
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(restored, to_window, (FACE_SIZE, FACE_SIZE), flags=flags, borderMode=cv2.BORDER_REPLICATE)


def seam_weights(height: int, width: int) -> np.ndarray:
    """(height, width) float32: 1 inside, falling smoothly to exactly 0 at the edge (a Gaussian over a
    rectangle inset by `margin`), so a restored face meets the generated one without a seam."""
    margin = max(2, min(height, width) // SEAM_FRACTION)
    hard = np.zeros((height, width), np.float32)
    hard[margin : height - margin, margin : width - margin] = 1.0
    kernel = 2 * margin - 1  # its reach, margin - 1, stops short of the rectangle from the edge: exactly 0 there
    return cv2.GaussianBlur(hard, (kernel, kernel), sigmaX=margin / 3, borderType=cv2.BORDER_CONSTANT)


def fit_to_box(face: np.ndarray, box: Box) -> np.ndarray:
    """`face` band-limited to the box it will be pasted into: area-shrunk to the box and enlarged back
    (bicubic), when the box is smaller (a bilinear paste would otherwise alias its finest detail); as it is
    otherwise. A bilinear shrink of the result lands within 1.6 levels of an area shrink of `face` (10.2
    without this; 5.3 with a bilinear enlargement)."""
    if box.width >= face.shape[1] and box.height >= face.shape[0]:
        return face
    small = resized(face, min(box.width, face.shape[1]), min(box.height, face.shape[0]))
    return cv2.resize(small, face.shape[1::-1], interpolation=cv2.INTER_CUBIC)


def restored_face(restored: np.ndarray, box: Box, face: np.ndarray) -> np.ndarray:
    """(FACE_SIZE, FACE_SIZE, 3) uint8: the box cut from the restored window, faded into `face` (the
    generated face) at its edge by `seam_weights`, band-limited to the box."""
    generated = resized(as_uint8(face), FACE_SIZE, FACE_SIZE).astype(np.float32)
    weight = seam_weights(FACE_SIZE, FACE_SIZE)[..., None]
    out = np.rint(generated + (box_in_window(restored, box).astype(np.float32) - generated) * weight)
    return fit_to_box(out.astype(np.uint8), box)


def sharpen(face: np.ndarray, amount: float) -> np.ndarray:
    """An unsharp mask: face + amount·(face - blurred face), faded to 0 at the edge, stored in uint8 as
    the original stores the generator's faces (truncated), so that amount 0 changes nothing."""
    x = face.astype(np.float32)
    blurred = cv2.GaussianBlur(x, (0, 0), sigmaX=SHARPEN_SIGMA * face.shape[0], borderType=cv2.BORDER_REFLECT_101)
    detail = (x - blurred) * seam_weights(*face.shape[:2])[..., None]
    return np.clip(x + amount * detail, 0, 255).astype(np.uint8)


class RestoreStep:
    """The step (`enhance.Step`): GFPGAN or CodeFormer (`restore`, batched in chunks) through the window
    around each face's box, or the unsharp mask; the clip's `fidelity_weight` and `sharpen_amount`."""

    def __init__(self, kind: str, restore: Restore | None, chunk_size: int, quiet: bool = False) -> None:
        self.kind, self.restore, self.chunk_size = kind, restore, chunk_size
        self.work_bytes = 0 if restore is None else WINDOW_BYTES  # per face, for `--memory_budget`
        self.name = kind if kind == "sharpen" else f"restore ({kind})"
        self.limit = BatchLimit(1 << 30, f"the {kind} restorer", quiet)

    def out_size(self, size: int) -> int:
        return size if self.restore is None else FACE_SIZE

    def __call__(self, faces: np.ndarray, frames: Sequence[np.ndarray] | None = None,
                 boxes: Sequence[Box] | None = None, opts: Options | None = None) -> np.ndarray:  # fmt: skip
        """(n, s, s, 3) faces (uint8, or the generator's float32) → (n, out_size(s), out_size(s), 3) uint8."""
        opts = opts or Options()
        if self.restore is None:
            return np.stack([sharpen(face, opts.sharpen_amount) for face in faces]) if len(faces) else as_uint8(faces)
        if not len(faces):
            return np.zeros((0, FACE_SIZE, FACE_SIZE, 3), np.uint8)
        if frames is None or boxes is None:  # no frame around the face: it is its own (mirrored) context
            frames, boxes = [as_uint8(f) for f in faces], [Box(0, 0, f.shape[1], f.shape[0]) for f in faces]
        items = list(zip(faces, frames, boxes, strict=True))

        def run(chunk: list[tuple[np.ndarray, np.ndarray, Box]]) -> list[np.ndarray]:
            crops = np.stack([window_crop(frame, box, face) for face, frame, box in chunk])
            restored = self.restore(crops, opts.fidelity_weight)
            return [restored_face(r, box, face) for r, (face, _, box) in zip(restored, chunk, strict=True)]

        return np.stack(in_chunks(run, items, self.limit, self.chunk_size))


def restorer_weights(model: ModelOptions) -> Path:
    """`--enhancer_path`, or the released file's name in checkpoints/."""
    return Path(model.enhancer_path) if model.enhancer_path else CHECKPOINTS / DEFAULT_FILES[model.enhancer]


def load_restore(model: ModelOptions, device: torch.device, dtype: torch.dtype, threads: int,
                 quiet: bool = False) -> RestoreStep:  # fmt: skip
    """The restore step of `model` (`enhancer`, `enhancer_path`, `backend`, `cache_dir`), loaded once;
    `threads` per ONNX Runtime run. A one-line `UserError` for a missing or wrong weight file."""
    if model.enhancer == "sharpen":
        if model.enhancer_path or model.enhancer_onnx_path:
            raise UserError("--enhancer sharpen takes no weights: drop --enhancer_path / --enhancer_onnx_path")
        return RestoreStep("sharpen", None, 1, quiet)
    weights = restorer_weights(model)
    if model.backend == "onnxruntime":
        from common.onnx_export import onnx_file
        from lipsync.onnx_models import SPECS, OnnxRestorer

        path = onnx_file(SPECS[model.enhancer], model.enhancer_onnx_path, weights, model.cache_dir, quiet, FLAG)
        forward: Restore = OnnxRestorer(model.enhancer, path, device, threads)
    else:
        forward = TorchRestorer(model.enhancer, weights, device, dtype)
    return RestoreStep(model.enhancer, forward, GPU_CHUNK if device.type == "cuda" else CPU_CHUNK, quiet)
