"""The paste stage through a face parser's mask: the generated face goes back into its box only where the
parse of the SOURCE crop says skin, mouth or lips (Wav2Lip-HQ), so the box around the mouth disappears.

Two ways, chosen per clip by `hq_mode`:

- `fork`: Wav2Lip-HQ's own computation (Markfryazino/wav2lip-hq, face_parsing/swap.py), step for step: the
  face resized to the box (uint8, INTER_LINEAR), both it and the source crop resized to 512×512 (uint8), a
  per-pixel choice between them by the hard mask, the result resized back to the box in float32 and stored
  by truncation. Every pixel of the box is rewritten, also where the mask is 0 (blurred there by the two
  resizes, and ~0.5 level darker from the truncation), and the mask's hard edge can show as stairs.
- `soft`: the mask eroded and feathered (a Gaussian of 1/`FEATHER_FRACTION` of the crop) and faded to 0 at
  the box's border, then applied at the box's own size and rounded: pixels outside the mask keep their exact source
  values, and neither the mask's edge nor the box's shows. A face larger than the box (super-resolved) is
  shrunk with INTER_AREA, which does not alias as the fork's bilinear downscale does.

`mask_region` picks what the mask lets through: `face` (skin, mouth, lips: the fork's classes), `lower_face`
(the same, below the middle of the box: the half Wav2Lip redraws; above it its output only copies its
input, blurred) or `mouth` (mouth and lips). Class numbers are face-parsing.PyTorch's CelebAMask-HQ order.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from face_detection import Box

PARSE_SIZE = 512  # the fork parses and blends every crop at 512×512, whatever the box
SKIN, MOUTH, UPPER_LIP, LOWER_LIP = 1, 11, 12, 13  # of the 19 classes: 0 background, 2-5 brows and eyes, 10 nose, ...
REGIONS = {"face": (SKIN, MOUTH, UPPER_LIP, LOWER_LIP), "lower_face": (SKIN, MOUTH, UPPER_LIP, LOWER_LIP),
           "mouth": (MOUTH, UPPER_LIP, LOWER_LIP)}  # fmt: skip
FEATHER_FRACTION = 96  # soft mask: erosion and Gaussian sigma = crop / 96 (5.3 px at 512; 1.5 px on a 140 px box)
PREVIEW_COLOR = np.array([255, 255, 0], np.float32)  # BGR cyan: where the generated face will go


def region_mask(labels: np.ndarray, region: str) -> np.ndarray:
    """(512, 512) bool: the pixels of the parse that `region` replaces."""
    mask = np.isin(labels, REGIONS[region])
    if region == "lower_face":
        mask[: labels.shape[0] // 2] = False
    return mask


def fork_blend(frame: np.ndarray, box: Box, face: np.ndarray, labels: np.ndarray, region: str) -> None:
    """Wav2Lip-HQ's paste, in place: every resize with the dtype the fork gives it (uint8 bilinear is
    fixed-point in OpenCV and differs from a float resize by ±1), no rounding, truncation at the store."""
    crop = frame[box.y1 : box.y2, box.x1 : box.x2]
    patch = cv2.resize(face, (box.width, box.height))
    source = cv2.resize(crop, (PARSE_SIZE, PARSE_SIZE))
    target = cv2.resize(patch, (PARSE_SIZE, PARSE_SIZE))
    blended = np.where(region_mask(labels, region)[..., None], target, source).astype(np.float32)
    crop[:] = cv2.resize(blended, (box.width, box.height))  # float32 into uint8: truncation, as the fork's store


def soft_weights(labels: np.ndarray, region: str, width: int, height: int) -> np.ndarray:
    """(height, width) float32 weights of the generated face: the region's mask, eroded by one sigma and
    feathered by a Gaussian of that sigma at 512×512 (so the fade lies mostly inside the region, and small
    holes such as the eyes stay nearly untouched), brought to the box's size, then faded to exactly 0 on the
    box's border (so no box edge can show)."""
    mask = region_mask(labels, region).astype(np.uint8)
    sigma = PARSE_SIZE / FEATHER_FRACTION
    radius, kernel = round(sigma), 2 * int(3 * sigma) + 1
    inner = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)))
    weights = cv2.GaussianBlur(inner.astype(np.float32), (kernel, kernel), sigma, borderType=cv2.BORDER_REPLICATE)
    interpolation = cv2.INTER_AREA if width < PARSE_SIZE and height < PARSE_SIZE else cv2.INTER_LINEAR
    weights = cv2.resize(weights, (width, height), interpolation=interpolation)
    margin = 2 * sigma / PARSE_SIZE  # the border's fade, as a fraction of the box's side
    return weights * np.minimum.outer(edge_ramp(height, margin), edge_ramp(width, margin))


def edge_ramp(size: int, margin: float) -> np.ndarray:
    """(size,) float32: 0 at both ends, rising linearly to 1 at `margin` × size (at least 1 px) in."""
    steps = max(1.0, margin * size)
    return np.clip(np.minimum(np.arange(size), np.arange(size)[::-1]) / steps, 0, 1).astype(np.float32)


def resize_to_box(face: np.ndarray, box: Box) -> np.ndarray:
    """The face at the box's size: bilinear when enlarging (the original's), area-averaged when shrinking."""
    shrink = face.shape[1] > box.width and face.shape[0] > box.height
    return cv2.resize(face, (box.width, box.height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def soft_blend(frame: np.ndarray, box: Box, face: np.ndarray, labels: np.ndarray, region: str) -> None:
    """Our paste, in place: the face through the feathered mask, rounded; untouched where the weight is 0."""
    crop = frame[box.y1 : box.y2, box.x1 : box.x2]
    weight = soft_weights(labels, region, box.width, box.height)[..., None]
    source = crop.astype(np.float32)
    crop[:] = np.rint(source + (resize_to_box(face, box).astype(np.float32) - source) * weight).astype(np.uint8)


@dataclass(frozen=True)
class MaskedPaste:
    """The paste stage's per-face function for the HQ path: `(frame, box, face, labels)`, in place.

    `labels` is the 512×512 parse of the source crop (None without a face parser: the face is then pasted
    as a rectangle, resized as `mode` says, or feathered by `feather`, the `--blend feather` mask)."""

    mode: str  # "fork" or "soft" (`Options.hq_mode`)
    region: str  # `Options.mask_region`
    feather: np.ndarray | None = None

    def __call__(self, frame: np.ndarray, box: Box, face: np.ndarray, labels: np.ndarray | None) -> None:
        if labels is not None:
            (fork_blend if self.mode == "fork" else soft_blend)(frame, box, face, labels, self.region)
            return
        patch = cv2.resize(face, (box.width, box.height)) if self.mode == "fork" else resize_to_box(face, box)
        crop = frame[box.y1 : box.y2, box.x1 : box.x2]
        if self.feather is None:
            crop[:] = patch
            return
        weight = cv2.resize(self.feather, (box.width, box.height))[..., None]
        source = crop.astype(np.float32)
        crop[:] = np.rint(source + (patch.astype(np.float32) - source) * weight).astype(np.uint8)


def mask_preview(frame: np.ndarray, box: Box, labels: np.ndarray, mode: str, region: str) -> np.ndarray:
    """A copy of `frame` with the pixels the generated face will take tinted cyan, as strongly as they
    take it (the hard mask for `fork`, the feathered weights for `soft`): for the app's preview."""
    if mode == "fork":
        mask = region_mask(labels, region).astype(np.float32)
        weight = cv2.resize(mask, (box.width, box.height))  # the fork's blend, seen at the box's size
    else:
        weight = soft_weights(labels, region, box.width, box.height)
    out = frame.copy()
    crop = out[box.y1 : box.y2, box.x1 : box.x2].astype(np.float32)
    tint = 0.55 * weight[..., None]
    out[box.y1 : box.y2, box.x1 : box.x2] = np.rint(crop + (PREVIEW_COLOR - crop) * tint).astype(np.uint8)
    return out
