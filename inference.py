"""Lip-sync a face video (or image) to any speech: the command line of `lipsync.lipsync`.

    python inference.py --checkpoint_path checkpoints/wav2lip_gan.pth --face video.mp4 --audio speech.wav

Every flag of the original inference.py keeps its meaning; see `python inference.py -h` and README.md.
The flags are built from the one declaration of options in options.py.
"""

from __future__ import annotations

import argparse
import gc

from common.errors import run_cli
from hparams import add_hparams_argument, from_argument
from lipsync.options import DEFAULT_OUTFILE, ModelOptions, Options, add_arguments, from_namespace


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Lip-sync videos in the wild with Wav2Lip")
    p.add_argument(
        "--face",
        required=True,
        help="video or image with the face (any format FFmpeg/OpenCV reads); rotation and mirroring metadata are "
        "applied and a variable frame rate is resampled to the video's average rate",
    )
    p.add_argument("--audio", required=True, help="speech: any audio file, or a video whose audio track to use")
    p.add_argument("--outfile", default=DEFAULT_OUTFILE, help="output video (H.264 + AAC); its folder is created")
    add_arguments(p, ModelOptions, required=("checkpoint_path",))
    add_arguments(p, Options)
    add_hparams_argument(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from lipsync.pipeline import lipsync

    model = ModelOptions(**from_namespace(ModelOptions, args))
    summary = lipsync(args.face, args.audio, model, args.outfile, hp=from_argument(args.hparams),
                      **from_namespace(Options, args))  # fmt: skip
    if not args.quiet:
        print(summary.line())


if __name__ == "__main__":
    run_cli(main)
    gc.freeze()  # every object lives until exit: the final collection need not walk torch's (~0.4 s saved)
