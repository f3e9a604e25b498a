"""LSE-D / LSE-C of every generated video in a folder (Wav2Lip's LRS2/LRS3/LRW protocol).

From the repository root:

    python -m evaluation.scores_LSE.calculate_scores_LRS --data_root results/ --initial_model syncnet_v2.model
"""

from __future__ import annotations

import sys
from pathlib import Path

# run by path (python evaluation/scores_LSE/calculate_scores_LRS.py): the repository root is not on the path
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse

from common.devices import select_device
from common.errors import run_cli
from evaluation import lse
from evaluation.onnx_syncnet import syncnet_loader
from evaluation.syncnet import S


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LSE-D and LSE-C of the .mp4 videos in a folder (SyncNet)")
    p.add_argument("--data_root", required=True, help="folder with the generated .mp4 videos")
    lse.add_scoring_arguments(p, "video")
    return p.parse_args(argv)


def score_folder(
    model: S, videos: list[str], vshift: int, batch_size: int, lossless: bool, out: str | None = None
) -> dict[str, dict]:
    """Score each video (lse.score_all: an error row for a bad one, `out` rewritten after each, resumable),
    showing the running averages as the original's progress bar does."""

    def score(path: str) -> dict[str, dict]:
        return {Path(path).name: lse.evaluate_video(model, path, vshift, batch_size, lossless).as_row()}

    return lse.score_all(videos, score, out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    videos = lse.list_videos(args.data_root)
    if args.out:
        lse.check_results_path(args.out)
    device = select_device(args.device)
    load = syncnet_loader(args.backend, args.onnx_path, args.cache_dir, lse.scoring_dtype(args, device))
    model = load(args.initial_model, device)
    rows = score_folder(model, videos, args.vshift, args.batch_size, args.lossless, args.out)
    lse.report(rows, args.out)


if __name__ == "__main__":
    run_cli(main)
