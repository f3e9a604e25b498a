"""Lip-sync a face video (or image) to any speech: the command line of `lipsync.lipsync`.

    python inference.py --checkpoint_path checkpoints/wav2lip_gan.pth --face video.mp4 --audio speech.wav

Every flag of the original inference.py keeps its meaning; see `python inference.py -h` and README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

from errors import run_cli
from hparams import add_hparams_argument, from_argument

# glibc's malloc returns every buffer above 128 KiB (32 MiB at most through mallopt) to the OS when freed,
# so each generator batch page-faults its activations in again: a third of the CPU time. These thresholds
# keep them in the heap. They can only be set before the process starts, hence `restart_with_tuned_malloc`.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=4294967295"


def str2bool(text: str) -> bool:
    """`--static True` from old command lines (the original's `type=bool`)."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    from lipsync import BLEND_CHOICES, DEFAULT_OUTFILE, NO_FACE_CHOICES

    p = argparse.ArgumentParser(description="Lip-sync videos in the wild with Wav2Lip")
    p.add_argument("--checkpoint_path", required=True, help="Wav2Lip checkpoint (wav2lip.pth / wav2lip_gan.pth)")
    p.add_argument(
        "--face",
        required=True,
        help="video or image with the face (any format FFmpeg/OpenCV reads); rotation and mirroring metadata are "
        "applied and a variable frame rate is resampled to the video's average rate",
    )
    p.add_argument("--audio", required=True, help="speech: any audio file, or a video whose audio track to use")
    p.add_argument("--outfile", default=DEFAULT_OUTFILE, help="output video (H.264 + AAC); its folder is created")
    p.add_argument(
        "--static",
        nargs="?",
        const=True,
        default=False,
        type=str2bool,
        help="use only the first video frame (an image always is)",
    )
    p.add_argument("--fps", type=float, default=25.0, help="frame rate for an image input (default: 25)")
    p.add_argument(
        "--pads",
        nargs="+",
        type=int,
        default=[0, 10, 0, 0],
        help="padding of the face box (top, bottom, left, right); include the chin at least",
    )
    p.add_argument("--face_det_batch_size", type=int, default=16, help="batch size for face detection")
    p.add_argument(
        "--wav2lip_batch_size",
        type=int,
        default=None,
        help="batch size for the generator (default: 128 on a GPU, 16 on a CPU, where it is faster)",
    )
    p.add_argument(
        "--resize_factor",
        type=int,
        default=1,
        help="shrink the frames by this factor first (480p or 720p often give the best results)",
    )
    p.add_argument(
        "--crop",
        nargs="+",
        type=int,
        default=[0, -1, 0, -1],
        help="crop the frames (top, bottom, left, right) after --resize_factor and --rotate; -1: the edge",
    )
    p.add_argument(
        "--box",
        nargs="+",
        type=int,
        default=[-1, -1, -1, -1],
        help="a constant face box (top, bottom, left, right) instead of face detection",
    )
    p.add_argument("--rotate", action="store_true", help="turn the frames right by 90 degrees")
    p.add_argument("--nosmooth", action="store_true", help="do not smooth the face boxes over 5 frames")
    p.add_argument(
        "--no_face",
        choices=NO_FACE_CHOICES,
        default="keep",
        help="frames without a face: keep them unchanged (default), reuse the last box, or stop",
    )
    p.add_argument(
        "--det_max_side",
        type=int,
        default=None,
        help="detect faces on frames shrunk to this longest side (e.g. 640); faster on large videos",
    )
    p.add_argument(
        "--det_every", type=int, default=1, help="detect on every K-th frame only, interpolating the boxes in between"
    )
    p.add_argument("--cache_dir", default=None, help="cache face boxes here, keyed by the video's content")
    p.add_argument(
        "--blend",
        choices=BLEND_CHOICES,
        default="paste",
        help="paste the generated face (original) or feather its lower half into the frame",
    )
    p.add_argument(
        "--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="auto: cuda, then mps, then cpu"
    )
    p.add_argument("--fp16", action="store_true", help="run the networks in float16 (CUDA only)")
    p.add_argument(
        "--detector_path", default=None, help="S3FD weights (default: face_detection/detection/sfd/s3fd.pth)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars and no summary")
    add_hparams_argument(p)
    return p


def restart_with_tuned_malloc() -> None:
    """Re-run this very command once with GLIBC_TUNABLES set (Linux/glibc only; a no-op if already set)."""
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ or not sys.executable:
        return
    if platform.libc_ver()[0] != "glibc":
        return
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES})


def exit_at_once() -> None:
    """End the process without the interpreter's teardown, which takes torch about 0.5 s: by now the output
    is complete and renamed, and nothing else is left to clean up."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from lipsync import lipsync

    options = vars(args)
    common = {k: options.pop(k) for k in ("checkpoint_path", "face", "audio", "outfile")}
    summary = lipsync(
        common["face"], common["audio"], common["checkpoint_path"], common["outfile"],
        device=options.pop("device"), fp16=options.pop("fp16"), detector_path=options.pop("detector_path"),
        hp=from_argument(options.pop("hparams")),
        **options,
    )  # fmt: skip
    if not args.quiet:
        print(summary.line())


if __name__ == "__main__":
    restart_with_tuned_malloc()
    run_cli(main)
    exit_at_once()
