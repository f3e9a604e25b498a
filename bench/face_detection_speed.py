"""S3FD post-processing speed: the original's per-anchor loop and one-box-at-a-time NMS against ours.

Runs on the test face image (and its mirror) with deterministic weights, on CUDA when present:
    python -m bench.face_detection_speed [--repeat 3] [--max_side 224]
"""

from __future__ import annotations

import sys
from pathlib import Path

# run by path (python bench/face_detection_speed.py): the repository root is not on the path
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from face_detection.detection.sfd import bbox
from face_detection.detection.sfd.detect import candidates, preprocess
from face_detection.detection.sfd.net_s3fd import s3fd
from tools.detweights import DATA, det_state_dict


def loop_candidates(outputs: list[torch.Tensor]) -> np.ndarray:
    """The original's batch_detect: host copies, then one anchor at a time -> [N, B, 5]."""
    outputs = [F.softmax(o, dim=1) if i % 2 == 0 else o for i, o in enumerate(outputs)]
    outputs = [o.cpu() for o in outputs]
    rows = []
    for level in range(len(outputs) // 2):
        face, reg, stride = outputs[2 * level][:, 1], outputs[2 * level + 1], 4 * 2**level
        for _, y, x in zip(*np.where(face.numpy() > 0.05), strict=True):
            prior = torch.tensor([[stride / 2 + x * stride, stride / 2 + y * stride, 4 * stride, 4 * stride]])
            box = bbox.decode(reg[:, :, y, x][:, None], prior[None].float())[:, 0]
            rows.append(torch.cat([box, face[:, y, x, None]], dim=1).numpy())
    return np.array(rows)


def loop_nms(dets: np.ndarray, thresh: float) -> list[int]:
    """The original's NumPy NMS: one kept box per iteration."""
    x1, y1, x2, y2, scores = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = scores.argsort()[::-1], []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        order = rest[w * h / (areas[i] + areas[rest] - w * h) <= thresh]
    return keep


def timed(fn, repeat: int, device: torch.device) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max_side", type=int, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = s3fd().eval()
    net.load_state_dict(det_state_dict("s3fd"))
    net.to(device)
    img = cv2.imread(str(DATA / "face_320x448.png"))
    frames = torch.from_numpy(np.stack([img, img[:, ::-1]])).to(device).flip(-1)

    with torch.no_grad():
        t_net, outputs = timed(lambda: net(preprocess(frames, args.max_side)), args.repeat, device)
        t_loop, ref = timed(lambda: loop_candidates(outputs), 1, device)
        t_vec, dets = timed(lambda: candidates(outputs), args.repeat, device)
    assert np.allclose(ref.transpose(1, 0, 2), dets.cpu().numpy(), rtol=1e-6, atol=1e-4)
    t_loop_nms, keep_ref = timed(lambda: loop_nms(ref[:, 0], 0.3), 1, device)
    t_nms, keep = timed(lambda: bbox.nms(dets[0], 0.3), args.repeat, device)
    assert keep.tolist() == [int(k) for k in keep_ref]

    print(f"device {device}, batch {tuple(frames.shape)}, {dets.shape[1]} candidates, {len(keep)} kept by NMS")
    print(f"network forward      {t_net * 1e3:9.1f} ms")
    print(f"candidates  loop {t_loop * 1e3:9.1f} ms   vectorised {t_vec * 1e3:8.1f} ms   x{t_loop / t_vec:.0f}")
    print(f"NMS (1 img) loop {t_loop_nms * 1e3:9.1f} ms   tiled      {t_nms * 1e3:8.1f} ms   x{t_loop_nms / t_nms:.1f}")


if __name__ == "__main__":
    main()
