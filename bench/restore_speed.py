"""Face restoration on this machine: restored faces/s, the share of the convolution limit, and what bf16
changes, in one run with alternating rounds.

    python -m bench.restore_speed                                  # GFPGAN and CodeFormer, fp32 and bf16
    python -m bench.restore_speed --networks codeformer --faces 4 --rounds 3 --onnx

Each restorer runs as the enhance stage runs it (`lipsync.restorers`): 512×512 faces in chunks of
`--chunk`, chunks side by side on the generation workers (one torch thread each on a CPU), on
deterministic weights and smooth face-like inputs (the speed is real, the faces are not). Per way:

- restored faces/s (wall) and CPU seconds per face; GFLOP per face (torch's FlopCounterMode) over those CPU
  seconds is the share of the fp32 convolution limit (`bench.conv_limit`, measured in every round);
- against fp32 on the same faces: the largest and mean difference in levels, and for CodeFormer the
  share of its 256 code choices that differ, for the stage's precision (bf16 in the generator only) and for
  the whole network in bf16 (`codeformer, all bf16`), which the stage does not use.

`--onnx` adds ONNX Runtime (the export takes minutes on 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run by path (python bench/restore_speed.py): the repository root is not on the path
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import statistics
import tempfile
from functools import partial

import cv2
import numpy as np
import torch

from bench.conv_limit import conv_limit, fraction, gflop_per_item
from bench.onnx_speed import timed
from common.devices import prepare_network, tune_cpu_allocator
from common.onnx_export import export
from lipsync.generation import generator_workers
from lipsync.onnx_models import SPECS, OnnxRestorer
from lipsync.restorers import (
    ARCH,
    BUILD,
    SIZE,
    Restore,
    TorchRestorer,
    load_restorer,
    restored_crops,
    restorer_inputs,
)
from lipsync.threads import ordered_map
from tools.detweights import det_weights_like

FIDELITY = 0.5  # CodeFormer's w, its script's default


def smooth_faces(n: int, seed: int = 0) -> np.ndarray:
    """(n, 512, 512, 3) uint8: smooth colour fields, like a face's low frequencies."""
    coarse = np.random.default_rng(seed).integers(40, 220, (n, 6, 6, 3)).astype(np.float32)
    return (
        np.stack([cv2.resize(c, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC) for c in coarse])
        .clip(0, 255)
        .astype(np.uint8)
    )


class AllBf16:
    """CodeFormer wholly in bf16 (encoder and transformer too): what the stage avoids, for comparison."""

    def __init__(self, path: Path) -> None:
        self.model = prepare_network(load_restorer("codeformer", path), torch.device("cpu"), torch.bfloat16)

    def __call__(self, crops: np.ndarray, fidelity: float) -> np.ndarray:
        with torch.inference_mode():
            x = restorer_inputs(crops, torch.device("cpu"), torch.bfloat16).contiguous(
                memory_format=torch.channels_last
            )
            return restored_crops(self.model.generate(*self.model.encode(x), fidelity))


def codes_of(model: torch.nn.Module, crops: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """CodeFormer's chosen code per cell, (n, 256)."""
    with torch.inference_mode():
        x = restorer_inputs(crops, torch.device("cpu"), dtype).contiguous(memory_format=torch.channels_last)
        return model.encode(x)[1].argmax(-1).numpy()


def ways(name: str, path: Path, onnx_dir: Path | None) -> dict[str, Restore]:
    cpu = torch.device("cpu")
    found: dict[str, Restore] = {"fp32": TorchRestorer(name, path, cpu, torch.float32)}
    found["bf16"] = TorchRestorer(name, path, cpu, torch.bfloat16)
    if name == "codeformer":
        found["all bf16"] = AllBf16(path)
    if onnx_dir is not None:
        out = export(SPECS[name], path, onnx_dir / f"{name}.onnx")
        found["onnxruntime"] = OnnxRestorer(name, out, cpu, generator_workers(cpu)[1])
    return found


def run_chunks(restore: Restore, faces: np.ndarray, chunk: int, workers: int, threads: int) -> None:
    """`restore` over the faces in chunks, side by side on `workers` threads, as the enhance stage runs it."""
    starts = range(0, len(faces), chunk)
    for _ in ordered_map(lambda i: restore(faces[i : i + chunk], FIDELITY), starts, workers, threads):
        pass


def bench_network(name: str, path: Path, args: argparse.Namespace, onnx_dir: Path | None) -> None:
    restorers = ways(name, path, onnx_dir)
    faces = smooth_faces(args.faces)
    outputs = {way: restore(faces[:2], FIDELITY).astype(np.int16) for way, restore in restorers.items()}  # + warm-up
    with torch.device("meta"):
        model = BUILD[name]().eval().requires_grad_(False)
    inputs = (torch.zeros(1, 3, SIZE, SIZE, device="meta"),) + (() if name == "gfpgan" else (FIDELITY,))
    gflop = gflop_per_item(model, *inputs)
    workers, threads = generator_workers(torch.device("cpu"))
    fps: dict[str, list[float]] = {way: [] for way in restorers}
    cpu_s: dict[str, list[float]] = {way: [] for way in restorers}
    limits = []
    for _ in range(args.rounds):
        limits.append(conv_limit())
        for way, restore in restorers.items():
            wall, cpu = timed(partial(run_chunks, restore, faces, args.chunk, workers, threads))
            fps[way].append(len(faces) / wall)
            cpu_s[way].append(cpu / len(faces))
    print(f"{name}: {gflop:.0f} GFLOP/face, {args.faces} faces a round in chunks of {args.chunk}, {workers} x "
          f"{threads} thread(s), {args.rounds} rounds; fp32 limit {statistics.median(limits):.0f} GFLOP/s per core")  # fmt: skip
    for way in restorers:
        share = statistics.median(fraction(gflop, s, lim) for s, lim in zip(cpu_s[way], limits, strict=True))
        diff = np.abs(outputs[way] - outputs["fp32"])
        print(f"  {way:12s} {statistics.median(fps[way]):6.3f} faces/s, CPU {statistics.median(cpu_s[way]):5.2f} s/face "
              f"= {share:.2f} of the fp32 limit; vs fp32: max {diff.max()} levels, mean {diff.mean():.2f}")  # fmt: skip
    if name == "codeformer":
        reference = codes_of(restorers["fp32"].model, faces[:2], torch.float32)
        flips = float((codes_of(restorers["all bf16"].model, faces[:2], torch.bfloat16) != reference).mean())
        print(f"  codes chosen differently from fp32: all bf16 {flips:.1%}; the stage's bf16 0 % (codes in fp32)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--networks", nargs="+", default=["gfpgan", "codeformer"], choices=sorted(BUILD))
    p.add_argument("--faces", type=int, default=4, help="faces a round")
    p.add_argument("--chunk", type=int, default=1, help="faces per restorer call")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--onnx", action="store_true", help="also ONNX Runtime (exports first: minutes)")
    args = p.parse_args()
    tune_cpu_allocator()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.networks:
            path = Path(tmp) / f"{name}.pth"
            with torch.device("meta"):
                skeleton = BUILD[name]()
            torch.save({"params_ema": det_weights_like(skeleton, ARCH[name])}, path)
            bench_network(name, path, args, Path(tmp) if args.onnx else None)
            path.unlink()


if __name__ == "__main__":
    main()
