"""Anchor decoding and greedy non-maximum suppression, vectorised, with the original's exact arithmetic.

Every float32 operation below happens in the same order as in Wav2Lip's per-anchor Python loops, so boxes
come out bit-identical; the only change is that all anchors of a batch are processed at once, on any device.
"""

from __future__ import annotations

import numpy as np
import torch

VARIANCES = (0.1, 0.2)  # SSD encoding: centre offsets scaled by 0.1, log-sizes by 0.2
NMS_TILE = 256  # boxes resolved together in one step of the tiled NMS


def decode(loc: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Offsets `loc` [..., 4] on anchors `priors` [..., 4] (cx, cy, w, h) -> corners (x1, y1, x2, y2)."""
    centre = priors[..., :2] + loc[..., :2] * VARIANCES[0] * priors[..., 2:]
    size = priors[..., 2:] * torch.exp(loc[..., 2:] * VARIANCES[1])
    top_left = centre - size / 2
    return torch.cat([top_left, size + top_left], dim=-1)


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices by decreasing score, ties broken exactly as the original's `scores.argsort()[::-1]`.

    NumPy's default sort is unstable, so which of two equal scores comes first depends on its algorithm;
    saturated softmax scores (exactly 1.0) make such ties real, and the first box is the detection. The
    scores go to the host for this one sort; they are a few kilobytes.
    """
    order = np.argsort(scores.detach().cpu().numpy())[::-1].copy()
    return torch.from_numpy(order).to(scores.device)


def best_index(scores: np.ndarray) -> int:
    """`descending_order(scores)[0]`: the original's first box, same tie-breaking, for one float32 row."""
    return int(np.argsort(scores)[-1])


def _suppresses(a: torch.Tensor, b: torch.Tensor, threshold: float, pixel: float = 1.0) -> torch.Tensor:
    """[len(a), len(b)] mask: box a_i removes box b_j, with the original's "+1 pixel" overlap formula
    (`pixel=0`: plain continuous areas, as syncnet_python's S3FD computes them).

    A NaN overlap also suppresses, as `np.where(ovr <= thresh)` does not keep it.
    """
    a, b = a[:, None, :], b[None, :, :]
    area_a = (a[..., 2] - a[..., 0] + pixel) * (a[..., 3] - a[..., 1] + pixel)
    area_b = (b[..., 2] - b[..., 0] + pixel) * (b[..., 3] - b[..., 1] + pixel)
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0]) + pixel).clamp(min=0.0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1]) + pixel).clamp(min=0.0)
    overlap = w * h / (area_a + area_b - w * h)
    return ~(overlap <= threshold)


def _greedy_block(suppress: torch.Tensor) -> torch.Tensor:
    """Greedy NMS inside one score-sorted block, as a fixed point instead of a sequential scan.

    `suppress[i, j]` for i < j only. keep[j] = no kept i < j suppresses j: this recurrence has exactly one
    solution, so a fixed point is the greedy answer, and iterating from "keep all" settles at least one more
    box per step (Cluster-NMS, Zheng et al. 2021); each step is one boolean reduction, a handful suffice.
    """
    keep = torch.ones_like(suppress[0])
    while True:
        new = ~(suppress & keep[:, None]).any(dim=0)
        if torch.equal(new, keep):
            return keep
        keep = new


def nms(dets: torch.Tensor, threshold: float, order: torch.Tensor | None = None, pixel: float = 1.0) -> torch.Tensor:
    """Indices of `dets` [N, 5] (x1, y1, x2, y2, score) kept by greedy NMS, best first, like the original.

    `order` overrides the visiting order (default: `descending_order`); `pixel` is what a box side gains in
    its area (1 in Wav2Lip's formula, 0 in syncnet_python's).

    Boxes are visited by decreasing score a tile at a time: the tile is resolved internally by
    `_greedy_block`, then its kept boxes remove what they suppress from all the boxes after it, so the
    work shrinks as fast as in the original's one-box-at-a-time loop, with far fewer steps.
    """
    if order is None:
        order = descending_order(dets[:, 4])
    boxes = dets[order, :4]
    # The original compares float32 overlaps with float32(0.3); float64 boxes keep a float64 threshold.
    threshold = torch.tensor(threshold, dtype=dets.dtype).item()
    kept = []
    while len(order):
        tile, rest = boxes[:NMS_TILE], boxes[NMS_TILE:]
        suppress = _suppresses(tile, tile, threshold, pixel).triu(diagonal=1)
        tile_keep = _greedy_block(suppress)
        kept.append(order[:NMS_TILE][tile_keep])
        survive = ~_suppresses(tile[tile_keep], rest, threshold, pixel).any(dim=0)
        boxes, order = rest[survive], order[NMS_TILE:][survive]
    return torch.cat(kept) if kept else order
