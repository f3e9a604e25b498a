"""Generate the benchmark videos of a test filelist (Wav2Lip's LRS2/LRS3/LRW protocol).

    python evaluation/gen_videos_from_filelist.py --filelist lrs2.txt --data_root LRS2/main \
        --results_dir results/ --checkpoint_path checkpoints/wav2lip.pth
    torchrun --nproc_per_node 4 evaluation/gen_videos_from_filelist.py ...   # each rank takes a shard

Each filelist line is `<audio source> <video target>`, paths relative to --data_root without `.mp4`; line i
becomes `<results_dir>/<i>.mp4`, the lips of the target re-synced to the source's speech. Outputs that
already exist are skipped, so an interrupted run resumes; pairs the pipeline refuses (no face, too short)
are reported and skipped, as the original skips them.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository, so the script runs from any directory
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import os  # noqa: E402
from collections.abc import Callable  # noqa: E402

from tqdm import tqdm  # noqa: E402

from errors import UserError, run_cli  # noqa: E402
from hparams import HParams, add_hparams_argument, from_argument, hparams  # noqa: E402

Generate = Callable[[str, str, str], None]  # (face video, audio source, output file)


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


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """Line indices this process generates: every `world_size`-th, starting at `rank`."""
    return list(range(rank, n, world_size))


def distributed_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; (0, 1) when run directly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def lipsync_generator(
    checkpoint_path: str, device: str | None, detector_path: str | None = None, hp: HParams = hparams, **options
) -> Generate:
    """The inference pipeline of `lipsync.py`, with detector and generator loaded once for the whole list."""
    from lipsync import LipSync

    runner = LipSync(checkpoint_path, device=device or "auto", detector_path=detector_path, hp=hp)
    return lambda face, audio, outfile: runner(face, audio, outfile, quiet=True, **options)


def generate_all(
    pairs: list[tuple[str, str]], results_dir: str | os.PathLike, generate: Generate, indices: list[int]
) -> dict[str, list[int]]:
    """Generate `indices` of `pairs` into `results_dir/<i>.mp4`; returns done / skipped / failed lines."""
    os.makedirs(results_dir, exist_ok=True)
    report: dict[str, list[int]] = {"done": [], "skipped": [], "failed": []}
    for i in tqdm(indices):
        audio_src, video = pairs[i]
        out = os.path.join(results_dir, f"{i}.mp4")
        if os.path.exists(out):
            report["skipped"].append(i)
            continue
        part = os.path.join(results_dir, f".{i}.part.mp4")  # renamed only once complete
        try:
            generate(video, audio_src, part)
            os.replace(part, out)
            report["done"].append(i)
        except UserError as e:
            tqdm.write(f"line {i + 1}: skipped: {e}")
            report["failed"].append(i)
        finally:
            if os.path.exists(part):
                os.remove(part)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate the lip-synced videos of a test filelist")
    p.add_argument("--filelist", required=True, help="filelist of '<audio source> <video target>' lines")
    p.add_argument("--results_dir", required=True, help="folder for <line index>.mp4 outputs")
    p.add_argument("--data_root", required=True, help="dataset root the filelist paths are relative to")
    p.add_argument("--checkpoint_path", required=True, help="Wav2Lip generator checkpoint")
    p.add_argument("--pads", nargs=4, type=int, default=[0, 0, 0, 0], help="padding (top, bottom, left, right)")
    p.add_argument("--face_det_batch_size", type=int, default=64)
    p.add_argument("--wav2lip_batch_size", type=int, default=128)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--detector_path", default=None, help="S3FD weights (default: face_detection/detection/sfd/s3fd.pth)"
    )
    add_hparams_argument(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pairs = read_pairs(args.filelist, args.data_root)
    rank, world_size = distributed_rank()
    device = args.device
    if device is None and world_size > 1 and "LOCAL_RANK" in os.environ:
        import torch

        device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu"
    generate = lipsync_generator(
        args.checkpoint_path,
        device,
        args.detector_path,
        from_argument(args.hparams),
        pads=args.pads,
        face_det_batch_size=args.face_det_batch_size,
        wav2lip_batch_size=args.wav2lip_batch_size,
    )
    report = generate_all(pairs, args.results_dir, generate, shard(len(pairs), rank, world_size))
    print(
        f"rank {rank}/{world_size}: {len(report['done'])} generated, {len(report['skipped'])} already there, "
        f"{len(report['failed'])} skipped"
    )


if __name__ == "__main__":
    run_cli(main)
