"""ONNX Runtime against PyTorch, in one run with alternating rounds: the generator alone, and S3FD's forward pass.

    python -m bench.onnx_speed                       # deterministic weights; CPU
    python -m bench.onnx_speed --checkpoint checkpoints/wav2lip_gan.pth --rounds 7

- Generator alone: `--frames` faces in the pipeline's batch layout (`generation.batch_sizes`, the CPU's
  worker threads, `Generator.predict` / `OnnxGenerator.predict`), frames/s and CPU ms per frame. A third
  way, one ONNX Runtime session run using every thread on one batch at a time, shows why the pipeline's
  layout (batches side by side, one thread each) is kept.
- S3FD: the network's forward pass alone at 512x512, `--det_batch` frames a call, ms per frame, torch
  against ONNX Runtime, both with every thread; the outputs are checked identical to 1e-4 of their scale.

Each round times every way once, in turn; medians and per-round ratios are printed. Deterministic
weights: the speed is real, the faces are not.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

import onnx_backend
from devices import tune_cpu_allocator
from face_detection.detection.sfd import load_net
from generation import CPU_BATCH_SIZE, Generator, batch_sizes, generator_workers
from streams import ordered_map
from tools.detweights import det_state_dict

S3FD_SIDE = 512  # the frame size of the S3FD timings


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
    whole = onnx_backend.OnnxGenerator(onnx_path, device, quiet=True, threads=workers * threads)
    return {
        "torch": (Generator(checkpoint, device, quiet=True).predict, workers, threads),
        "onnxruntime": (onnx_backend.OnnxGenerator(onnx_path, device, quiet=True).predict, workers, threads),
        "onnxruntime, 1 batch x all threads": (whole.predict, 1, workers * threads),
    }


def bench_generator(ways: dict[str, tuple], n_frames: int, batch_size: int, rounds: int) -> None:
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (batch_size, 96, 96, 3), dtype=np.uint8)
    mels = rng.standard_normal((batch_size, 1, 80, 16)).astype(np.float32)
    outputs = {name: predict(faces, mels) for name, (predict, _, _) in ways.items()}  # also the warm-up
    ref = outputs["torch"].astype(np.int16)
    levels = {name: int(np.abs(out - ref).max()) for name, out in outputs.items()}
    fps: dict[str, list[float]] = {name: [] for name in ways}
    cpu_ms: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, (predict, workers, threads) in ways.items():
            sizes = batch_sizes(n_frames, batch_size, workers)
            wall, cpu = timed(partial(run_batches, predict, faces, mels, sizes, workers, threads))
            fps[name].append(n_frames / wall)
            cpu_ms[name].append(1000 * cpu / n_frames)
    print(f"generator alone: {n_frames} frames in batches of <= {batch_size}, {rounds} rounds")
    for name, (_, workers, threads) in ways.items():
        ratios = [a / b for a, b in zip(fps[name], fps["torch"], strict=True)]
        print(
            f"  {name:36s} {statistics.median(fps[name]):6.1f} frames/s ({workers} x {threads} thread(s)), "
            f"CPU {statistics.median(cpu_ms[name]):5.0f} ms/frame, vs torch {statistics.median(ratios):.2f}x "
            f"(per round {', '.join(f'{r:.2f}' for r in ratios)}); max |diff| {levels[name]} levels"
        )


def bench_s3fd(weights: Path, onnx_path: Path, device: torch.device, batch: int, rounds: int) -> None:
    net = load_net(weights, device)
    onnx_net = onnx_backend.OnnxNet(onnx_backend.open_session(onnx_path, "s3fd", device, torch.get_num_threads()))
    x = torch.rand(batch, 3, S3FD_SIDE, S3FD_SIDE, generator=torch.Generator().manual_seed(0)) * 255 - 120
    x = x.to(device)
    with torch.no_grad():
        ways = {"torch": lambda: net(x), "onnxruntime": lambda: onnx_net(x)}
        outputs = {name: fn() for name, fn in ways.items()}  # also the warm-up
        worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*outputs.values(), strict=True))
        ms: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(rounds):
            for name, fn in ways.items():
                ms[name].append(1000 * timed(fn)[0] / batch)
    ratios = [a / b for a, b in zip(ms["torch"], ms["onnxruntime"], strict=True)]
    print(f"S3FD forward pass, {S3FD_SIDE}x{S3FD_SIDE}, {batch} frames a call, {torch.get_num_threads()} thread(s):")
    for name in ways:
        print(f"  {name:12s} {statistics.median(ms[name]):7.1f} ms/frame ({', '.join(f'{v:.0f}' for v in ms[name])})")
    print(
        f"  onnxruntime speed-up {statistics.median(ratios):.2f}x (per round {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    status = "identical" if worst <= onnx_backend.VERIFY_RTOL else "DIFFERENT"
    print(f"  outputs {status} to 1e-4: max |diff| / scale {worst:.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="Wav2Lip checkpoint (default: deterministic weights)")
    p.add_argument("--detector", help="S3FD weights (default: deterministic weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=CPU_BATCH_SIZE, help="generator batch (the pipeline's on a CPU)")
    p.add_argument("--frames", type=int, default=None, help="generator frames per round (default: 4 batches/worker)")
    p.add_argument("--det_batch", type=int, default=2, help="S3FD frames per forward pass")
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
        w2l_onnx = onnx_backend.export("wav2lip", checkpoint, tmp / "wav2lip.onnx")
        s3fd_onnx = onnx_backend.export("s3fd", detector, tmp / "s3fd.onnx")
        ways = generator_ways(checkpoint, w2l_onnx, device)
        n_frames = args.frames or 4 * args.batch_size * generator_workers(device)[0]
        print(f"device {device}, torch {torch.__version__}, onnxruntime {onnx_backend.ort.__version__}")
        bench_generator(ways, n_frames, args.batch_size, args.rounds)
        bench_s3fd(detector, s3fd_onnx, device, args.det_batch, args.rounds)


if __name__ == "__main__":
    main()
