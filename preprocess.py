"""Prepare LRS2 (or any `<speaker>/<video>.mp4` tree) for training: face crops, 16 kHz audio, mel cache.

    python preprocess.py --data_root LRS2/mvlrs_v1/main --preprocessed_root lrs2_preprocessed/
    torchrun --nnodes 4 --nproc_per_node 8 preprocess.py ...   # each rank takes its share of the videos

For each `<data_root>/<speaker>/<video>.mp4` it writes `<preprocessed_root>/<speaker>/<video>/`:
- `{i}.jpg`: the face crop of frame i, the S3FD box as detected (no padding, as the original), frames
  without a face skipped. Unlike the original, which numbered the crops consecutively over the frames
  that had a face, i is the frame's own index, so a missed frame leaves a gap instead of shifting every
  later crop against the audio;
- `audio.wav`: 16 kHz mono 16-bit (the original copied the source's rate and channels);
- `mel.npy`: the mel spectrogram (80 × T float32) the trainers read instead of recomputing it.

The video is read at `--fps` (25): other rates are resampled to it by dropping or repeating frames, as the
crops' indices and the trainers' audio windows assume 25 fps. Each video is written to a temporary folder
and renamed when complete, so a rerun skips finished videos and never sees half-written ones. Detection
runs in batches on `--ngpu` GPUs (one process each), or without CUDA on `--cpu_workers` processes.
Failures (no audio, no face, unreadable video) are listed with their reason in
`<preprocessed_root>/preprocess_report.json` (`preprocess_report.rank<R>.json` per torchrun rank).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

import audio
from data import compute_mel, mel_cache_name
from errors import UserError, run_cli
from hparams import HParams, add_hparams_argument, from_argument, hparams

Detector = object  # anything with get_detections_for_batch(frames_bgr NHWC uint8) -> list[box | None]


@dataclass
class Outcome:
    video: str  # <speaker>/<video>
    status: str  # done, skipped (already there) or failed
    frames: int = 0
    faces: int = 0
    reason: str = ""


def list_videos(data_root: str | os.PathLike, pattern: str = "*/*.mp4") -> list[Path]:
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise UserError(f"{data_root}: --data_root not found; pass LRS2's 'main' folder (<speaker>/<video>.mp4)")
    videos = sorted(data_root.glob(pattern))
    if not videos:
        raise UserError(f"{data_root}: no video matches '{pattern}'; pass the folder holding <speaker>/<video>.mp4")
    return videos


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """This rank's share: every world_size-th item from `rank`."""
    return list(items[rank::world_size])


def output_folder(vfile: Path, out_root: Path) -> Path:
    """`<out>/<speaker>/<video>`, named as the original: the parent folder and the name up to its first dot."""
    return out_root / vfile.parent.name / vfile.name.split(".")[0]


def batched(iterable, size: int):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def read_frames(vfile: Path, fps: float):
    """Frames of the video as BGR uint8, resampled to `fps` when its rate differs."""
    import video

    rate = video.probe(vfile).fps
    return video.iter_frames(vfile, fps=None if abs(float(rate) - fps) < 1e-3 else fps)


def process_video(
    vfile: Path, out_root: Path, detector: Detector, *, fps: float = 25, batch_size: int = 32, hp: HParams = hparams
) -> Outcome:
    """Detect, crop and write one video atomically; an `Outcome` whatever happens."""
    name = f"{vfile.parent.name}/{vfile.name.split('.')[0]}"
    final = output_folder(vfile, out_root)
    if final.is_dir():
        return Outcome(name, "skipped")
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        wav = audio.load_wav(vfile, hp.sample_rate)
        frames = faces = 0
        for batch in batched(read_frames(vfile, fps), batch_size):
            boxes = detector.get_detections_for_batch(np.asarray(batch))
            for j, box in enumerate(boxes):
                if box is not None:
                    x1, y1, x2, y2 = box
                    crop = batch[j][y1:y2, x1:x2]
                    if crop.size and cv2.imwrite(str(tmp / f"{frames + j}.jpg"), crop):
                        faces += 1
            frames += len(batch)
        if faces == 0:
            raise UserError(f"no face detected in any of its {frames} frames")
        audio.save_wav(wav, tmp / "audio.wav", hp.sample_rate)
        # from the 16-bit file, so the cache equals what the trainers would compute from audio.wav
        np.save(tmp / mel_cache_name(hp), compute_mel(tmp / "audio.wav", hp))
        os.rename(tmp, final)
        return Outcome(name, "done", frames, faces)
    except (UserError, OSError, ValueError) as e:
        return Outcome(name, "failed", reason=str(e).removeprefix(f"{vfile}: "))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --- worker processes: one detector each, built on first use -----------------------------------------------

_detectors: dict[str, Detector] = {}


def _worker_job(
    vfile: Path,
    out_root: Path,
    device: str,
    detector_path: str | None,
    fps: float,
    batch_size: int,
    threads: int,
    hp: HParams,
) -> Outcome:
    if device not in _detectors:
        if device == "cpu":
            import torch

            torch.set_num_threads(threads)  # the CPU workers share the cores instead of each taking all
        _detectors[device] = make_detector(device, detector_path)
    return process_video(vfile, out_root, _detectors[device], fps=fps, batch_size=batch_size, hp=hp)


def check_detector_weights(path: str | None) -> None:
    """Fail before starting any worker when S3FD's weights are missing."""
    from face_detection.detection.sfd.sfd_detector import existing_weights

    existing_weights(path)


def make_detector(device: str, detector_path: str | None = None) -> Detector:
    import face_detection

    return face_detection.FaceAlignment(
        face_detection.LandmarksType._2D, flip_input=False, device=device, path_to_detector=detector_path
    )


def run(
    videos: Sequence[Path],
    out_root: Path,
    *,
    devices: Sequence[str] = ("cpu",),
    detector_path: str | None = None,
    detector_factory: Callable[[str], Detector] | None = None,
    fps: float = 25,
    batch_size: int = 32,
    progress: bool = True,
    hp: HParams = hparams,
) -> list[Outcome]:
    """Process `videos`; with several devices, one worker process per device.

    `detector_factory(device)` replaces S3FD (tests use a fake one); it runs in this process.
    """
    from tqdm import tqdm

    bar = tqdm(total=len(videos), disable=not progress, unit="video", dynamic_ncols=True)
    outcomes = []
    if len(devices) == 1 or detector_factory is not None:
        detector = (detector_factory or (lambda d: make_detector(d, detector_path)))(devices[0])
        for vfile in videos:
            outcomes.append(process_video(vfile, out_root, detector, fps=fps, batch_size=batch_size, hp=hp))
            bar.update(1)
    else:
        import multiprocessing

        threads = max(1, (os.cpu_count() or 1) // len(devices))
        with ProcessPoolExecutor(len(devices), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [
                pool.submit(
                    _worker_job, v, out_root, devices[i % len(devices)], detector_path, fps, batch_size, threads, hp
                )
                for i, v in enumerate(videos)
            ]
            for future in as_completed(futures):
                outcomes.append(future.result())
                bar.update(1)
    bar.close()
    return outcomes


def write_filelists(out_root: Path, folder: Path, val_fraction: float = 0.05, seed: int = 0) -> tuple[int, int]:
    """`train.txt` and `val.txt` of every finished video under `out_root`, split by speaker.

    A shuffled `val_fraction` of the speakers (at least one when there are two or more) goes to val, so
    no speaker is in both.
    """
    speakers = sorted(p.name for p in out_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    videos = {s: sorted(v.name for v in (out_root / s).iterdir() if v.is_dir() and not v.name.startswith("."))
              for s in speakers}  # fmt: skip
    speakers = [s for s in speakers if videos[s]]
    order = speakers[:]
    random.Random(seed).shuffle(order)
    n_val = max(1 if len(order) >= 2 else 0, round(val_fraction * len(order)))
    val = set(order[:n_val])
    folder.mkdir(parents=True, exist_ok=True)
    lines = {"train": [], "val": []}
    for s in speakers:
        lines["val" if s in val else "train"] += [f"{s}/{v}" for v in videos[s]]
    for split, entries in lines.items():
        (folder / f"{split}.txt").write_text("".join(f"{e}\n" for e in entries))
    return len(lines["train"]), len(lines["val"])


def choose_devices(ngpu: int | None, cpu_workers: int) -> list[str]:
    """cuda:0 … cuda:ngpu-1; under torchrun, this rank's GPU; without CUDA, `cpu_workers` CPU processes."""
    import torch

    if torch.cuda.is_available() and ngpu != 0:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return [f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"]
        n = torch.cuda.device_count() if ngpu is None else ngpu
        if n > torch.cuda.device_count():
            raise UserError(f"--ngpu {n}: only {torch.cuda.device_count()} GPU(s) are visible")
        return [f"cuda:{i}" for i in range(n)]
    return ["cpu"] * max(1, cpu_workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="preprocess.py"
    )
    parser.add_argument("--data_root", required=True, help="root folder of the LRS2 dataset (its 'main' folder)")
    parser.add_argument("--preprocessed_root", required=True, help="root folder of the preprocessed dataset")
    parser.add_argument("--ngpu", type=int, default=None, help="GPUs to detect on (default: all visible)")
    parser.add_argument("--cpu_workers", type=int, default=min(4, os.cpu_count() or 1), help="processes without CUDA")
    parser.add_argument("--batch_size", type=int, default=32, help="face detection batch size per device")
    parser.add_argument("--fps", type=float, default=25, help="frame rate the crops are indexed at")
    parser.add_argument("--pattern", default="*/*.mp4", help="glob of the videos under --data_root")
    parser.add_argument("--detector_path", default=None, help="s3fd.pth (default: face_detection/detection/sfd/)")
    parser.add_argument("--filelist_out", default=None, help="write train.txt and val.txt here, split by speaker")
    parser.add_argument("--val_fraction", type=float, default=0.05, help="share of speakers for val.txt")
    parser.add_argument("--no_tqdm", action="store_true")
    add_hparams_argument(parser)
    return parser


def main(argv: list[str] | None = None, detector_factory: Callable[[str], Detector] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    hp = from_argument(args.hparams)
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out_root = Path(args.preprocessed_root)
    videos = shard(list_videos(args.data_root, args.pattern), rank, world_size)
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_root}: --preprocessed_root cannot be created ({e.strerror})") from None
    devices = ["cpu"] if detector_factory else choose_devices(args.ngpu, args.cpu_workers)
    if detector_factory is None:
        check_detector_weights(args.detector_path)
    print(f"preprocessing {len(videos)} videos" + (f" (rank {rank} of {world_size})" if world_size > 1 else "")
          + f" on {len(devices)} worker(s): {', '.join(sorted(set(devices)))}", file=sys.stderr)  # fmt: skip
    start = time.time()
    outcomes = run(
        videos,
        out_root,
        devices=devices,
        detector_path=args.detector_path,
        detector_factory=detector_factory,
        fps=args.fps,
        batch_size=args.batch_size,
        progress=not args.no_tqdm,
        hp=hp,
    )
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    report = {
        "data_root": str(args.data_root),
        "rank": rank,
        "world_size": world_size,
        "videos": len(videos),
        **counts,
        "seconds": round(time.time() - start, 1),
        "failures": [{"video": o.video, "reason": o.reason} for o in outcomes if o.status == "failed"],
    }
    name = "preprocess_report.json" if world_size == 1 else f"preprocess_report.rank{rank}.json"
    (out_root / name).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{counts['done']} done, {counts['skipped']} already there, {counts['failed']} failed "
          f"(listed in {out_root / name})", file=sys.stderr)  # fmt: skip
    if args.filelist_out and rank == 0:
        n_train, n_val = write_filelists(out_root, Path(args.filelist_out), args.val_fraction)
        print(f"wrote {args.filelist_out}/train.txt ({n_train}) and val.txt ({n_val})", file=sys.stderr)
    report["outcomes"] = [asdict(o) for o in outcomes]
    return report


if __name__ == "__main__":
    run_cli(main)
