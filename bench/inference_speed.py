"""Inference speed: end to end against the original's way and against the generator alone; detection frames/s.

    python -m bench.inference_speed                      # a synthetic 512x512, 8 s clip it makes itself
    python -m bench.inference_speed --precision fp32 bf16 --face clip.mp4 --audio speech.wav --box 100 400 120 380
    python -m bench.inference_speed --other_checkout ../old  # also another checkout's inference.py, same rounds

- End to end (`--box`, so no detection; with `--detect`, S3FD on every frame, ours without the detection
  cache), two ways, each round alternating ours and the original's:
  - the whole command, what a user waits for: `python inference.py --precision P ...` for each precision
    against the original's way (bench/original_pipeline.py: its steps re-created, all frames in RAM, batch
    128 NCHW, DIVX AVI, then x264 medium + AAC, in a fresh process with glibc's default malloc), each timed
    from process start to exit (the original's include its start-up). The speed-up target is judged here.
    Each command's wall time and CPU time (its process and children) are printed, with how busy the rest of
    the host was meanwhile (other processes' CPU, in cores): on a shared machine the wall ratio moves with
    the load, the CPU-time ratio much less. With `--other_checkout`, that checkout's `inference.py` runs in
    the same rounds, to compare two revisions;
  - the pipeline alone, models loaded: our `LipSync` call in this process, theirs timed inside the script.
- The generator alone on the same number of frames, batch size and threads as the pipeline runs it,
  before and after, and its share of its precision's convolution limit (bench/conv_limit.py); end to end /
  generator alone is the pipeline's efficiency.
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
import math
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

import lipsync
from audio import save_wav
from bench.conv_limit import conv_limit, fraction, generator_gflop
from common import video
from common.devices import PRECISIONS
from lipsync.frames import FrameSource
from lipsync.generation import batch_sizes, generator_workers
from lipsync.options import BACKEND_CHOICES, ModelOptions, Options
from lipsync.pipeline import PRECISION_NAMES
from lipsync.threads import ordered_map
from tools.detweights import det_state_dict

REPO = Path(__file__).resolve().parent.parent
INFERENCE = REPO / "inference.py"
PROC_STAT = Path("/proc/stat")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc/stat's unit, per second
IDLE_FIELDS = (3, 4)  # idle and iowait among /proc/stat's cpu fields: the rest is time some process ran


@dataclass(frozen=True)
class Run:
    """One command, timed: what a user waits for, what it cost, and how busy the host was meanwhile."""

    wall: float  # seconds from start to exit
    cpu: float  # CPU seconds of the process and its children
    others: float  # cores the host's other processes kept busy, on average over the run (nan off Linux)

    @property
    def cores(self) -> float:
        """Cores the command kept busy on average."""
        return self.cpu / self.wall


def host_busy_seconds() -> float:
    """CPU seconds every process on the host has run since boot (nan where /proc/stat is absent)."""
    try:
        fields = [int(v) for v in PROC_STAT.read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return math.nan
    return (sum(fields) - sum(fields[i] for i in IDLE_FIELDS)) / CLOCK_TICKS


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_command(cmd: list[str]) -> tuple[Run, str]:
    """(the run, its stdout) of a command in a fresh process with glibc's default malloc (inference.py
    tunes its own). The other processes' share is the host's busy time less the command's and this one's."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    host, children, own = host_busy_seconds(), children_cpu_seconds(), time.process_time()
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=REPO)
    wall = time.perf_counter() - start
    cpu = children_cpu_seconds() - children
    others = host_busy_seconds() - host - cpu - (time.process_time() - own)
    return Run(wall, cpu, max(0.0, others) / wall), out.stdout


def box_flags(box: list[int] | None, detector: Path) -> list[str]:
    """`--box` when given, else the S3FD weights to detect with."""
    return ["--box", *map(str, box)] if box is not None else ["--detector", str(detector)]


def original_way(
    face: Path, speech: Path, box: list[int] | None, checkpoint: Path, detector: Path
) -> tuple[Run, int, float]:
    """bench/original_pipeline.py: (the whole command's run, its frames, frames/s of its pipeline alone)."""
    run, out = timed_command([sys.executable, "-m", "bench.original_pipeline", "--face", str(face), "--audio",
                              str(speech), "--checkpoint", str(checkpoint), *box_flags(box, detector)])  # fmt: skip
    lines = out.strip().splitlines()
    return run, int(lines[-2].split()[0]), float(lines[-1])


def our_command(
    face: Path, speech: Path, box: list[int] | None, checkpoint: Path, out: Path, extra: list[str],
    script: Path = INFERENCE,
) -> Run:  # fmt: skip
    """`python inference.py ... --box` (or, without a box, with detection), timed."""
    where = ["--box", *map(str, box)] if box is not None else []
    run, _ = timed_command([sys.executable, str(script), "--checkpoint_path", str(checkpoint), "--face",
                            str(face), "--audio", str(speech), *where, "--outfile", str(out), "--quiet", *extra])  # fmt: skip
    return run


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


def print_bound(gen_cpu: float, cpu_per_frame: float, dtype: torch.dtype) -> None:
    """The fastest this pipeline could be on this machine: the generator at its precision's convolution limit
    (measured), plus the CPU time per frame that the other stages took in this run, over every core. In CPU
    time, so that it does not move with the host's load."""
    limit, cores, gflop = conv_limit(dtype), torch.get_num_threads(), generator_gflop()
    rest = max(0.0, cpu_per_frame - gen_cpu)
    print(f"    the {PRECISION_NAMES[dtype]} limit: {limit:.0f} GFLOP/s per core; the generator ({gflop:.2f} GFLOP/frame) "
          f"reached {fraction(gflop, gen_cpu, limit):.2f} of it; at the limit it would cost {1000 * gflop / limit:.0f} "
          f"CPU ms/frame, and the pipeline, with its other stages' {1000 * rest:.0f}, {1000 * (gflop / limit + rest):.0f} "
          f"(now {1000 * cpu_per_frame:.0f}): {cores / (gflop / limit + rest):.1f} frames/s on {cores} free cores")  # fmt: skip


def spread(values: list[float], unit: str = "", digits: int = 1) -> str:
    """The median and the range of a few rounds' values."""
    return f"{statistics.median(values):.{digits}f}{unit} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def print_commands(runs: dict[str, list[Run]], frames: int) -> None:
    """Each whole command's wall time, CPU time and the host's other load, and ours against the original's way
    (the first entry) in wall time and in CPU time, per round and of the medians."""
    base = runs["the original's way"]
    wall0, cpu0 = statistics.median(r.wall for r in base), statistics.median(r.cpu for r in base)
    print(f"end to end, the whole command (start-up, model loading, run, exit; the original's way makes {frames} "
          "frames, ours up to 4 more: the whole audio), median [range] over the rounds:")  # fmt: skip
    print(f"  {'':24s} {'wall s':>17s} {'CPU s':>17s} {'its cores':>15s} {'others (host load)':>19s}")
    for label, values in runs.items():
        walls, cpus = [r.wall for r in values], [r.cpu for r in values]
        print(f"  {label + ':':24s} {spread(walls):>17s} {spread(cpus):>17s} {spread([r.cores for r in values], digits=2):>15s} "
              f"{spread([r.others for r in values], digits=2):>19s}")  # fmt: skip
    for label, values in list(runs.items())[1:]:
        wall, cpu = statistics.median(r.wall for r in values), statistics.median(r.cpu for r in values)
        per_round = ", ".join(f"{b.wall / r.wall:.2f}" for r, b in zip(values, base, strict=True))
        print(f"  {label}: {wall0 / wall:.2f}x the original's way in wall time (per round {per_round}), "
              f"{cpu0 / cpu:.2f}x in CPU time")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--face", help="video to lip-sync (default: a synthetic 512x512 clip)")
    p.add_argument("--audio", help="speech (default: the synthetic clip's)")
    p.add_argument("--box", nargs=4, type=int, help="face box (top bottom left right); default: the centre")
    p.add_argument("--checkpoint", help="Wav2Lip checkpoint (default: deterministic weights)")
    p.add_argument("--seconds", type=float, default=8.0, help="length of the synthetic clip")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS,
                   help="our command once per precision in each round, and the pipeline and generator alone")  # fmt: skip
    p.add_argument("--batch_size", type=int, default=None, help="--wav2lip_batch_size (default: the pipeline's)")
    p.add_argument("--detect_face", help="video for the detection timings (default: synthetic 1280x720)")
    p.add_argument("--detect_frames", type=int, default=10, help="frames to detect on per setting")
    p.add_argument("--rounds", type=int, default=5, help="end-to-end runs of ours and of the original's way")
    p.add_argument("--skip_original", action="store_true", help="do not time the original's way")
    p.add_argument("--skip_pipeline", action="store_true",
                   help="time the whole commands only, not the pipeline and the generator alone in this process")  # fmt: skip
    p.add_argument("--skip_detection", action="store_true")
    p.add_argument("--detect", action="store_true",
                   help="the whole commands without --box: S3FD on every frame (ours: no detection cache)")  # fmt: skip
    p.add_argument("--other_checkout", help="another checkout of this project: its inference.py in the same rounds")
    p.add_argument("--backends", nargs="+", default=["torch"], choices=BACKEND_CHOICES,
                   help="our whole command once per backend in each round (onnxruntime: exported before; fp32 only)")  # fmt: skip
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

        syncs, load_seconds = {}, {}
        for precision in args.precision:
            loaded = time.perf_counter()
            model = ModelOptions(checkpoint_path=checkpoint, device=args.device, detector_path=detector_weights,
                                 precision=precision)  # fmt: skip
            syncs[precision] = lipsync.LipSync(model, quiet=True)
            load_seconds[precision] = time.perf_counter() - loaded
        sync = syncs[args.precision[0]]
        info = video.probe(face)
        box = args.box or [info.height // 4, info.height * 3 // 4, info.width // 4, info.width * 3 // 4]
        batch_size = args.batch_size or sync.generator.default_batch_size
        workers, threads = generator_workers(sync.device)
        n_probe = 4 * batch_size * workers

        gen_before = {k: generator_fps(s, n_probe, batch_size) for k, s in syncs.items() if not args.skip_pipeline}
        extra = ["--device", args.device] + (["--wav2lip_batch_size", str(args.batch_size)] if args.batch_size else [])
        compare = sync.device.type == "cpu" and not args.skip_original
        variants = {f"{b} {p}" if len(args.backends) > 1 else p: ["--backend", b, "--precision", p, "--cache_dir",
                    str(tmp / "cache")] for b in args.backends for p in args.precision if b == "torch" or p == "fp32"}  # fmt: skip
        command_box = None if args.detect else box
        extra += ["--detector_path", str(detector_weights)] if args.detect else []

        def ours_once(flags: list[str], out: Path = tmp / "cli.mp4", script: Path = INFERENCE) -> Run:
            shutil.rmtree(tmp / "cache" / "boxes", ignore_errors=True)  # detection every time, as the original's
            return our_command(face, speech, command_box, checkpoint, out, extra + flags, script)

        for flags in variants.values():  # fill --cache_dir (prepared weights, ONNX exports) before the rounds
            ours_once(flags)
        commands: dict[str, list[Run]] = {"the original's way": []} | {k: [] for k in variants}
        other = Path(args.other_checkout).resolve() / "inference.py" if args.other_checkout else None
        if other is not None:
            commands[args.other_checkout] = []
        ours: dict[str, list[float]] = {k: [] for k in syncs}
        e2e_cpu: dict[str, list[float]] = {k: [] for k in syncs}
        theirs, n_frames = [], 0
        for _ in range(args.rounds):
            for precision, s in syncs.items():
                if args.skip_pipeline:
                    break
                cpu = time.process_time()
                summary = s(face, speech, tmp / "out.mp4", box=box, quiet=True, wav2lip_batch_size=batch_size)
                e2e_cpu[precision].append((time.process_time() - cpu) / summary.frames)
                ours[precision].append(summary.fps)
            if not compare:
                continue
            for label, flags in variants.items():
                commands[label].append(ours_once(flags))
            if other is not None:
                commands[args.other_checkout].append(ours_once([], tmp / "o.mp4", other))
            whole, n_frames, pipeline = original_way(face, speech, command_box, checkpoint, detector_weights)
            commands["the original's way"].append(whole)
            theirs.append(pipeline)

        print(f"clip: {face.name} {info.width}x{info.height} @ {float(info.fps):.2f} fps")
        print(f"device: {sync.device}, generator batch {batch_size}, {workers} worker(s) x {threads} torch thread(s)")
        if compare:
            print_commands(commands, n_frames)
        if args.skip_pipeline:
            return

        def rounds(values: list[float]) -> str:
            return f"median of {', '.join(f'{x:.1f}' for x in values)}"

        print("end to end, the pipeline alone (models loaded):")
        base = statistics.median(theirs) if compare else None
        if compare:
            print(f"  the original's way:    {base:6.1f} frames/s ({rounds(theirs)})")
        for precision, s in syncs.items():
            gen_after = generator_fps(s, n_probe, batch_size)
            gen = (gen_before[precision][0] + gen_after[0]) / 2
            gen_cpu = (gen_before[precision][1] + gen_after[1]) / 2
            fps, cpu_per_frame = statistics.median(ours[precision]), statistics.median(e2e_cpu[precision])
            print(f"  ours (--box), {precision}:    {fps:6.1f} frames/s ({rounds(ours[precision])}; model loading "
                  f"{load_seconds[precision]:.1f} s)" + (f", {fps / base:.2f}x the original's" if base else ""))  # fmt: skip
            print(f"    generator only:      {gen:6.1f} frames/s (before {gen_before[precision][0]:.1f}, after "
                  f"{gen_after[0]:.1f}); pipeline efficiency {fps / gen:.2f} (end to end / generator only)")  # fmt: skip
            print(f"    CPU time per frame:  {cpu_per_frame * 1000:6.0f} ms end to end, {gen_cpu * 1000:.0f} ms generator "
                  f"only (ratio {gen_cpu / cpu_per_frame:.2f}: the efficiency, unaffected by other processes)")  # fmt: skip
            print_bound(gen_cpu, cpu_per_frame, s.dtype)
        if args.skip_detection:
            return
        det_face = Path(args.detect_face) if args.detect_face else synthetic_clip(tmp, 1.0, 1280, 720)[0]
        det_info = video.probe(det_face)
        print(f"detection on {det_face.name} ({det_info.width}x{det_info.height}), {args.detect_frames} frames, "
              f"{args.precision[0]}:")  # fmt: skip
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
