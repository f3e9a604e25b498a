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

The video is read at `hp.fps` (25; `--hparams fps=30` to change it, for the trainers too): other rates are
resampled to it by dropping or repeating frames, as the crops' indices and the trainers' audio windows
assume that rate. Each video is written to a temporary folder and renamed when complete, so a rerun skips
finished videos and never sees half-written ones. Detection
runs in batches on `--ngpu` GPUs (one process each), or without CUDA on `--cpu_workers` processes.
Failures (no audio, no face, unreadable video) are listed with their reason in
`<preprocessed_root>/preprocess_report.json` (`preprocess_report.rank<R>.json` per torchrun rank).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import cv2
import numpy as np

import audio
from common import video
from common.atomic_files import check_writable, write_text_atomic
from common.devices import Rank, shard, torchrun_rank
from common.errors import UserError, run_cli
from hparams import HParams, add_hparams_argument, from_argument, hparams
from training.datasets import compute_mel, mel_cache_name

if TYPE_CHECKING:
    from tqdm import tqdm

    from face_detection import Box


class Detector(Protocol):
    """What preprocess needs of a face detector: face_detection.FaceAlignment, or a fake in tests."""

    def get_detections_for_batch(self, images: np.ndarray) -> list[Box | None]: ...


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
    if not videos and not unreadable_folders(data_root):
        raise UserError(f"{data_root}: no video matches '{pattern}'; pass the folder holding <speaker>/<video>.mp4")
    return videos


def unreadable_folders(data_root: Path) -> list[Outcome]:
    """A failure for each speaker folder that cannot be listed: glob skips those without a word."""
    failed = []
    for entry in sorted(data_root.iterdir()):
        if entry.name.startswith(".") or not (entry.is_dir() or entry.is_symlink()):
            continue
        try:
            with os.scandir(entry):
                pass
        except OSError as e:
            failed.append(Outcome(entry.name, "failed", reason=f"folder cannot be read ({e.strerror or e})"))
    return failed


def output_folder(vfile: Path, out_root: Path) -> Path:
    """`<out>/<speaker>/<video>`, named as the original: the parent folder and the name up to its first dot."""
    return out_root / vfile.parent.name / vfile.name.split(".")[0]


def batched(iterable: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def read_frames(vfile: Path, fps: float) -> Iterator[np.ndarray]:
    """Frames of the video as BGR uint8, resampled to `fps` when its rate differs."""
    rate = video.probe(vfile).fps
    return video.iter_frames(vfile, fps=None if abs(float(rate) - fps) < 1e-3 else fps)


@contextlib.contextmanager
def folder_in_progress(final: Path) -> Iterator[Path]:
    """A new hidden folder beside `final` to fill, renamed to `final` when the block ends normally and
    deleted when it raises: `files.atomic_path`'s rename, for a whole folder. Folders left by a killed run
    are deleted first (one process at a time works on a video: ranks and workers take disjoint shares)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left there after the rename


def write_crops(frames: Iterable[np.ndarray], folder: Path, detector: Detector, batch_size: int) -> tuple[int, int]:
    """`{i}.jpg`, the face box of frame i as detected, for every frame with a face; (frames, faces)."""
    n_frames = n_faces = 0
    for batch in batched(frames, batch_size):
        for j, box in enumerate(detector.get_detections_for_batch(np.asarray(batch))):
            if box is not None:
                x1, y1, x2, y2 = box
                crop = batch[j][y1:y2, x1:x2]
                if crop.size and cv2.imwrite(str(folder / f"{n_frames + j}.jpg"), crop):
                    n_faces += 1
        n_frames += len(batch)
    if n_faces == 0:
        raise UserError(f"no face detected in any of its {n_frames} frames")
    return n_frames, n_faces


def process_video(
    vfile: Path, out_root: Path, detector: Detector, *, batch_size: int = 32, hp: HParams = hparams
) -> Outcome:
    """Detect, crop and write one video's folder (frames read at `hp.fps`); an `Outcome` whatever happens."""
    name = f"{vfile.parent.name}/{vfile.name.split('.')[0]}"
    final = output_folder(vfile, out_root)
    if final.is_dir():
        return Outcome(name, "skipped")
    try:
        with folder_in_progress(final) as tmp:
            wav = audio.load_wav(vfile, hp.sample_rate)  # first: a video without audio fails before detection
            frames, faces = write_crops(read_frames(vfile, hp.fps), tmp, detector, batch_size)
            audio.save_wav(wav, tmp / "audio.wav", hp.sample_rate)
            # from the 16-bit file, so the cache equals what the trainers would compute from audio.wav
            np.save(tmp / mel_cache_name(hp), compute_mel(tmp / "audio.wav", hp))
        return Outcome(name, "done", frames, faces)
    except (UserError, OSError, ValueError) as e:
        return Outcome(name, "failed", reason=str(e).removeprefix(f"{vfile}: "))
    except Exception as e:  # noqa: BLE001 - one odd file (decoders raise anything) must not end a run of 45,000
        return Outcome(name, "failed", reason=f"{type(e).__name__}: {e}")


# --- worker processes: one detector each, built on first use -----------------------------------------------

_detectors: dict[str, Detector] = {}


def _worker_job(
    vfile: Path,
    out_root: Path,
    device: str,
    detector_path: str | None,
    batch_size: int,
    threads: int,
    hp: HParams,
) -> Outcome:
    if device not in _detectors:
        if device == "cpu":
            import torch

            torch.set_num_threads(threads)  # the CPU workers share the cores instead of each taking all
        _detectors[device] = make_detector(device, detector_path)
    return process_video(vfile, out_root, _detectors[device], batch_size=batch_size, hp=hp)


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
            finished(outcomes, process_video(vfile, out_root, detector, batch_size=batch_size, hp=hp), bar)
    else:
        import multiprocessing

        threads = max(1, (os.cpu_count() or 1) // len(devices))
        with ProcessPoolExecutor(len(devices), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [
                pool.submit(_worker_job, v, out_root, devices[i % len(devices)], detector_path, batch_size, threads, hp)
                for i, v in enumerate(videos)
            ]
            for future in as_completed(futures):
                finished(outcomes, future.result(), bar)
    bar.close()
    return outcomes


def finished(outcomes: list[Outcome], outcome: Outcome, bar: tqdm) -> None:
    """Note a video's outcome; a failure gets its one line on stderr now, not only in the report."""
    outcomes.append(outcome)
    if outcome.status == "failed":
        bar.write(f"failed: {outcome.video}: {outcome.reason}", file=sys.stderr)
    bar.update(1)


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
    lines = {"train": [], "val": []}
    for s in speakers:
        lines["val" if s in val else "train"] += [f"{s}/{v}" for v in videos[s]]
    for split, entries in lines.items():
        write_text_atomic(folder / f"{split}.txt", "".join(f"{e}\n" for e in entries))
    return len(lines["train"]), len(lines["val"])


def choose_devices(ngpu: int | None, cpu_workers: int, rank: Rank) -> list[str]:
    """cuda:0 … cuda:ngpu-1; under torchrun, this rank's GPU; without CUDA, `cpu_workers` CPU processes."""
    import torch

    if torch.cuda.is_available() and ngpu != 0:
        if rank.distributed:
            return [str(rank.local_device("cuda"))]
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
    parser.add_argument("--pattern", default="*/*.mp4", help="glob of the videos under --data_root")
    parser.add_argument("--detector_path", default=None, help="s3fd.pth (default: face_detection/detection/sfd/)")
    parser.add_argument("--filelist_out", default=None, help="write train.txt and val.txt here, split by speaker")
    parser.add_argument("--val_fraction", type=float, default=0.05, help="share of speakers for val.txt")
    parser.add_argument("--no_tqdm", action="store_true")
    add_hparams_argument(parser)
    return parser


def write_report(out_root: Path, rank: Rank, report: dict) -> Path:
    """The run's summary as JSON: one file per torchrun rank, so ranks never write the same file."""
    name = f"preprocess_report.rank{rank.rank}.json" if rank.distributed else "preprocess_report.json"
    write_text_atomic(out_root / name, json.dumps(report, indent=1) + "\n")
    return out_root / name


def main(argv: list[str] | None = None, detector_factory: Callable[[str], Detector] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    hp = from_argument(args.hparams)
    rank = torchrun_rank()
    videos = shard(list_videos(args.data_root, args.pattern), rank)
    out_root = check_writable(args.preprocessed_root, "--preprocessed_root")
    if args.filelist_out and rank.rank == 0:
        check_writable(args.filelist_out, "--filelist_out")
    devices = ["cpu"] if detector_factory else choose_devices(args.ngpu, args.cpu_workers, rank)
    if detector_factory is None:
        check_detector_weights(args.detector_path)
    print(f"preprocessing {len(videos)} videos at {hp.fps} fps"
          + (f" (rank {rank.rank} of {rank.world_size})" if rank.distributed else "")
          + f" on {len(devices)} worker(s): {', '.join(sorted(set(devices)))}", file=sys.stderr)  # fmt: skip
    start = time.time()
    outcomes = run(
        videos,
        out_root,
        devices=devices,
        detector_path=args.detector_path,
        detector_factory=detector_factory,
        batch_size=args.batch_size,
        progress=not args.no_tqdm,
        hp=hp,
    )
    for failure in unreadable_folders(Path(args.data_root)) if rank.rank == 0 else []:
        outcomes.append(failure)
        print(f"failed: {failure.video}: {failure.reason}", file=sys.stderr)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    report = {
        "data_root": str(args.data_root),
        "rank": rank.rank,
        "world_size": rank.world_size,
        "videos": len(videos),
        **counts,
        "seconds": round(time.time() - start, 1),
        "failures": [{"video": o.video, "reason": o.reason} for o in outcomes if o.status == "failed"],
    }
    path = write_report(out_root, rank, report)
    print(f"{counts['done']} done, {counts['skipped']} already there, {counts['failed']} failed "
          f"(listed in {path})", file=sys.stderr)  # fmt: skip
    if args.filelist_out and rank.rank == 0:
        n_train, n_val = write_filelists(out_root, Path(args.filelist_out), args.val_fraction)
        print(f"wrote {args.filelist_out}/train.txt ({n_train}) and val.txt ({n_val})", file=sys.stderr)
    report["outcomes"] = [asdict(o) for o in outcomes]
    return report


EXIT_FAILED = 1  # the run went through, but some videos failed (listed in the report)


def cli() -> None:
    """The command line: exit status 0 when every video is done, EXIT_FAILED when any failed."""
    if main()["failed"]:
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    run_cli(cli)
