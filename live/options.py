"""realtime.py's own settings, declared once: the live sessions' latency budget and batching, the server's
address and capacity, and file mode's chunking and pace.

The clip options (`--box`, `--pads`, `--idle`, `--silence_db`, ...) are inference.py's, from
`lipsync.options.Options`; a live avatar only starts from other defaults (`LIVE_DEFAULTS`: idle keeps the
source face). `realtime.py` builds its flags from both with `add_arguments`, and the Python API takes
`LiveOptions` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import UserError
from common.flags import option
from lipsync.options import check_choices

PACES = ("realtime", "fast")
LIVE_DEFAULTS = {"idle": "keep"}  # a live avatar shows its source face while nobody speaks
DEFAULT_PORT = 8080


@dataclass(frozen=True)
class LiveOptions:
    """How live sessions run (every mode), how the server serves, and how file mode feeds its speech."""

    latency_budget_ms: float = option(
        500.0, "a frame not generated within this time of its audio is dropped (the last one repeats)"
    )
    live_batch: int = option(
        4,
        "frames per generator call in realtime pace and server mode (a frame waits up to a quarter of the budget "
        "for a full batch: more frames a second; the display delay is the same)",
    )
    serve: bool = option(False, "start the WebRTC server instead of file mode")
    host: str = option("127.0.0.1", "server mode: address to listen on")
    port: int = option(DEFAULT_PORT, "server mode: port to listen on")
    max_sessions: int = option(8, "server mode: connections served at once")
    chunk_ms: float = option(20.0, "file mode: milliseconds of audio per chunk")
    pace: str = option(
        "realtime", "file mode: feed chunks as they would be spoken, or as fast as possible (the frames are then "
        "inference.py's, bit for bit)", choices=PACES,
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("latency_budget_ms", "live_batch", "max_sessions", "chunk_ms"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")

    @property
    def budget(self) -> float:
        """The latency budget in seconds."""
        return self.latency_budget_ms / 1000
