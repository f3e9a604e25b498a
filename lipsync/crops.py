"""The crop and paste stages: the face box of a frame to the generator's square crop, and back.

Both are the original's: the box is cut out and resized to `img_size`² (cv2's default INTER_LINEAR); the
generated face is resized back to the box and pasted over it. `feather` is our opt-in alternative to
the hard paste: it blends only the lower half of the face, fading to the frame at the crop's edges.
A `Batch` is what travels from the crop stage through generation to the paste stage: consecutive output
frames with their boxes, crops and mel windows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from face_detection import Box

FEATHER_FRACTION = 12  # feather margin = img_size / 12 (8 px of the 96×96 face)
Paster = Callable[[np.ndarray, Box, np.ndarray, "np.ndarray | None"], None]  # (frame, box, face, parse), in place


@dataclass
class Batch:
    """Consecutive output frames; those with a face carry a crop and a mel window for the generator."""

    frames: list[np.ndarray]
    boxes: list[Box | None]
    faces: np.ndarray  # (n_with_face, S, S, 3) uint8
    mel_starts: list[int]
    generated: np.ndarray | None = None  # (n_with_face, S', S', 3) uint8 (S' = S, or larger once enhanced)
    parses: list[np.ndarray] | None = None  # per face: the 512×512 parse of its source crop (enhance stage)


def crop_faces(frames: Sequence[np.ndarray], boxes: Sequence[Box | None], img_size: int) -> np.ndarray:
    """(n, S, S, 3) uint8 crops of the frames that have a box, in order."""
    crops = [cv2.resize(f[b.y1 : b.y2, b.x1 : b.x2], (img_size, img_size))
             for f, b in zip(frames, boxes, strict=True) if b is not None]  # fmt: skip
    return np.stack(crops) if crops else np.zeros((0, img_size, img_size, 3), np.uint8)


def make_batches(
    items: Iterable[tuple[np.ndarray, Box | None, int]], img_size: int, sizes: Iterable[int]
) -> Iterator[Batch]:
    """The crop stage: (frame, box, mel start) grouped into batches of `sizes`, each face cropped."""
    iterator = iter(items)
    for size in sizes:
        if not (chunk := tuple(itertools.islice(iterator, size))):
            return
        frames, boxes, starts = zip(*chunk, strict=True)
        face_starts = [s for b, s in zip(boxes, starts, strict=True) if b is not None]
        yield Batch(list(frames), list(boxes), crop_faces(frames, boxes, img_size), face_starts)


def feather_mask(img_size: int) -> np.ndarray:
    """(S, S) float32 weights of the generated face: 1 over the lower face, fading to exactly 0 at the
    crop's edges and above its middle (a Gaussian of radius `margin` over a rectangle inset by it)."""
    margin = max(1, img_size // FEATHER_FRACTION)
    hard = np.zeros((img_size, img_size), np.float32)
    hard[img_size // 2 + margin : img_size - margin, margin : img_size - margin] = 1.0
    kernel = 2 * margin + 1
    return cv2.GaussianBlur(hard, (kernel, kernel), sigmaX=margin / 4, borderType=cv2.BORDER_CONSTANT)


def paste(frame: np.ndarray, box: Box, face: np.ndarray, mask: np.ndarray | None) -> None:
    """Put a generated face back into its box in place, resized as the original; blended by `mask` if given."""
    patch = cv2.resize(face, (box.width, box.height))
    if mask is None:
        frame[box.y1 : box.y2, box.x1 : box.x2] = patch
        return
    weight = cv2.resize(mask, (box.width, box.height))[..., None]
    region = frame[box.y1 : box.y2, box.x1 : box.x2].astype(np.float32)
    frame[box.y1 : box.y2, box.x1 : box.x2] = np.rint(region + (patch.astype(np.float32) - region) * weight).astype(
        np.uint8
    )


def paste_batches(
    batches: Iterable[Batch], mask: np.ndarray | None, shared_frames: bool, paster: Paster | None = None
) -> Iterator[tuple[np.ndarray, bool]]:
    """The paste stage: each generated face back into its frame; yields (frame, had a face) in order.

    Pastes in place, or into a copy made here, one frame at a time, when the frames are `shared` (a
    static face's one frame, yielded for every output frame). `paster(frame, box, face, parse)` replaces
    `paste` when given (the HQ path: `face_masks.MaskedPaste`), with the batch's parse of each face or None.
    """
    for batch in batches:
        faces = iter(batch.generated)
        parses = iter(batch.parses) if batch.parses is not None else None
        for frame, box in zip(batch.frames, batch.boxes, strict=True):
            if box is not None:
                frame = frame.copy() if shared_frames else frame
                if paster is None:
                    paste(frame, box, next(faces), mask)
                else:
                    paster(frame, box, next(faces), next(parses) if parses is not None else None)
            yield frame, box is not None
