"""A live avatar: speech in, chunk by chunk, lip-synced frames out within a fraction of a second.

    # file mode: feed a speech file through the stream (at the pace it is spoken, or --pace fast)
    python realtime.py --checkpoint_path checkpoints/wav2lip_gan.pth --face face.mp4 --audio speech.wav \
        --outfile results/live.mp4 [--chunk_ms 20] [--pace realtime|fast]
    # server mode: a WebRTC page at http://127.0.0.1:8080/ (microphone, files, interrupt)
    python realtime.py --serve --host 127.0.0.1 --port 8080 --checkpoint_path checkpoints/wav2lip_gan.pth \
        --face face.mp4 --box 60 400 120 380

File mode prints, as its last line, one JSON object: frames, dropped, fps, first_frame_ms and latency_ms
(p50, p95, max). The inference flags that apply are inference.py's (built from options.py); see README.md,
"Realtime".
"""

from __future__ import annotations

import argparse
import gc
import json

from errors import UserError, run_cli
from hparams import add_hparams_argument, from_argument
from live import DEFAULT_BUDGET_MS, DEFAULT_SILENCE_DB, IDLE_CHOICES, LIVE_BATCH
from options import DEFAULT_OUTFILE, ModelOptions, Options, add_arguments, from_namespace
from replay import PACES

DEFAULT_PORT = 8080


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Lip-sync a live stream of speech: a file fed chunk by chunk, or a "
                                "WebRTC server")  # fmt: skip
    p.add_argument("--face", required=True, help="the avatar: a video (looped forward) or an image")
    add_arguments(p, ModelOptions, required=("checkpoint_path",))
    add_arguments(p, Options)
    add_hparams_argument(p)
    p.add_argument("--audio", help="file mode: the speech to feed through the stream")
    p.add_argument("--outfile", default=DEFAULT_OUTFILE, help="file mode: output video (H.264 + AAC)")
    p.add_argument("--chunk_ms", type=float, default=20.0, help="file mode: milliseconds of audio per chunk")
    p.add_argument("--pace", choices=PACES, default="realtime",
                   help="file mode: feed chunks as they would be spoken, or as fast as possible (the frames are "
                   "then inference.py's, bit for bit)")  # fmt: skip
    p.add_argument("--serve", action="store_true", help="start the WebRTC server instead of file mode")
    p.add_argument("--host", default="127.0.0.1", help="server mode: address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="server mode: port to listen on")
    p.add_argument("--max_sessions", type=int, default=8, help="server mode: connections served at once")
    p.add_argument(
        "--latency_budget_ms",
        type=float,
        default=DEFAULT_BUDGET_MS,
        help="a frame not generated within this time of its audio is dropped (the last one repeats)",
    )
    p.add_argument(
        "--idle",
        choices=IDLE_CHOICES,
        default="source",
        help="while no speech arrives: show the source frames, or generate frames of silence",
    )
    p.add_argument(
        "--silence_db",
        type=float,
        default=DEFAULT_SILENCE_DB,
        help="a frame whose 200 ms of audio is quieter than this (RMS, dB full scale) counts as idle",
    )
    p.add_argument(
        "--live_batch",
        type=int,
        default=LIVE_BATCH,
        help="frames per generator call in realtime pace and server mode (more: faster, later)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not args.serve and not args.audio:
        raise UserError("give --audio (file mode) or --serve (server mode)")
    if min(args.latency_budget_ms, args.live_batch, args.chunk_ms, args.max_sessions) <= 0:
        raise UserError("--latency_budget_ms, --chunk_ms, --live_batch and --max_sessions must be positive")
    from lipsync import LipSync
    from live import single_threaded_blas

    single_threaded_blas()
    model = {k: v for k, v in from_namespace(ModelOptions, args).items() if k != "checkpoint_path"}
    sync = LipSync(args.checkpoint_path, hp=from_argument(args.hparams), quiet=args.quiet, cache_dir=args.cache_dir,
                   **model)  # fmt: skip
    live = {"budget_ms": args.latency_budget_ms, "idle": args.idle, "silence_db": args.silence_db,
            "batch": args.live_batch}  # fmt: skip
    options = from_namespace(Options, args)
    if args.serve:
        from webrtc_server import serve

        serve(sync, args.face, args.host, args.port, live, options, args.max_sessions)
        return
    from replay import replay

    options["quiet"] = True
    figures = replay(sync, args.face, args.audio, args.outfile, pace=args.pace, chunk_ms=args.chunk_ms, **live,
                     **options)  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    run_cli(main)
    gc.freeze()
