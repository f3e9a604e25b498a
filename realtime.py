"""A live avatar: speech in, chunk by chunk, lip-synced frames out within a fraction of a second.

    # file mode: feed a speech file through the stream (at the pace it is spoken, or --pace fast)
    python realtime.py --checkpoint_path checkpoints/wav2lip_gan.pth --face face.mp4 --audio speech.wav \
        --outfile results/live.mp4 [--chunk_ms 20] [--pace realtime|fast]
    # server mode: a WebRTC page at http://127.0.0.1:8080/ (microphone, files, interrupt)
    python realtime.py --serve --host 127.0.0.1 --port 8080 --checkpoint_path checkpoints/wav2lip_gan.pth \
        --face face.mp4 --box 60 400 120 380

File mode prints, as its last line, one JSON object: frames, generated, dropped, idle, errors, fps,
generated_fps, first_frame_ms, latency_ms (p50, p95, max) and precision. The inference flags that apply are
inference.py's (built from options.py); see README.md, "Realtime".
"""

from __future__ import annotations

import argparse
import gc
import json

from common.errors import UserError, run_cli
from hparams import add_hparams_argument, from_argument
from lipsync.options import DEFAULT_OUTFILE, ModelOptions, Options, add_arguments, from_namespace
from live.options import LIVE_DEFAULTS, LiveOptions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Lip-sync a live stream of speech: a file fed chunk by chunk, or a "
                                "WebRTC server")  # fmt: skip
    p.add_argument("--face", required=True, help="the avatar: a video (looped forward) or an image")
    p.add_argument("--audio", help="file mode: the speech to feed through the stream")
    p.add_argument("--outfile", default=DEFAULT_OUTFILE, help="file mode: output video (H.264 + AAC)")
    add_arguments(p, ModelOptions, required=("checkpoint_path",))
    add_arguments(p, Options, defaults={"idle": None})  # resolved in main(): the mode decides it
    add_arguments(p, LiveOptions)
    add_hparams_argument(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    live = LiveOptions(**from_namespace(LiveOptions, args))
    if not live.serve and not args.audio:
        raise UserError("give --audio (file mode) or --serve (server mode)")
    from lipsync.pipeline import LipSync
    from live.sessions import single_threaded_blas

    single_threaded_blas()
    sync = LipSync(ModelOptions(**from_namespace(ModelOptions, args)), hp=from_argument(args.hparams), quiet=args.quiet)
    sync.ready()  # a bad checkpoint is reported before the avatar's face detection
    options = from_namespace(Options, args)
    # the server's avatar keeps its face while nobody speaks; file mode replays inference.py's frames, by default
    # every one generated as the original does (it is the comparison file mode exists for)
    options["idle"] = options["idle"] or (LIVE_DEFAULTS["idle"] if live.serve else Options().idle)
    if live.serve or live.pace == "realtime":
        from live.stream import check_live_budget

        check_live_budget(sync, live.budget)  # super-resolution on a CPU cannot make a frame in time: refused
    if live.serve:
        from live.webrtc import serve

        serve(sync, args.face, live, options)
        return
    from live.replay import replay

    figures = replay(sync, args.face, args.audio, args.outfile, live, **(options | {"quiet": True}))
    print(json.dumps(figures))


if __name__ == "__main__":
    run_cli(main)
    gc.freeze()
