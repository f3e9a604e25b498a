"""Inference speed: end to end against the original's way and against the generator alone; detection frames/s.

    python -m bench.inference_speed                      # a synthetic 512x512, 8 s clip it makes itself
    python -m bench.inference_speed --face clip.mp4 --audio speech.wav --box 100 400 120 380
    python -m bench.inference_speed --other_checkout ../old  # also another checkout's inference.py, same rounds

- End to end (`--box`, so no detection), two ways, each round alternating ours and the original's:
  - the whole command, what a user waits for: `python inference.py ...` against the original's way
    (bench/original_pipeline.py: its steps re-created, all frames in RAM, batch 128 NCHW, DIVX AVI, then
    x264 medium + AAC, in a fresh process with glibc's default malloc), each timed from process start to
    exit (the original's include its start-up). The speed-up target is judged here. With
    `--other_checkout`, that checkout's `inference.py` runs in the same rounds, to compare two revisions;
  - the pipeline alone, models loaded: our `LipSync` call in this process, theirs timed inside the script.
- The generator alone on the same number of frames, batch size and threads as the pipeline runs it,
  before and after; end to end / generator alone is the pipeline's efficiency.
- Detection: S3FD frames/s at full resolution, with `det_max_side 640` and with `det_every 5`, on the
  first `--detect_frames` frames of `--detect_face` (default: a synthetic 1280x720 clip). Deterministic
  weights: the speed is real, the boxes are not.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run by path (python bench/inference_speed.py): the repository root is not on the path
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os
import statistics
import subprocess
import tempfile
import time

import numpy as np
import torch

import lipsync
from audio import save_wav
from bench.conv_limit import conv_limit, fraction, generator_gflop
from common import video
from lipsync.frames import FrameSource
from lipsync.generation import batch_sizes, generator_workers
from lipsync.options import BACKEND_CHOICES, ModelOptions, Options
from lipsync.threads import ordered_map
from tools.detweights import det_state_dict

REPO = Path(__file__).resolve().parent.parent
INFERENCE = REPO / "inference.py"


def timed_command(cmd: list[str]) -> tuple[float, str]:
    """(wall seconds from start to exit, stdout) of a command in a fresh process with glibc's default malloc
    (inference.py tunes its own)."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=REPO)
    return time.perf_counter() - start, out.stdout


def original_way(face: Path, speech: Path, box: list[int], checkpoint: Path) -> tuple[float, float]:
    """bench/original_pipeline.py: (frames/s of the whole command, frames/s of its pipeline alone)."""
    seconds, out = timed_command([sys.executable, "-m", "bench.original_pipeline", "--face", str(face), "--audio",
                                  str(speech), "--checkpoint", str(checkpoint), "--box", *map(str, box)])  # fmt: skip
    lines = out.strip().splitlines()
    return int(lines[-2].split()[0]) / seconds, float(lines[-1])


def our_command(
    face: Path,
    speech: Path,
    box: list[int],
    checkpoint: Path,
    out: Path,
    n_frames: int,
    extra: list[str],
    script: Path = INFERENCE,
) -> float:
    """`python inference.py ... --box`: frames/s of the whole command."""
    seconds, _ = timed_command([sys.executable, str(script), "--checkpoint_path", str(checkpoint), "--face",
                                str(face), "--audio", str(speech), "--box", *map(str, box), "--outfile", str(out),
                                "--quiet", *extra])  # fmt: skip
    return n_frames / seconds


def synthetic_clip(folder: Path, seconds: float, width: int, height: int, fps: int = 25) -> tuple[Path, Path]:
    """A clip with a moving textured 'face' and a speech-like track, muxed with PyAV."""
    sr = 16000
    t = np.arange(int(seconds * sr)) / sr
    wav = 0.2 * sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 6)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    speech = folder / "speech.wav"
    save_wav(wav, speech, sr)
    face = folder / f"face_{width}x{height}.mp4"
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    with video.VideoWriter(face, fps, width, height, speech) as writer:
        for i in range(int(seconds * fps)):
            writer.write(np.roll(texture, i * 2, axis=1))
    return face, speech


def generator_fps(sync: lipsync.LipSync, n_frames: int, batch_size: int) -> tuple[float, float]:
    """The network alone on `n_frames` frames, batched and spread over threads as the pipeline does:
    (frames/s, CPU seconds per frame)."""
    img = sync.hp.img_size
    faces = np.random.default_rng(0).integers(0, 256, (batch_size, img, img, 3), dtype=np.uint8)
    mels = np.zeros((batch_size, 1, 80, 16), np.float32)

    def generate(n: int) -> np.ndarray:
        return sync.generator.predict(faces[:n], mels[:n])

    workers, threads = generator_workers(sync.device)
    sizes = batch_sizes(n_frames, batch_size, workers)
    list(ordered_map(generate, [batch_size] * workers, workers, threads))  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    for _ in ordered_map(generate, sizes, workers, threads):
        pass
    return n_frames / (time.perf_counter() - start), (time.process_time() - cpu) / n_frames


def print_bound(gen_cpu: float, cpu_per_frame: float, original_fps: float | None) -> None:
    """The fastest this pipeline could be on this machine: the generator at the fp32 convolution limit
    (measured), plus the CPU time per frame that the other stages took in this run, over every core."""
    limit, cores, gflop = conv_limit(), torch.get_num_threads(), generator_gflop()
    rest = max(0.0, cpu_per_frame - gen_cpu)
    at_limit, bound = cores * limit / gflop, cores / (gflop / limit + rest)
    print(f"the limit: {limit:.0f} GFLOP/s per core; the generator ({gflop:.2f} GFLOP/frame) reached "
          f"{fraction(gflop, gen_cpu, limit):.2f} of it; at the limit it would make {at_limit:.1f} frames/s on "
          f"{cores} cores, and the pipeline, with its other stages' {1000 * rest:.0f} CPU ms/frame, {bound:.1f}")  # fmt: skip
    if original_fps:
        print(f"  = at most {bound / original_fps:.2f}x the original's pipeline (models loaded) on this machine")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--face", help="video to lip-sync (default: a synthetic 512x512 clip)")
    p.add_argument("--audio", help="speech (default: the synthetic clip's)")
    p.add_argument("--box", nargs=4, type=int, help="face box (top bottom left right); default: the centre")
    p.add_argument("--checkpoint", help="Wav2Lip checkpoint (default: deterministic weights)")
    p.add_argument("--seconds", type=float, default=8.0, help="length of the synthetic clip")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=None, help="--wav2lip_batch_size (default: the pipeline's)")
    p.add_argument("--detect_face", help="video for the detection timings (default: synthetic 1280x720)")
    p.add_argument("--detect_frames", type=int, default=10, help="frames to detect on per setting")
    p.add_argument("--rounds", type=int, default=5, help="end-to-end runs of ours and of the original's way")
    p.add_argument("--skip_original", action="store_true", help="do not time the original's way")
    p.add_argument("--skip_detection", action="store_true")
    p.add_argument("--other_checkout", help="another checkout of this project: its inference.py in the same rounds")
    p.add_argument("--backends", nargs="+", default=["torch"], choices=BACKEND_CHOICES,
                   help="our whole command once per backend in each round (onnxruntime: exported before)")  # fmt: skip
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        face, speech = (Path(args.face), Path(args.audio)) if args.face else synthetic_clip(tmp, args.seconds, 512, 512)
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = tmp / "wav2lip_det.pth"
            torch.save({"state_dict": det_state_dict("Wav2Lip")}, checkpoint)
        detector_weights = tmp / "s3fd_det.pth"
        torch.save(det_state_dict("s3fd"), detector_weights)

        loaded = time.perf_counter()
        model = ModelOptions(checkpoint_path=checkpoint, device=args.device, detector_path=detector_weights)
        sync = lipsync.LipSync(model, quiet=True)
        load_seconds = time.perf_counter() - loaded
        info = video.probe(face)
        box = args.box or [info.height // 4, info.height * 3 // 4, info.width // 4, info.width * 3 // 4]
        batch_size = args.batch_size or sync.generator.default_batch_size

        workers, threads = generator_workers(sync.device)
        n_probe = 4 * batch_size * workers
        gen_before, gen_cpu_before = generator_fps(sync, n_probe, batch_size)
        extra = ["--device", args.device] + (["--wav2lip_batch_size", str(args.batch_size)] if args.batch_size else [])
        compare = sync.device.type == "cpu" and not args.skip_original
        ours, e2e_cpu, theirs_cmd, theirs, other_cmd = [], [], [], [], []
        ours_cmd: dict[str, list[float]] = {backend: [] for backend in args.backends}
        backend_flags = {b: ["--backend", b, "--cache_dir", str(tmp / "cache")] for b in args.backends}
        if compare and "onnxruntime" in args.backends:  # the export into --cache_dir, once, before the rounds
            our_command(face, speech, box, checkpoint, tmp / "cli.mp4", 1, extra + backend_flags["onnxruntime"])
        other = Path(args.other_checkout).resolve() / "inference.py" if args.other_checkout else None
        for _ in range(args.rounds):
            cpu = time.process_time()
            summary = sync(face, speech, tmp / "out.mp4", box=box, quiet=True, wav2lip_batch_size=batch_size)
            e2e_cpu.append((time.process_time() - cpu) / summary.frames)
            ours.append(summary.fps)
            if compare:
                for backend, flags in backend_flags.items():
                    ours_cmd[backend].append(
                        our_command(face, speech, box, checkpoint, tmp / "cli.mp4", summary.frames, extra + flags)
                    )
                if other is not None:
                    other_cmd.append(
                        our_command(face, speech, box, checkpoint, tmp / "o.mp4", summary.frames, extra, other)
                    )
                whole, pipeline = original_way(face, speech, box, checkpoint)
                theirs_cmd.append(whole)
                theirs.append(pipeline)
        gen_after, gen_cpu_after = generator_fps(sync, n_probe, batch_size)
        gen_cpu = (gen_cpu_before + gen_cpu_after) / 2
        gen = (gen_before + gen_after) / 2
        fps, cpu_per_frame = statistics.median(ours), statistics.median(e2e_cpu)

        def rounds(values: list[float]) -> str:
            return f"median of {', '.join(f'{x:.1f}' for x in values)}"

        def ratios(a: list[float], b: list[float]) -> str:
            return ", ".join(f"{x / y:.2f}" for x, y in zip(a, b, strict=True))

        print(f"clip: {face.name} {info.width}x{info.height} @ {float(info.fps):.2f} fps, {summary.frames} frames")
        print(f"device: {sync.device}, generator batch {batch_size}, {workers} worker(s) x {threads} torch thread(s)")
        if compare:
            base = statistics.median(theirs_cmd)
            print("end to end, the whole command (start-up, model loading, run, exit):")
            print(f"  the original's way:    {base:6.1f} frames/s ({rounds(theirs_cmd)})")
            for backend, values in ours_cmd.items():
                mine = statistics.median(values)
                print(f"  inference.py, {backend + ':':12s}{mine:5.1f} frames/s ({rounds(values)}), "
                      f"{mine / base:.2f}x the original's (per round {ratios(values, theirs_cmd)})")  # fmt: skip
            ours_cmd = ours_cmd[args.backends[0]]
            if other_cmd:
                print(f"  {args.other_checkout}: {statistics.median(other_cmd):6.1f} frames/s ({rounds(other_cmd)})")
                print(f"  its speed-up:          {statistics.median(other_cmd) / base:6.2f}x  (per round "
                      f"{ratios(other_cmd, theirs_cmd)}); this checkout / it: {ratios(ours_cmd, other_cmd)}")  # fmt: skip
        print("end to end, the pipeline alone (models loaded):")
        print(f"  ours (--box):          {fps:6.1f} frames/s ({rounds(ours)}; model loading {load_seconds:.1f} s)")
        if compare:
            base = statistics.median(theirs)
            print(f"  the original's way:    {base:6.1f} frames/s ({rounds(theirs)})")
            print(f"  speed-up:              {fps / base:6.2f}x  (per round {ratios(ours, theirs)})")
        print(f"generator only:          {gen:6.1f} frames/s (before {gen_before:.1f}, after {gen_after:.1f})")
        print(f"pipeline efficiency:     {fps / gen:6.2f}  (end to end / generator only; target >= 0.7)")
        print(f"CPU time per frame:      {cpu_per_frame * 1000:6.0f} ms end to end, {gen_cpu * 1000:.0f} ms generator "
              f"only (ratio {gen_cpu / cpu_per_frame:.2f}: the efficiency, unaffected by other processes)")  # fmt: skip

        print_bound(gen_cpu, cpu_per_frame, statistics.median(theirs) if compare else None)
        if args.skip_detection:
            return
        det_face = Path(args.detect_face) if args.detect_face else synthetic_clip(tmp, 1.0, 1280, 720)[0]
        det_info = video.probe(det_face)
        print(f"detection on {det_face.name} ({det_info.width}x{det_info.height}), {args.detect_frames} frames:")
        for label, options in [
            ("full resolution", {}),
            ("--det_max_side 640", {"det_max_side": 640}),
            ("--det_every 5", {"det_every": 5}),
        ]:
            opts = Options(quiet=True, **options)
            source = FrameSource(det_info, opts, sync.hp.fps)
            start = time.perf_counter()
            sync.face_boxes.detect(source, opts, args.detect_frames)
            fps = args.detect_frames / (time.perf_counter() - start)
            print(f"  {label:20s} {fps:6.2f} frames/s")


if __name__ == "__main__":
    main()
