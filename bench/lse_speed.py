"""LSE speed of the LRS mode: the in-memory PyAV path against extracting JPEGs + wav to disk and back.

    python -m bench.lse_speed [--video tests/data/lse_video.mp4] [--repeat 3]

Deterministic SyncNet weights (no download needed); prints seconds per minute of video and the ratio.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run by path (python bench/lse_speed.py): the repository root is not on the path
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import glob
import os
import tempfile
import time

import cv2
import numpy as np
from scipy.io import wavfile

from common import video
from common.devices import select_device
from common.errors import run_cli
from evaluation import lse, media
from evaluation.syncnet import S, copy_parameters
from tools.detweights import det_state_dict

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VIDEO = ROOT / "tests" / "data" / "lse_video.mp4"


def via_disk(model: S, path: str, tmp: str) -> lse.LSEResult:
    """The original's data flow: %06d.jpg files and audio.wav in a folder, read back with cv2/scipy."""
    jpeg = media.JpegRoundTrip(video.probe(path).fps)
    for i, frame in enumerate(media.decode_frames(path), 1):
        Path(tmp, f"{i:06d}.jpg").write_bytes(jpeg.encode(frame))
    wavfile.write(os.path.join(tmp, "audio.wav"), media.SAMPLE_RATE, media.read_audio(path))
    frames = np.stack(
        [cv2.resize(cv2.imread(f), (lse.FRAME_SIZE,) * 2) for f in sorted(glob.glob(os.path.join(tmp, "*.jpg")))]
    )
    _, audio = wavfile.read(os.path.join(tmp, "audio.wav"))
    return lse.evaluate_clip(model, frames, audio)


def best_time(fn, repeat: int) -> tuple[float, lse.LSEResult]:
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--video", default=str(DEFAULT_VIDEO))
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    device = select_device("auto")
    model = S()
    copy_parameters(model, det_state_dict("syncnet_python_S"))
    model = model.to(device).eval()
    minutes = len(media.read_audio(args.video)) / media.SAMPLE_RATE / 60
    t_mem, r_mem = best_time(lambda: lse.evaluate_video(model, args.video), args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        t_disk, r_disk = best_time(lambda: via_disk(model, args.video, tmp), args.repeat)
    assert abs(r_mem.lse_d - r_disk.lse_d) < 1e-3, (r_mem, r_disk)
    print(f"device {device}, video {args.video} ({minutes * 60:.2f} s), best of {args.repeat}")
    print(f"in-memory (PyAV):  {t_mem / minutes:8.2f} s per minute of video")
    print(f"extract-to-disk:   {t_disk / minutes:8.2f} s per minute of video")
    print(f"ratio disk / memory: {t_disk / t_mem:.2f}")


if __name__ == "__main__":
    run_cli(main)
