"""What a live session reports: its frames by kind (generated, dropped, idle), the generator's failures on
its frames, and each generated frame's latency; summarised alike for file mode's last line and the
server's /health, which also say the precision the generator ran in.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

from lipsync.pipeline import PRECISION_NAMES

LATENCIES_KEPT = 20_000  # per session, for the percentiles (13 minutes at 25 fps)


@dataclass
class Stats:
    """What a session did: frames shown, by kind, and each generated frame's latency."""

    generated: int = 0  # shown generated (speech, or silence with idle="generate")
    dropped: int = 0  # speech frames not ready in time: the last frame repeated
    idle: int = 0  # source frames shown: no speech, silence, or no face
    speech_frames: int = 0  # frames of speech scheduled
    errors: int = 0  # generator calls that failed on this session's frames (each also counted as drops)
    first_feed: float | None = None
    first_ready: float | None = None
    latencies: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LATENCIES_KEPT))

    def summary(self, fps: float, frames: int) -> dict:
        """The figures of `frames` shown at `fps`, for file mode's last line and the server's /health: fps
        counts the frames not dropped (generated, or idle by design), generated_fps those generated."""
        lat = np.array(self.latencies) * 1000 if self.latencies else np.zeros(1)
        first = None if self.first_ready is None or self.first_feed is None else (
            round((self.first_ready - self.first_feed) * 1000, 1))  # fmt: skip
        rate = (lambda n: round(fps * n / frames, 2)) if frames else (lambda n: 0.0)
        return {
            "frames": frames, "generated": self.generated, "dropped": self.dropped, "idle": self.idle,
            "errors": self.errors, "fps": rate(frames - self.dropped), "generated_fps": rate(self.generated),
            "first_frame_ms": first,
            "latency_ms": {k: round(float(v), 1) for k, v in
                           zip(("p50", "p95", "max"), (*np.percentile(lat, [50, 95]), lat.max()), strict=True)},
        }  # fmt: skip


def precision(sync) -> str:
    """The precision the generator of `sync` (a `lipsync.LipSync`) runs in: fp32, bf16 or fp16."""
    return PRECISION_NAMES[sync.dtype]
