"""Wav2Lip-HQ on this machine: super-resolved faces/s the enhance stage's way (chunks side by side on the
generation workers) against the fork's (one face at a time on the calling thread), in fp32 and bf16; the
face parser's parses/s; and the whole pipeline's frames/s with and without the HQ networks; one run,
alternating rounds.

    python -m bench.hq_speed                      # 4 faces a round, 2 rounds: a few minutes on 2 cores
    python -m bench.hq_speed --faces 8 --rounds 3 --frames 16

ESRGAN is the fork's size (RRDBNet ×4, 64 features, 23 blocks) on 96×96 faces, the parser BiSeNet at
512×512, both with tools/detweights.py's stand-in weights (the speed is real, the faces are not). GFLOP per
face (torch's FlopCounterMode) over the CPU seconds per face is the share of the fp32 convolution limit
(`bench.conv_limit`, measured in every round). bf16 rows run only where `common.devices.cpu_computes_bf16`
(AVX512-BF16 or AMX); their largest difference from fp32 is given in levels of the uint8 output.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run by path (python bench/hq_speed.py): the repository root is not on the path
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial

import av
import numpy as np
import torch

from audio import save_wav
from bench.conv_limit import conv_limit, fraction, gflop_per_item
from bench.onnx_speed import timed
from common.devices import cpu_computes_bf16, tune_cpu_allocator
from lipsync.face_parsing import TorchParser
from lipsync.generation import generator_workers
from lipsync.options import ModelOptions
from lipsync.pipeline import LipSync
from lipsync.super_resolution import CPU_CHUNK, SuperResolve, TorchSR
from lipsync.threads import ordered_map
from models.bisenet import BiSeNet
from models.rrdbnet import RRDBNet
from tools.detweights import det_state_dict, parser_stand_in, sr_stand_in

CPU = torch.device("cpu")
BOX = (16, 112, 24, 120)  # top, bottom, left, right in the bench's 160×128 frames


def faces_like(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) float32 in 0-255: smooth random fields, as a generated face reaches ESRGAN."""
    coarse = np.random.default_rng(seed).uniform(30, 225, (n, 3, 6, 6)).astype(np.float32)
    fields = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(size, size), mode="bicubic")
    return fields.clamp(0, 255).permute(0, 2, 3, 1).contiguous().numpy()


def one_at_a_time(forward: Callable[[np.ndarray], np.ndarray], faces: np.ndarray) -> None:
    """The fork's way: each face alone, on the calling thread with every core."""
    for face in faces:
        forward(face[None])


def on_workers(forward: Callable[[np.ndarray], np.ndarray], faces: np.ndarray, chunk: int) -> None:
    """The enhance stage's way: chunks of `chunk` faces side by side on the generation workers."""
    workers, threads = generator_workers(CPU)
    for _ in ordered_map(lambda i: forward(faces[i : i + chunk]), range(0, len(faces), chunk), workers, threads):
        pass


def rate_rows(ways: dict[str, Callable[[], None]], n: int, gflop: float, rounds: int) -> dict[str, tuple]:
    """way → (items/s, CPU s per item, share of the limit): medians over `rounds` alternating rounds."""
    fps: dict[str, list[float]] = {w: [] for w in ways}
    cpu: dict[str, list[float]] = {w: [] for w in ways}
    limits = []
    for _ in range(rounds):
        limits.append(conv_limit())
        for way, run in ways.items():
            wall, seconds = timed(run)
            fps[way].append(n / wall)
            cpu[way].append(seconds / n)
    print(f"  fp32 convolution limit this run: {statistics.median(limits):.0f} GFLOP/s per core")
    return {w: (statistics.median(fps[w]), statistics.median(cpu[w]),
                statistics.median(fraction(gflop, s, lim) for s, lim in zip(cpu[w], limits, strict=True)))
            for w in ways}  # fmt: skip


def bench_sr(folder: Path, args: argparse.Namespace) -> None:
    path = folder / "esrgan.pth"
    torch.save({"params": sr_stand_in(RRDBNet())}, path)
    dtypes = {"fp32": torch.float32} | ({"bf16": torch.bfloat16} if cpu_computes_bf16() else {})
    nets = {name: TorchSR(path, CPU, dtype) for name, dtype in dtypes.items()}
    faces = faces_like(args.faces, 96)
    ways = {"fork's way: 1 face at a time, fp32": partial(one_at_a_time, nets["fp32"], faces)}
    for name, net in nets.items():
        step = SuperResolve(net, CPU_CHUNK)
        ways[f"stage: chunks of {CPU_CHUNK} on the workers, {name}"] = partial(on_workers, step, faces, CPU_CHUNK)
    outputs = {name: net(faces[:2]).astype(np.int16) for name, net in nets.items()}  # and the warm-up
    with torch.device("meta"):
        gflop = gflop_per_item(RRDBNet().eval(), torch.zeros(1, 3, 96, 96))
    rows = rate_rows(ways, len(faces), gflop, args.rounds)
    print(f"ESRGAN ×4 (64/23/32) on 96×96: {gflop:.0f} GFLOP/face; {len(faces)} faces a round, {args.rounds} rounds")
    report(rows, "faces/s", next(iter(rows)))
    if "bf16" in outputs:
        diff = np.abs(outputs["bf16"] - outputs["fp32"])
        print(f"  bf16 vs fp32 (384×384 uint8): max {diff.max()} levels, mean {diff.mean():.2f}")


def bench_parser(folder: Path, args: argparse.Namespace) -> None:
    path = folder / "bisenet.pth"
    torch.save(parser_stand_in(BiSeNet()), path)
    parser = TorchParser(path, CPU, torch.float32)
    crops = faces_like(args.faces, 512).astype(np.uint8)
    parser(crops[:1])  # warm-up
    ways = {"fork's way: 1 crop at a time": partial(one_at_a_time, parser, crops),
            "stage: chunks of 2 on the workers": partial(on_workers, parser, crops, 2)}  # fmt: skip
    with torch.device("meta"):
        model = BiSeNet().eval()
    gflop = gflop_per_item(_ParseOnly(model), torch.zeros(1, 3, 512, 512, device="meta"))
    print(f"face parser (BiSeNet) at 512×512: {gflop:.0f} GFLOP/parse")
    report(rate_rows(ways, len(crops), gflop, args.rounds), "parses/s", next(iter(ways)))


class _ParseOnly(torch.nn.Module):
    def __init__(self, model: BiSeNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.parse(x)


def report(rows: dict[str, tuple], unit: str, baseline: str) -> None:
    for way, (rate, cpu, share) in rows.items():
        print(f"  {way:48s} {rate:6.3f} {unit}, CPU {cpu:5.2f} s each = {share:.2f} of the fp32 limit, "
              f"{rate / rows[baseline][0]:.2f}× the fork's way")  # fmt: skip


def write_clip(folder: Path, frames: int) -> tuple[Path, Path]:
    """A 160×128 video of smooth moving colours and a speech-like buzz as long: the pipeline's input."""
    video, speech = folder / "face.mp4", folder / "speech.wav"
    with av.open(str(video), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 160, 128, "yuv420p"
        for i, face in enumerate(faces_like(frames, 160)[:, :128].astype(np.uint8)):
            frame = av.VideoFrame.from_ndarray(face, format="bgr24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    t = np.arange(int(frames / 25 * 16000)) / 16000
    save_wav((0.3 * np.sin(2 * np.pi * 150 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))).astype(np.float32),
             speech, 16000)  # fmt: skip
    return video, speech


def bench_pipeline(folder: Path, args: argparse.Namespace) -> None:
    """frames/s of the whole command (`--box`, CPU, fp32) for the original paste, the mask and both networks."""
    checkpoint = folder / "wav2lip.pth"
    torch.save({"state_dict": det_state_dict("Wav2Lip")}, checkpoint)
    video, speech = write_clip(folder, args.frames)
    hq = {"sr_path": str(folder / "esrgan.pth"), "segmentation_path": str(folder / "bisenet.pth")}
    configs = {"original (no HQ network)": {}, "mask alone": {"segmentation_path": hq["segmentation_path"]},
               "ESRGAN + mask (the fork's default)": hq}  # fmt: skip
    print(f"whole command, {args.frames} frames of 160×128, --box {' '.join(map(str, BOX))}, CPU fp32:")
    for name, paths in configs.items():
        sync = LipSync(ModelOptions(checkpoint_path=str(checkpoint), device="cpu", **paths), quiet=True)
        started = time.perf_counter()
        summary = sync(video, speech, folder / "out.mp4", box=BOX, quiet=True)
        print(f"  {name:38s} {summary.frames / (time.perf_counter() - started):6.2f} frames/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faces", type=int, default=4, help="faces a round (ESRGAN and the parser)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--frames", type=int, default=8, help="frames of the whole-pipeline run (0: skip it)")
    args = p.parse_args()
    tune_cpu_allocator()
    with tempfile.TemporaryDirectory() as tmp:
        bench_sr(Path(tmp), args)
        bench_parser(Path(tmp), args)
        if args.frames:
            bench_pipeline(Path(tmp), args)


if __name__ == "__main__":
    main()
