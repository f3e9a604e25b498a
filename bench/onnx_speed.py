"""Issue 13's speed figures against the machine's limit, in one run with alternating rounds.

    python -m bench.onnx_speed                       # deterministic weights; CPU
    python -m bench.onnx_speed --checkpoint checkpoints/wav2lip_gan.pth --rounds 7 --s3fd_sizes 512

- The limit: the fp32 convolution rate one core reaches (`bench.conv_limit`, measured in every round); each
  figure below is also shown as its GFLOP per CPU second over that limit.
- Generator alone: `--frames` faces in the pipeline's batch layout (`generation.batch_sizes`, the CPU's
  worker threads, `Generator.predict` / `OnnxGenerator.predict`), frames/s and CPU ms per frame, torch
  against ONNX Runtime. A third way, one ONNX Runtime session run using every thread on one batch at a
  time, shows why the pipeline's layout (batches side by side, one thread each) is kept.
- S3FD at 512x512 and 1080p, `--det_batch` frames a call, every thread: the network's forward pass as the
  original's detector code path runs it (float64 NumPy preprocessing, the whole batch in one pass) against
  ours (`detect.forward`: frames a pass within face_detection's PASS_BUDGET) in torch and in ONNX Runtime;
  the outputs against the original's (to 1e-4 of their scale) and the top boxes compared. Post-processing,
  the same code for every way, is timed apart: with deterministic weights every anchor scores, and the
  original's per-anchor Python loop (`bench.face_detection_speed`) would take minutes a frame.

The whole command, ours in both backends against the original's way: `bench.inference_speed --backends
torch onnxruntime`. Each round times every way once, in turn; medians and per-round ratios are printed.
Deterministic weights: the speed is real, the faces are not.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run by path (python bench/onnx_speed.py): the repository root is not on the path
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import onnxruntime
import torch

from bench.conv_limit import conv_limit, fraction, generator_gflop, gflop_per_item
from common.devices import tune_cpu_allocator
from common.onnx_export import OnnxNet, export, open_session
from face_detection.api import to_box
from face_detection.detection.sfd import detect, load_net
from face_detection.detection.sfd.detect import PIXEL_MEAN
from face_detection.detection.sfd.sfd_detector import top_boxes
from lipsync.generation import CPU_BATCH_SIZE, Wav2LipTorch, batch_sizes, generator_workers
from lipsync.onnx_models import SPECS, OnnxWav2Lip
from lipsync.threads import ordered_map
from tools.detweights import det_state_dict

S3FD_SIZES = {"512": (512, 512), "1080p": (1080, 1920)}  # frame sizes (h, w) of the S3FD timings


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_batches(predict: Callable, faces: np.ndarray, mels: np.ndarray, sizes: list[int], workers: int,
                threads: int) -> None:  # fmt: skip
    """`predict` over batches of `sizes` on `workers` threads, as the generate stage runs them."""
    for _ in ordered_map(lambda n: predict(faces[:n], mels[:n]), sizes, workers, threads):
        pass


def generator_ways(checkpoint: Path, onnx_path: Path, device: torch.device) -> dict[str, tuple]:
    """name -> (predict, workers, threads each): the torch and ONNX Runtime generators in the pipeline's
    layout, and ONNX Runtime with every thread on one batch."""
    workers, threads = generator_workers(device)
    return {
        "torch": (Wav2LipTorch(checkpoint, device), workers, threads),
        "onnxruntime": (OnnxWav2Lip(onnx_path, device), workers, threads),
        "onnxruntime, 1 batch x all threads": (OnnxWav2Lip(onnx_path, device, workers * threads), 1, workers * threads),
    }


def of_limit(gflop: float, cpu_ms: list[float], limits: list[float]) -> float:
    """Median over rounds of the share of that round's convolution limit (measured in the same round, so a
    busy machine lowers both alike)."""
    return statistics.median(fraction(gflop, ms / 1000, limit) for ms, limit in zip(cpu_ms, limits, strict=True))


def bench_generator(ways: dict[str, tuple], n_frames: int, batch_size: int, rounds: int) -> list[float]:
    """Frames/s and CPU per frame of each way; returns the convolution limit measured in each round."""
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (batch_size, 96, 96, 3), dtype=np.uint8)
    mels = rng.standard_normal((batch_size, 1, 80, 16)).astype(np.float32)
    outputs = {name: predict(faces, mels) for name, (predict, _, _) in ways.items()}  # also the warm-up
    gflop = generator_gflop()
    ref = outputs["torch"].astype(np.int16)
    levels = {name: int(np.abs(out - ref).max()) for name, out in outputs.items()}
    fps: dict[str, list[float]] = {name: [] for name in ways}
    cpu_ms: dict[str, list[float]] = {name: [] for name in ways}
    limits = []
    for _ in range(rounds):
        limits.append(conv_limit())
        for name, (predict, workers, threads) in ways.items():
            sizes = batch_sizes(n_frames, batch_size, workers)
            wall, cpu = timed(partial(run_batches, predict, faces, mels, sizes, workers, threads))
            fps[name].append(n_frames / wall)
            cpu_ms[name].append(1000 * cpu / n_frames)
    print(f"generator alone: {n_frames} frames in batches of <= {batch_size}, {rounds} rounds, {gflop:.2f} GFLOP/frame")
    for name, (_, workers, threads) in ways.items():
        ratios = [a / b for a, b in zip(fps[name], fps["torch"], strict=True)]
        print(
            f"  {name:36s} {statistics.median(fps[name]):6.1f} frames/s ({workers} x {threads} thread(s)), "
            f"CPU {statistics.median(cpu_ms[name]):5.0f} ms/frame = "
            f"{of_limit(gflop, cpu_ms[name], limits):.2f} of the limit, vs torch {statistics.median(ratios):.2f}x "
            f"(per round {', '.join(f'{r:.2f}' for r in ratios)}); max |diff| {levels[name]} levels"
        )
    return limits


def original_forward(net: torch.nn.Module, frames_rgb: np.ndarray) -> list[torch.Tensor]:
    """The original's detector code path up to the network's outputs: float64 mean subtraction in NumPy,
    a transposed view, and the whole batch in one pass."""
    x = torch.from_numpy((frames_rgb - np.array(PIXEL_MEAN)).transpose(0, 3, 1, 2)).float()
    with torch.no_grad():
        return net(x)


def bench_s3fd(weights: Path, onnx_path: Path, device: torch.device, batch: int, rounds: int,
               sides: list[tuple[int, int]]) -> None:  # fmt: skip
    """S3FD's forward pass, ours (bounded passes; torch and ONNX Runtime) against the original's, per
    frame size; post-processing (the same code for all three) timed apart; the top boxes compared."""
    net = load_net(weights, device)
    threads = torch.get_num_threads()
    onnx_net = OnnxNet(open_session(onnx_path, SPECS["s3fd"], device, threads))
    rng = np.random.default_rng(0)
    for h, w in sides:
        frames = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
        tensor = torch.from_numpy(frames).to(device)
        ways = {
            "the original's": partial(original_forward, net, frames),
            "ours, torch": partial(detect.forward, net, tensor),
            "ours, onnxruntime": partial(detect.forward, onnx_net, tensor),
        }
        outputs = {name: fn() for name, fn in ways.items()}  # also the warm-up
        gflop = gflop_per_item(net, detect.preprocess(tensor[:1]))
        post_start = time.perf_counter()
        boxes = {name: top_boxes(detect.candidates(out)) for name, out in outputs.items()}
        post_ms = 1000 * (time.perf_counter() - post_start) / len(ways) / batch
        ref = outputs["the original's"]
        ms: dict[str, list[float]] = {name: [] for name in ways}
        cpu_ms: dict[str, list[float]] = {name: [] for name in ways}
        limits = []
        for _ in range(rounds):
            limits.append(conv_limit())
            for name, fn in ways.items():
                wall, cpu = timed(fn)
                ms[name].append(1000 * wall / batch)
                cpu_ms[name].append(1000 * cpu / batch)
        print(f"S3FD forward pass, {w}x{h}, {batch} frames a call, {threads} thread(s), {gflop:.0f} GFLOP/frame; "
              f"the limit per round {', '.join(f'{v:.0f}' for v in limits)} GFLOP/s per core:")  # fmt: skip
        for name in ways:
            worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(outputs[name], ref, strict=True))
            same = all(_same_box(a, b) for a, b in zip(boxes[name], boxes["the original's"], strict=True))
            ratios = [a / b for a, b in zip(ms["the original's"], ms[name], strict=True)]
            print(
                f"  {name:18s} {statistics.median(ms[name]):7.0f} ms/frame ({', '.join(f'{v:.0f}' for v in ms[name])}), "
                f"{of_limit(gflop, cpu_ms[name], limits):.2f} of the limit; "
                f"{statistics.median(ratios):.2f}x the original's (per round {', '.join(f'{r:.2f}' for r in ratios)}); "
                f"outputs to {worst:.0e} of scale, top boxes {'identical' if same else 'DIFFERENT'}"
            )
        found = sum(box is not None for box in boxes["the original's"])
        print(f"  post-processing (candidates + top box, the same code for all): {post_ms:.0f} ms/frame; "
              f"{found} of {batch} frames have a top box above 0.5")  # fmt: skip


def _same_box(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """The same integer box, as the pipeline rounds it (`face_detection.api.to_box`)."""
    return (a is None) == (b is None) and (a is None or to_box(a) == to_box(b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="Wav2Lip checkpoint (default: deterministic weights)")
    p.add_argument("--detector", help="S3FD weights (default: deterministic weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=CPU_BATCH_SIZE, help="generator batch (the pipeline's on a CPU)")
    p.add_argument("--frames", type=int, default=None, help="generator frames per round (default: 4 batches/worker)")
    p.add_argument("--det_batch", type=int, default=2, help="S3FD frames a call (the original: one pass)")
    p.add_argument("--s3fd_sizes", nargs="*", choices=S3FD_SIZES, default=list(S3FD_SIZES), help="S3FD frame sizes")
    args = p.parse_args()
    device = torch.device(args.device)
    tune_cpu_allocator()  # as inference does
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint, detector = Path(args.checkpoint or tmp / "w2l.pth"), Path(args.detector or tmp / "s3fd.pth")
        if not args.checkpoint:
            torch.save({"state_dict": det_state_dict("Wav2Lip")}, checkpoint)
        if not args.detector:
            torch.save(det_state_dict("s3fd"), detector)
        w2l_onnx = export(SPECS["wav2lip"], checkpoint, tmp / "wav2lip.onnx")
        s3fd_onnx = export(SPECS["s3fd"], detector, tmp / "s3fd.onnx")
        ways = generator_ways(checkpoint, w2l_onnx, device)
        n_frames = args.frames or 4 * args.batch_size * generator_workers(device)[0]
        print(f"device {device}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
        limits = bench_generator(ways, n_frames, args.batch_size, args.rounds)
        print(f"  the fp32 convolution limit per round (bench.conv_limit): {', '.join(f'{v:.0f}' for v in limits)} "
              "GFLOP/s per core")  # fmt: skip
        sizes = [S3FD_SIZES[name] for name in args.s3fd_sizes]
        bench_s3fd(detector, s3fd_onnx, device, args.det_batch, args.rounds, sizes)


if __name__ == "__main__":
    main()
