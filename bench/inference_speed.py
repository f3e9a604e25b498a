"""Inference speed: end-to-end frames/s against the generator alone, and face detection frames/s.

    python bench/inference_speed.py                      # a synthetic 512x512, 8 s clip it makes itself
    python bench/inference_speed.py --face clip.mp4 --audio speech.wav --box 100 400 120 380

- End to end (`--box`, so no detection): decode → crop → generate → paste → encode + mux, timed around the
  call (the model already loaded), next to the generator alone on the same number of frames with the same
  batch size, measured before and after in the same process. Their ratio is the pipeline's efficiency.
- Detection: S3FD frames/s at full resolution, with `det_max_side 640` and with `det_every 5`, on the
  first `--detect_frames` frames of `--detect_face` (default: a synthetic 1280x720 clip). Deterministic
  weights: the speed is real, the boxes are not.

Reference (the original, `--box`, a machine like ours): 10.2 frames/s on a 512x512 8 s clip; the generator
alone 16.6 frames/s at batch 128, 35.6 at batch 32 with a tuned malloc.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lipsync  # noqa: E402
import video  # noqa: E402
from audio import save_wav  # noqa: E402
from inference import restart_with_tuned_malloc  # noqa: E402
from tests.detweights import det_state_dict  # noqa: E402

ORIGINAL_FPS = 10.2  # the original with --box on the 512x512 8 s clip
ORIGINAL_E2E_SHARE = 10.2 / 16.6  # the original's end to end / its generator alone (batch 128), same machine
ORIGINAL_STYLE = """
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from models import Wav2Lip
model, n = Wav2Lip().eval(), int(sys.argv[2])
mel, faces = torch.randn(128, 1, 80, 16), torch.rand(128, 6, 96, 96)
with torch.no_grad():
    model(mel, faces)
    start = time.perf_counter()
    for _ in range(n):
        model(mel, faces)
print(n * 128 / (time.perf_counter() - start))
"""


def original_style_generator_fps(batches: int = 2) -> float:
    """The generator as the original ran it (NCHW, batch 128, glibc's default malloc), in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    repo = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", ORIGINAL_STYLE, repo, str(batches)], env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


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


def generator_fps(sync: lipsync.LipSync, n_frames: int, batch_size: int) -> float:
    """The network alone on `n_frames` frames in batches of `batch_size`, inputs prepared in advance."""
    img = sync.hp.img_size
    faces = np.random.default_rng(0).integers(0, 256, (batch_size, img, img, 3), dtype=np.uint8)
    mels = np.zeros((batch_size, 1, 80, 16), np.float32)
    with torch.inference_mode():
        sync.model(*lipsync.generator_inputs(faces[:2], mels[:2], sync.device, sync.dtype))  # warm-up
        start, done = time.perf_counter(), 0
        while done < n_frames:
            n = min(batch_size, n_frames - done)
            inputs = lipsync.generator_inputs(faces[:n], mels[:n], sync.device, sync.dtype)
            lipsync.to_uint8(sync.model(*(x.contiguous(memory_format=sync.memory_format) for x in inputs)))
            done += n
    return n_frames / (time.perf_counter() - start)


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
    p.add_argument("--skip_detection", action="store_true")
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
        sync = lipsync.LipSync(checkpoint, args.device, detector_path=detector_weights, quiet=True)
        load_seconds = time.perf_counter() - loaded
        info = video.probe(face)
        box = args.box or [info.height // 4, info.height * 3 // 4, info.width // 4, info.width * 3 // 4]
        batch_size = args.batch_size or (128 if sync.device.type == "cuda" else lipsync.CPU_BATCH_SIZE)

        n_probe = 4 * batch_size
        cpu0 = time.process_time()
        gen_before = generator_fps(sync, n_probe, batch_size)
        cpu1 = time.process_time()
        summary = sync(face, speech, tmp / "out.mp4", box=box, quiet=True, wav2lip_batch_size=batch_size)
        cpu2 = time.process_time()
        gen_after = generator_fps(sync, n_probe, batch_size)
        cpu3 = time.process_time()
        gen_cpu = (cpu1 - cpu0 + cpu3 - cpu2) / (2 * n_probe)  # CPU seconds per frame, all threads
        e2e_cpu = (cpu2 - cpu1) / summary.frames
        gen = (gen_before + gen_after) / 2
        print(f"clip: {face.name} {info.width}x{info.height} @ {float(info.fps):.2f} fps, {summary.frames} frames")
        print(f"device: {sync.device}, generator batch {batch_size}, torch threads {torch.get_num_threads()}")
        print(f"end to end (--box):      {summary.fps:6.1f} frames/s ({summary.elapsed:.1f} s)")
        with_load = summary.frames / (summary.elapsed + load_seconds)
        print(f"  with model loading:    {with_load:6.1f} frames/s (+{load_seconds:.1f} s)")
        print(f"generator only:          {gen:6.1f} frames/s (before {gen_before:.1f}, after {gen_after:.1f})")
        print(f"pipeline efficiency:     {summary.fps / gen:6.2f}  (end to end / generator only; target >= 0.7)")
        print(f"CPU time per frame:      {e2e_cpu * 1000:6.0f} ms end to end, {gen_cpu * 1000:.0f} ms generator only "
              f"(ratio {gen_cpu / e2e_cpu:.2f}: the efficiency, unaffected by other processes)")  # fmt: skip
        print(
            f"vs the original:         {summary.fps / ORIGINAL_FPS:6.2f}x (its {ORIGINAL_FPS} frames/s on the reference machine)"
        )
        if sync.device.type == "cpu":
            base = original_style_generator_fps()
            print(
                f"original-style generator {base:6.1f} frames/s (NCHW, batch 128, default malloc; same machine, same run)"
            )
            print(f"  end to end / that:     {summary.fps / base:6.2f}x  (a floor: the original's end to end is slower "
                  f"than its generator)")  # fmt: skip
            print(f"  estimated speed-up:    {summary.fps / (base * ORIGINAL_E2E_SHARE):6.2f}x  (the original's end "
                  f"to end ran at {ORIGINAL_E2E_SHARE:.2f} of its generator alone; target >= 2)")  # fmt: skip

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
            opts = lipsync.Options(**options)
            source = lipsync.FrameSource(det_info, opts)
            start = time.perf_counter()
            sync.detect(source, lipsync.Options(quiet=True, **options), args.detect_frames)
            fps = args.detect_frames / (time.perf_counter() - start)
            print(f"  {label:20s} {fps:6.2f} frames/s")


if __name__ == "__main__":
    restart_with_tuned_malloc()  # as inference.py does; both measurements below share the allocator
    main()
