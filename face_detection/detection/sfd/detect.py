"""From a batch of frames to scored candidate boxes: preprocessing, the network, anchors, decoding.

The original visits anchors one at a time in Python; here every anchor of every level is gathered and
decoded in one pass on the network's device, with the same candidates in the same order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .bbox import decode

# Subtracted from RGB pixels. These are Caffe's BGR means applied to RGB data: a quirk of the original that
# its weights are used with, so it stays.
PIXEL_MEAN = (104.0, 117.0, 123.0)
CANDIDATE_SCORE = 0.05  # an anchor is a candidate when a face score passes this
FIRST_STRIDE = 4  # level i (0-based) has stride 4 * 2**i: 4, 8, ..., 128
ANCHOR_PER_STRIDE = 4  # square anchors of side 4 * stride
# Peak bytes of one forward pass per input pixel of each frame: conv1's two 64-channel float maps alive
# together (512 B), less what the allocator reuses (measured 410-460 B at 512x512 and 1080p, in-place ReLU).
PASS_BYTES_PER_PIXEL = 512
PASS_BUDGET = 512 << 20  # a forward pass takes as many frames as fit in this (at least one)


def preprocess(frames_rgb: torch.Tensor, max_side: int | None = None) -> torch.Tensor:
    """uint8 RGB [B, H, W, 3] -> mean-subtracted float32 [B, 3, h, w] on the frames' device.

    With `max_side`, frames whose longest side is larger are shrunk (area averaging) to that side first.
    """
    x = frames_rgb.permute(0, 3, 1, 2).float()
    size = scaled_size(x.shape[-2:], max_side)
    if size != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=size, mode="area")
    return x - torch.tensor(PIXEL_MEAN, device=x.device).view(1, 3, 1, 1)


def scaled_size(hw: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """(h, w) shrunk so that max(h, w) <= max_side, aspect kept; unchanged when already small enough."""
    h, w = int(hw[0]), int(hw[1])
    if max_side is None or max(h, w) <= max_side:
        return h, w
    scale = max_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def candidates(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Network outputs -> [B, N, 5] boxes (x1, y1, x2, y2, face score) of every candidate anchor.

    As in the original, an anchor is a candidate for all images once ANY image of the batch scores above
    `CANDIDATE_SCORE` there, and it is listed once per such image (so duplicates occur); the order is
    level, then image, then row-major position. Detections thus depend on the batch, exactly as before.
    """
    scores, locs, priors = [], [], []
    for level in range(len(outputs) // 2):
        face = F.softmax(outputs[2 * level], dim=1)[:, 1]  # [B, H, W]
        reg = outputs[2 * level + 1]  # [B, 4, H, W]
        _, ys, xs = torch.nonzero(face > CANDIDATE_SCORE, as_tuple=True)
        stride = FIRST_STRIDE * 2**level
        centres = torch.stack([xs, ys], dim=1).float() * stride + stride / 2
        sides = torch.full_like(centres, float(ANCHOR_PER_STRIDE * stride))
        scores.append(face[:, ys, xs])
        locs.append(reg[:, :, ys, xs].transpose(1, 2))
        priors.append(torch.cat([centres, sides], dim=1))
    boxes = decode(torch.cat(locs, dim=1), torch.cat(priors)[None])
    return torch.cat([boxes, torch.cat(scores, dim=1)[..., None]], dim=-1)


def frames_per_pass(hw: tuple[int, int], budget: int | None = None) -> int:
    """How many frames of network input size `hw` one forward pass may take within `budget` bytes
    (default PASS_BUDGET).

    The network's activations, not the frames, are what fills memory: 16 frames of 1080p in one pass, the
    original's default batch, need 24 GB; one at a time, 0.9 GB.
    """
    budget = PASS_BUDGET if budget is None else budget
    return max(1, budget // (PASS_BYTES_PER_PIXEL * hw[0] * hw[1]))


@torch.no_grad()
def forward(net: Callable[[torch.Tensor], list[torch.Tensor]], frames_rgb: torch.Tensor,
            max_side: int | None = None) -> list[torch.Tensor]:  # fmt: skip
    """The network's outputs for uint8 RGB frames [B, H, W, 3], run `frames_per_pass` frames at a time and
    joined again, so that what follows sees the whole batch's outputs, as from one pass."""
    used = scaled_size(frames_rgb.shape[1:3], max_side)
    passes = [net(preprocess(part, max_side)) for part in frames_rgb.split(frames_per_pass(used))]
    return [torch.cat(maps) for maps in zip(*passes, strict=True)]


@torch.no_grad()
def batch_detect(net: Callable[[torch.Tensor], list[torch.Tensor]], frames_rgb: torch.Tensor,
                 max_side: int | None = None) -> torch.Tensor:  # fmt: skip
    """Candidates [B, N, 5] for uint8 RGB frames [B, H, W, 3], in the frames' pixel coordinates.

    Frames must already be on the network's device. Boxes found on shrunk frames (`max_side`) are scaled
    back to full resolution.
    """
    dets = candidates(forward(net, frames_rgb, max_side))
    full, used = frames_rgb.shape[1:3], scaled_size(frames_rgb.shape[1:3], max_side)
    if tuple(full) != tuple(used):
        sx, sy = full[1] / used[1], full[0] / used[0]
        dets[..., :4] *= torch.tensor([sx, sy, sx, sy], device=dets.device)
    return dets
