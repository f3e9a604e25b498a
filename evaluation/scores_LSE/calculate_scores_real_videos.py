"""LSE-D / LSE-C of real videos: syncnet_python's face-track pipeline, then LSE per face track.

From the repository root:

    python -m evaluation.scores_LSE.calculate_scores_real_videos --data_root videos/ --initial_model syncnet_v2.model

Replaces Wav2Lip's `calculate_scores_real_videos.sh` (run_pipeline.py + calculate_scores_real_videos.py);
prints "<LSE-D> <LSE-C>" per track as the original does, then the averages over all tracks.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run by path (python evaluation/scores_LSE/calculate_scores_real_videos.py): the repository root is not on the path
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse

from tqdm import tqdm

from common.devices import select_device
from common.errors import UserError, run_cli
from evaluation import lse, tracking
from evaluation.onnx_syncnet import syncnet_loader
from evaluation.syncnet import S

NO_TRACK = "no track long enough"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LSE-D and LSE-C of real videos, per tracked face")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data_root", help="folder of .mp4 videos")
    src.add_argument("--videofile", help="one video")
    p.add_argument(
        "--facedet_model",
        default=None,
        help="syncnet_python's sfd_face.pth (its own S3FD, every face above 0.9) or Wav2Lip's s3fd.pth "
        "(default: face_detection/detection/sfd/s3fd.pth, best face per frame)",
    )
    lse.add_scoring_arguments(p, "track")
    p.add_argument("--facedet_scale", type=float, default=tracking.FACEDET_SCALE)
    p.add_argument("--crop_scale", type=float, default=tracking.CROP_SCALE)
    p.add_argument("--min_track", type=int, default=tracking.MIN_TRACK)
    p.add_argument("--num_failed_det", type=int, default=tracking.NUM_FAILED_DET)
    p.add_argument("--min_face_size", type=int, default=tracking.MIN_FACE_SIZE)
    return p.parse_args(argv)


def score_videos(
    model: S,
    videos: list[str],
    detector: tracking.Detector,
    opts: tracking.PipelineOptions,
    vshift: int,
    batch_size: int,
    lossless: bool,
    out: str | None = None,
) -> dict[str, dict]:
    """Rows keyed `<video>/track<k>`; a video without a usable track gets one row saying so, one that
    fails an error row (lse.score_all: `out` rewritten after each video, a restart skips scored ones)."""

    def score(path: str) -> dict[str, dict]:
        name, rows = Path(path).name, {}
        results = tracking.score_real_video(model, path, detector, opts, vshift, batch_size, lossless)
        if not results:
            rows[name] = {"offset": None, "lse_d": None, "lse_c": None, "note": NO_TRACK}
            tqdm.write(f"{name}: {NO_TRACK} (needs > {opts.min_track} frames with a face)")
        for clip, r in results:
            rows[f"{name}/track{clip.index}"] = {
                **r.as_row(),
                "start": int(clip.frames[0]),
                "end": int(clip.frames[-1]),
            }
            tqdm.write(f"{r.lse_d} {r.lse_c}")
        return rows

    return lse.score_all(videos, score, out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.videofile and not Path(args.videofile).is_file():
        raise UserError(f"{args.videofile}: no such video file; check --videofile")
    videos = [args.videofile] if args.videofile else lse.list_videos(args.data_root)
    if args.out:
        lse.check_results_path(args.out)
    device = select_device(args.device)
    dtype = lse.scoring_dtype(args, device)  # SyncNet's and the face detector's
    load = syncnet_loader(args.backend, args.onnx_path, args.cache_dir, dtype)
    detector, detector_name = tracking.load_detector(args.facedet_model, str(device), dtype)
    print(f"face detector: {detector_name}")
    model = load(args.initial_model, device)
    opts = tracking.PipelineOptions(
        args.facedet_scale, args.crop_scale, args.min_track, args.num_failed_det, args.min_face_size
    )
    rows = score_videos(model, videos, detector, opts, args.vshift, args.batch_size, args.lossless, args.out)
    lse.report(rows, args.out)


if __name__ == "__main__":
    run_cli(main)
