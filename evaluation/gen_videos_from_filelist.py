"""Generate the benchmark videos of a test filelist (Wav2Lip's LRS2/LRS3/LRW protocol).

From the repository root:

    python -m evaluation.gen_videos_from_filelist --filelist lrs2.txt --data_root LRS2/main \
        --results_dir results/ --checkpoint_path checkpoints/wav2lip.pth
    torchrun --nproc_per_node 4 -m evaluation.gen_videos_from_filelist ...   # each rank takes a shard

Each filelist line is `<audio source> <video target>`, paths relative to --data_root without `.mp4`; line i
becomes `<results_dir>/<i>.mp4`, the lips of the target re-synced to the source's speech. Outputs that
already exist are skipped, so an interrupted run resumes (the video writer renames a file to `<i>.mp4` only
once it is complete); pairs the pipeline refuses (no face, too short) are reported and skipped, as the
original skips them.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run by path (python evaluation/gen_videos_from_filelist.py): the repository root is not on the path
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import os
from collections.abc import Callable, Sequence

from tqdm import tqdm

from common.atomic_files import check_writable
from common.devices import shard, torchrun_rank
from common.errors import UserError, run_cli
from hparams import HParams, add_hparams_argument, from_argument, hparams
from lipsync.options import ModelOptions, Options, add_arguments, from_namespace

Generate = Callable[[str, str, str], None]  # (face video, audio source, output file)
# The original evaluation script's own defaults, which its published LSE figures were made with: no padding,
# and S3FD batches of 64 (which anchors S3FD considers depends on the whole batch). Every other option is
# inference.py's, from the one declaration in options.py.
PROTOCOL_DEFAULTS = {"pads": (0, 0, 0, 0), "face_det_batch_size": 64}
PER_CLIP_OPTIONS = [f.name for f in dataclasses.fields(Options) if f.name != "quiet"]  # quiet: one bar for the list


def read_pairs(filelist: str | os.PathLike, data_root: str | os.PathLike) -> list[tuple[str, str]]:
    """(audio source, video target) paths of each line; a malformed line is a one-line error."""
    filelist = os.fspath(filelist)
    if not os.path.isfile(filelist):
        raise UserError(f"{filelist}: filelist not found; see evaluation/README.md for where to get it")
    pairs = []
    with open(filelist) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise UserError(f"{filelist}:{n}: expected '<audio source> <video target>', got {line.strip()!r}")
            pairs.append(tuple(os.path.join(os.fspath(data_root), p) + ".mp4" for p in parts))
    return pairs


def lipsync_generator(model: ModelOptions, hp: HParams = hparams, **options) -> Generate:
    """The inference pipeline of `lipsync`, with detector and generator loaded once for the whole list."""
    from lipsync.pipeline import LipSync

    runner = LipSync(model, hp=hp)
    runner.ready()  # a bad checkpoint stops the list here, not as a failure of every line
    return lambda face, audio, outfile: runner(face, audio, outfile, quiet=True, **options)


def generate_all(
    pairs: list[tuple[str, str]], results_dir: str | os.PathLike, generate: Generate, indices: Sequence[int]
) -> dict[str, list[int]]:
    """Generate `indices` of `pairs` into `results_dir/<i>.mp4`; returns done / skipped / failed lines.

    `generate` must write its output atomically (as `video.VideoWriter` does), so an existing `<i>.mp4`
    is always a finished one."""
    results_dir = check_writable(results_dir, "--results_dir")
    report: dict[str, list[int]] = {"done": [], "skipped": [], "failed": []}
    for i in tqdm(indices):
        audio_src, video = pairs[i]
        out = results_dir / f"{i}.mp4"
        if out.exists():
            report["skipped"].append(i)
            continue
        try:
            generate(video, audio_src, str(out))
            report["done"].append(i)
        except UserError as e:
            tqdm.write(f"line {i + 1}: skipped: {e}")
            report["failed"].append(i)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate the lip-synced videos of a test filelist")
    p.add_argument("--filelist", required=True, help="filelist of '<audio source> <video target>' lines")
    p.add_argument("--results_dir", required=True, help="folder for <line index>.mp4 outputs")
    p.add_argument("--data_root", required=True, help="dataset root the filelist paths are relative to")
    add_arguments(p, ModelOptions, required=("checkpoint_path",))
    add_arguments(p, Options, only=PER_CLIP_OPTIONS, defaults=PROTOCOL_DEFAULTS)
    add_hparams_argument(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pairs = read_pairs(args.filelist, args.data_root)
    rank = torchrun_rank()
    model = ModelOptions(**from_namespace(ModelOptions, args) | {"device": str(rank.local_device(args.device))})
    generate = lipsync_generator(model, from_argument(args.hparams), **from_namespace(Options, args))
    report = generate_all(pairs, args.results_dir, generate, shard(range(len(pairs)), rank))
    print(
        f"rank {rank.rank}/{rank.world_size}: {len(report['done'])} generated, {len(report['skipped'])} already there, "
        f"{len(report['failed'])} skipped"
    )


if __name__ == "__main__":
    run_cli(main)
