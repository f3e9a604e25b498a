"""Peak memory of inference on the same clip looped to 8 s and to 64 s: it must not grow with length.

    python bench/inference_memory.py                     # a synthetic 512x512 clip it makes itself
    python bench/inference_memory.py --face clip.mp4 --box 100 400 120 380

Each length runs `inference.py --box ...` in a child process (speech of that length, the video looping
forward), and its peak RSS is read from the kernel (`ru_maxrss` of the waited-for child). Target: the
64 s / 8 s ratio <= 1.15. The original: 2.2 GB at 8 s and 3.4 GB at 64 s on a 512x512 clip.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent

import video  # noqa: E402
from audio import save_wav  # noqa: E402
from bench.inference_speed import synthetic_clip  # noqa: E402
from tools.detweights import det_state_dict  # noqa: E402


def speech_of(seconds: float, path: Path, sr: int = 16000) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    save_wav(0.2 * np.sin(2 * np.pi * 150 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)), path, sr)
    return path


def peak_rss_mib(cmd: list[str]) -> float:
    """Run `cmd` to completion and return its peak resident set size in MiB."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    if proc.stderr.read().count("error:"):
        raise SystemExit(f"{cmd} failed")
    return usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--face", help="video (default: a synthetic 512x512, 8 s clip)")
    p.add_argument("--box", nargs=4, type=int, help="face box (top bottom left right); default: the centre")
    p.add_argument("--checkpoint", help="Wav2Lip checkpoint (default: deterministic weights)")
    p.add_argument("--lengths", nargs="+", type=float, default=[8.0, 64.0], help="seconds of speech")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        face = Path(args.face) if args.face else synthetic_clip(tmp, 8.0, 512, 512)[0]
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = tmp / "wav2lip_det.pth"
            torch.save({"state_dict": det_state_dict("Wav2Lip")}, checkpoint)
        info = video.probe(face)
        box = args.box or [info.height // 4, info.height * 3 // 4, info.width // 4, info.width * 3 // 4]
        peaks = {}
        for seconds in args.lengths:
            speech = speech_of(seconds, tmp / f"speech_{seconds:g}.wav")
            cmd = [sys.executable, str(REPO / "inference.py"), "--checkpoint_path", str(checkpoint),
                   "--face", str(face), "--audio", str(speech), "--outfile", str(tmp / "out.mp4"),
                   "--box", *map(str, box), "--device", args.device, "--quiet"]  # fmt: skip
            peaks[seconds] = peak_rss_mib(cmd)
            print(f"{seconds:5.0f} s of speech ({info.width}x{info.height}): peak RSS {peaks[seconds]:7.0f} MiB")
        first, last = args.lengths[0], args.lengths[-1]
        print(f"ratio {last:g} s / {first:g} s: {peaks[last] / peaks[first]:.3f} (target <= 1.15; the original 1.55)")


if __name__ == "__main__":
    main()
