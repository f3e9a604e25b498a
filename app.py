"""The web app: a Gradio page over the same pipeline as inference.py, for a GPU box shared with colleagues.

    python app.py [--checkpoint_path CK] [--detector_path S3FD] [--syncnet_model M] [--host H] [--port P] [--share]

What the command line cannot show: a preview of the face box and of the mouth region the generator redraws
(to tune --pads, --crop and --box by eye), progress through the stages, Cancel, and the result's LSE-D / LSE-C
next to the input's. The page lives in webapp/: its controls come from the one declaration of options
(lipsync/options.py), as inference.py's flags do; `/lipsync` takes them as keyword inputs named like the
flags (for `gradio_client`).
"""

from __future__ import annotations

import argparse
import signal

from common.errors import run_cli
from lipsync.options import ModelOptions, add_arguments
from webapp.controls import CHECKPOINT_DIR

SYNCNET_DEFAULT = CHECKPOINT_DIR / "syncnet_v2.model"  # used when present and --syncnet_model is not given
MAX_UPLOAD = "200mb"  # the largest upload Gradio accepts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Wav2Lip in the browser: preview, progress, queue, LSE scores")
    add_arguments(p, ModelOptions, only=("checkpoint_path", "detector_path"))
    p.add_argument("--syncnet_model", default=str(SYNCNET_DEFAULT) if SYNCNET_DEFAULT.is_file() else None,
                   help="syncnet_v2.model: show each result's LSE-D / LSE-C next to its input's")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C: the server closes, files go
    from webapp.page import build_app

    demo = build_app(args.checkpoint_path, args.detector_path, args.syncnet_model)
    # quiet: Gradio's own lines would tell a user to "set `share=True` in `launch()`"; ours name the flag
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD,
                quiet=True, prevent_thread_lock=True)  # fmt: skip
    print(served_line(demo.local_url, args.share), flush=True)
    demo.block_thread()


def served_line(local_url: str, shared: bool) -> str:
    """Where the page is served, and (unless `shared`: Gradio prints the public link itself) how to share it:
    with this command's flag, not Gradio's `launch()` argument."""
    line = f"* Running on local URL: {local_url}"
    return line if shared else f"{line}\n* To create a public link, run app.py with --share."


if __name__ == "__main__":
    run_cli(main)
