"""syncnet_python's own S3FD (`detectors/s3fd`, weights `sfd_face.pth`) on our network and decoding.

syncnet_python's `run_pipeline.py` finds faces with `S3FD.detect_faces(rgb, conf_th=0.9, scales=[0.25])`
and tracks EVERY face it returns. Its network is the same S3FD as Wav2Lip's, under other key names
(`vgg.<i>`, `L2Norm3_3`, `extras.<i>`, `loc.<i>`, `conf.<i>`), with two differences in the trunk: fc6 is
dilated (3x3, padding 6, dilation 6, as in SSD) and the pool after conv3_3 rounds up (`ceil_mode`). Both
are options of `net_s3fd.s3fd`, so the weights load, renamed, into our class.

Where its detection differs from Wav2Lip's (`detect.py` + `sfd_detector.py`), the difference is kept:
- input: the Caffe BGR means (104, 117, 123) are subtracted from B, G, R (Wav2Lip subtracts them from
  R, G, B), and the network reads RGB;
- anchors: every cell of every level, at (j + 0.5) * stride, side 4 * stride, in coordinates normalised by
  the input size (Wav2Lip's `PriorBox` equivalent in pixels), decoded with the same variances;
- candidates per image (no batch-wide candidate set), NMS at 0.3 on continuous areas (no "+1 pixel"),
  at most 5000 candidates and 750 boxes, then every box above `conf_th` (not only the best), then a second
  NMS at 0.1 in float64 (`nms_`, which merges the boxes of several scales; run_pipeline uses one scale).

Greedy NMS keeps a box or not from the boxes that score higher only, so cutting at `conf_th` before the
first NMS, instead of at 0.05, gives the same boxes above `conf_th` with far less work. Ties are visited as
the original's ascending sort read from the end (stable sort, flipped).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import UserError
from common.weights import safe_load

from .bbox import decode, nms
from .detect import ANCHOR_PER_STRIDE, FIRST_STRIDE
from .net_s3fd import HEADS, L2_NORMS, VGG_BLOCKS, prepare_s3fd, s3fd

URL = "https://www.robots.ox.ac.uk/~vgg/software/lipsync/data/sfd_face.pth"  # syncnet_python's download_model.sh
PIXEL_MEAN_RGB = (123.0, 117.0, 104.0)  # the Caffe BGR means (104, 117, 123), put in RGB order
CONF_TH = 0.9  # run_pipeline's detect_faces(conf_th=0.9)
NMS_OVERLAP = 0.3  # Detect's nms_thresh
NMS_TOP_K = 5000  # Detect's nms_top_k: best candidates entering NMS per image
TOP_K = 750  # Detect's top_k: boxes kept per image
MERGE_OVERLAP = 0.1  # detect_faces' final nms_ over the boxes of all scales
NET_OPTIONS = {"fc6_padding": 6, "fc6_dilation": 6, "pool3_ceil": True}  # its trunk, on our s3fd class


def _key_map() -> dict[str, str]:
    """syncnet_python module name -> ours. `vgg` is a flat ModuleList: each conv is followed by its ReLU
    and each block by a max-pool, then fc6, ReLU, fc7, ReLU."""
    names, i = {}, 0
    for b, widths in enumerate(VGG_BLOCKS, start=1):
        for k in range(1, len(widths) + 1):
            names[f"vgg.{i}"] = f"conv{b}_{k}"
            i += 2  # conv, ReLU
        i += 1  # max-pool
    names[f"vgg.{i}"], names[f"vgg.{i + 2}"] = "fc6", "fc7"
    for j, name in enumerate(("conv6_1", "conv6_2", "conv7_1", "conv7_2")):
        names[f"extras.{j}"] = name
    for name, _, _ in L2_NORMS:  # conv3_3_norm <- L2Norm3_3
        names[f"L2Norm{name[4:7]}"] = name
    for j, (name, _, _) in enumerate(HEADS):
        names[f"loc.{j}"], names[f"conf.{j}"] = f"{name}_mbox_loc", f"{name}_mbox_conf"
    return names


KEY_MAP = _key_map()


def is_sfd_face(state_dict: Mapping[str, object]) -> bool:
    """syncnet_python's layout, told by its `vgg.*` keys (Wav2Lip's s3fd.pth has `conv1_1.*`)."""
    return any(k.startswith("vgg.") for k in state_dict)


def from_syncnet_python(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an `sfd_face.pth` state dict to our keys; unknown keys pass unchanged (strict loading names them)."""
    out = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        out[f"{KEY_MAP[module]}.{leaf}" if module in KEY_MAP else key] = value
    return out


def missing_message(path: str | os.PathLike) -> str:
    return (
        f"{path}: file not found; syncnet_python's face detector weights sfd_face.pth come from its "
        f"download_model.sh ({URL})"
    )


def read_weights(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """The raw state dict of a face-detector file, or a one-line UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(missing_message(path))
    state = safe_load(path, f"{URL} has sfd_face.pth")  # weights only: a crafted pickle is refused
    if not isinstance(state, Mapping):
        raise UserError(f"{path}: not a state dict (a {type(state).__name__}); {URL} has sfd_face.pth")
    return state


def build_net(
    state_dict: Mapping[str, torch.Tensor], device: str | torch.device = "cpu", name: str = "sfd_face.pth",
    dtype: torch.dtype = torch.float32,
) -> s3fd:  # fmt: skip
    """Our s3fd with syncnet_python's trunk options and its weights, in eval mode on `device`, its trunk
    in `dtype` (`net_s3fd.prepare_s3fd`)."""
    net = s3fd(**NET_OPTIONS)
    try:
        net.load_state_dict(from_syncnet_python(state_dict))
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"{name}: not syncnet_python's S3FD weights ({first}); get sfd_face.pth from {URL}") from None
    return prepare_s3fd(net, device, dtype)


def load_net(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> s3fd:
    return build_net(read_weights(path), device, os.fspath(path), dtype)


def priors(input_hw: tuple[int, int], maps_hw: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """[N, 4] anchors (cx, cy, w, h) normalised by the input size, level by level, row-major, computed in
    float64 like the original's Python floats and then stored as float32."""
    h, w = input_hw
    out = []
    for level, (mh, mw) in enumerate(maps_hw):
        step = FIRST_STRIDE * 2**level
        side = ANCHOR_PER_STRIDE * step
        cy = (torch.arange(mh, dtype=torch.float64, device=device) + 0.5) / (h / step)
        cx = (torch.arange(mw, dtype=torch.float64, device=device) + 0.5) / (w / step)
        gy, gx = torch.meshgrid(cy, cx, indexing="ij")
        sizes = torch.tensor([side / w, side / h], dtype=torch.float64, device=device).expand(mh * mw, 2)
        out.append(torch.cat([gx.reshape(-1, 1), gy.reshape(-1, 1), sizes], dim=1))
    return torch.cat(out).float()


@torch.no_grad()
def detect_faces(net: s3fd, frames_rgb: torch.Tensor, conf_th: float = CONF_TH) -> list[np.ndarray]:
    """Every face of each uint8 RGB frame [B, H, W, 3] (on the net's device): float64 [n, 5] rows
    (x1, y1, x2, y2, score) in the frames' pixels, best first, as syncnet_python's `detect_faces` at one
    scale (the frames are already scaled)."""
    mean = torch.tensor(PIXEL_MEAN_RGB, device=frames_rgb.device).view(1, 3, 1, 1)
    x = frames_rgb.permute(0, 3, 1, 2).float() - mean
    outs = net(x)
    h, w = x.shape[-2:]
    scores = torch.cat([F.softmax(c, dim=1)[:, 1].flatten(1) for c in outs[0::2]], dim=1)  # [B, N]
    locs = torch.cat([r.flatten(2).transpose(1, 2) for r in outs[1::2]], dim=1)  # [B, N, 4]
    anchors = priors((h, w), [tuple(c.shape[-2:]) for c in outs[0::2]], x.device)
    boxes = decode(locs, anchors[None]) * torch.tensor([w, h, w, h], dtype=torch.float32, device=x.device)
    faces = []
    for box, score in zip(boxes, scores, strict=True):
        idx = torch.nonzero(score > conf_th).squeeze(1)
        dets = torch.cat([box[idx], score[idx, None]], dim=1)
        order = torch.sort(dets[:, 4], stable=True).indices.flip(0)[:NMS_TOP_K]
        dets = dets[nms(dets, NMS_OVERLAP, order=order, pixel=0.0)[:TOP_K]].cpu().double()  # a few boxes
        faces.append(dets[nms(dets, MERGE_OVERLAP, pixel=0.0)].numpy())
    return faces
