"""Realtime: first-frame time, latency p50/p95 and sustained fps of 1, 2 and 4 live sessions on this machine,
with the generator alone beside them as the limit.

    python -m bench.realtime                       # a synthetic 512x512 avatar, --box, 20 s of speech each
    python -m bench.realtime --seconds 60 --sessions 1 4
    python -m bench.realtime --precision bf16       # the generator in bf16 (on a CPU that computes it)

Each session is a `live.LiveSession` fed 20 ms chunks at the pace they are spoken, all sharing one
`live.Engine` (deterministic weights: the speed is real, the faces are not); a display thread takes each
session's frame at each tick, as the server's video tracks do (without their VP8 encoding). Figures:
- first frame: from the first chunk fed to the first generated frame ready (look-ahead 212.5 ms included);
- latency: from feeding the chunk that completed a frame's mel window to the frame being ready;
- fps: generated frames per second of speech, all sessions together, against the generator alone with the
  same batch and workers (the limit), and with the offline run's batches;
- growth: latency p95 over the stream's last 5 s against its 5-10 s.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run by path (python bench/realtime.py): the repository root is not on the path
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import tempfile
import threading
import time

import numpy as np
import torch

import audio
import lipsync
from bench.inference_speed import generator_fps, host_busy_seconds, synthetic_clip
from common.devices import PRECISIONS
from lipsync.options import ModelOptions
from live.figures import precision
from live.options import LiveOptions
from live.sessions import LiveSession, SharedGenerator, single_threaded_blas
from live.stream import LOOKAHEAD_S, prepare_avatar
from tools.detweights import det_state_dict

CHUNK_S = 0.02


def run_sessions(sync, avatar, wav: np.ndarray, n: int, budget_ms: float, batch: int) -> dict:
    """`n` sessions saying `wav` at once, in real time; their figures."""
    shared = SharedGenerator(sync.generator, batch, clock=time.perf_counter, hp=sync.hp)
    chunk = round(CHUNK_S * sync.hp.sample_rate)
    t0 = time.perf_counter()
    start = t0 + CHUNK_S + LOOKAHEAD_S + budget_ms / 1000
    live = LiveOptions(latency_budget_ms=budget_ms, live_batch=batch)
    sessions = [LiveSession(avatar, shared, live, start=start) for _ in range(n)]
    for s in sessions:
        s.begin(first_tick=0)
    n_frames = int(len(wav) / sync.hp.sample_rate * avatar.fps)

    def show() -> None:
        for tick in range(n_frames):
            delay = sessions[0].display_time(tick) - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            for s in sessions:
                s.next_frame()

    viewer = threading.Thread(target=show)
    viewer.start()
    for i in range(0, len(wav), chunk):
        delay = t0 + (i + chunk) / sync.hp.sample_rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        for s in sessions:
            s.feed(wav[i : i + chunk])
    viewer.join()
    shared.close()
    return figures(sessions, len(wav) / sync.hp.sample_rate)


def figures(sessions: list[LiveSession], seconds: float) -> dict:
    latencies = [np.array(s.stats.latencies) * 1000 for s in sessions]
    every = np.concatenate(latencies)
    firsts = [(s.stats.first_ready - s.stats.first_feed) * 1000 for s in sessions if s.stats.first_ready]
    per_second = [len(lat) / seconds for lat in latencies]
    early = np.concatenate([lat[int(5 * r) : int(10 * r)] for lat, r in zip(latencies, per_second, strict=True)])
    late = np.concatenate([lat[-int(5 * r) :] for lat, r in zip(latencies, per_second, strict=True)])
    return {
        "first_ms": max(firsts) if firsts else float("nan"),
        "p50": np.percentile(every, 50), "p95": np.percentile(every, 95), "max": every.max(),
        "fps": sum(s.stats.generated for s in sessions) / seconds,
        "dropped": sum(s.stats.dropped for s in sessions) / max(1, sum(s.stats.speech_frames for s in sessions)),
        "early_p95": np.percentile(early, 95) if len(early) else float("nan"),
        "late_p95": np.percentile(late, 95) if len(late) else float("nan"),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of speech each session says")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--size", type=int, default=512, help="the avatar's width and height")
    p.add_argument("--budget_ms", type=float, default=LiveOptions().latency_budget_ms)
    p.add_argument("--batch", type=int, default=LiveOptions().live_batch, help="frames per generator call (live)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="the generator's (ModelOptions.precision)")
    args = p.parse_args()
    single_threaded_blas()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        face, speech = synthetic_clip(folder, 4.0, args.size, args.size)
        checkpoint = folder / "wav2lip_det.pth"
        torch.save({"state_dict": det_state_dict("Wav2Lip")}, checkpoint)
        model = ModelOptions(checkpoint_path=checkpoint, device="cpu", precision=args.precision)
        sync = lipsync.LipSync(model, quiet=True)
        quarter = args.size // 4
        avatar = prepare_avatar(sync, face, box=(quarter, 3 * quarter, quarter, 3 * quarter), quiet=True)
        wav = np.tile(audio.load_wav(speech, sync.hp.sample_rate), int(np.ceil(args.seconds / 4.0)))
        wav = wav[: int(args.seconds * sync.hp.sample_rate)]
        offline, _ = generator_fps(sync, 64, sync.generator.default_batch_size)
        alone, _ = generator_fps(sync, 32, args.batch)
        print(f"avatar {args.size}x{args.size}, --box, {args.seconds:g} s of speech per session, budget "
              f"{args.budget_ms:g} ms, {torch.get_num_threads()} cores, generator in {precision(sync)}")  # fmt: skip
        print(f"generator alone: {alone:.1f} frames/s at batch {args.batch} (the limit); {offline:.1f} at the "
              f"offline batch {sync.generator.default_batch_size}")  # fmt: skip
        print("sessions  first frame  latency p50   p95    max   fps (all)  vs alone  dropped  p95 5-10 s  last 5 s"
              "  host load (other processes)")  # fmt: skip
        for n in args.sessions:
            host, own, start = host_busy_seconds(), time.process_time(), time.perf_counter()
            f = run_sessions(sync, avatar, wav, n, args.budget_ms, args.batch)
            others = (host_busy_seconds() - host - (time.process_time() - own)) / (time.perf_counter() - start)
            print(f"{n:8d}  {f['first_ms']:8.0f} ms  {f['p50']:8.0f} ms {f['p95']:5.0f} {f['max']:6.0f}  "
                  f"{f['fps']:9.1f}  {f['fps'] / alone:8.2f}  {f['dropped']:6.0%}  {f['early_p95']:7.0f} ms "
                  f"{f['late_p95']:6.0f} ms  {max(0.0, others):.2f} cores")  # fmt: skip


if __name__ == "__main__":
    main()
