"""What a live stream should show, for the realtime tests: a generator whose mouth tells which mel window and
crop it was given, each tick's frame computed the offline way, and the tick a received frame shows.

The deterministic test weights draw a mouth that hardly depends on the audio (adjacent windows differ by
0.1 level on average), so a live path one window off would pass any comparison with them. `MelPainter`
paints the mouth from a hash of its window and crop instead: a window one tick off, or another frame's
crop, changes it by ~80 levels, which survives VP8.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

import audio
from hparams import hparams
from lipsync.crops import crop_faces, paste
from live.stream import Avatar
from live.webrtc import STAMP_PX, TICK_BITS

MOUTH = (slice(70, 106), slice(35, 115))  # rows, columns of the 160x128 test frames' box (20, 110, 30, 120)
VP8_MARGIN = 8.0  # mean absolute difference of a region after VP8 at aiortc's bitrate (measured: 1.5-4)


class MelPainter:
    """A stand-in forward pass: the crop's upper half, and below it 2x4 grey squares whose levels hash the
    mel window and the crop (exact, whatever the batch)."""

    def __call__(self, faces: np.ndarray, mels: np.ndarray) -> np.ndarray:
        out = faces.copy()
        size = faces.shape[1]
        for face, mel, painted in zip(faces, mels, out, strict=True):
            digest = hashlib.blake2b(mel.astype(np.float32).tobytes() + face.tobytes(), digest_size=8).digest()
            levels = (32 + np.frombuffer(digest, np.uint8).astype(np.int32) * 3 // 4).reshape(2, 4)
            squares = np.kron(levels, np.ones((size // 4, size // 4), np.int32)).astype(np.uint8)
            painted[size // 2 :] = squares[..., None]
        return out


def capture() -> tuple[list[np.ndarray], object]:
    """A list, and an `on_frame` that appends a copy of each frame to it."""
    frames: list[np.ndarray] = []
    return frames, lambda i, f: frames.append(f.copy())


def offline_frames(sync, face: Path, speech: Path, out: Path, **options) -> list[np.ndarray]:
    """inference.py's frames (before encoding) of `face` saying `speech`, through `sync` (a LipSync)."""
    frames, on_frame = capture()
    sync(face, speech, out, on_frame=on_frame, quiet=True, **options)
    return frames


def level_db(wav: np.ndarray, start: int) -> float:
    """RMS (dB full scale) of the samples the mel window from column `start` covers."""
    hop, pad = hparams.hop_length(), hparams.n_fft // 2
    covered = wav[max(0, start * hop - pad) : (start + audio.MEL_STEP_SIZE - 1) * hop + pad]
    rms = float(np.sqrt(np.mean(np.square(covered, dtype=np.float64)))) if len(covered) else 0.0
    return 20 * float(np.log10(rms)) if rms > 0 else -200.0


def expected_ticks(avatar: Avatar, predict, wav: np.ndarray, frame_ticks: list[int], ticks: int) -> list[np.ndarray]:
    """Ticks 0..`ticks`-1 of a live avatar fed `wav`, whose frame k was scheduled for tick `frame_ticks[k]`,
    computed the offline way: the whole signal's mel, frame k's window from column int(k·80/fps), the tick's own
    source frame, box and crop (frame t mod n), `predict`, paste; the source frame at the other ticks, and
    where a window is silent (idle keep)."""
    mel, n = audio.melspectrogram(wav), len(avatar.boxes)
    step, keep = audio.MEL_COLUMNS_PER_SECOND / avatar.fps, avatar.opts.idle == "keep"
    frame_at = {tick: k for k, tick in enumerate(frame_ticks)}
    out = []
    for t in range(ticks):
        source, box, k = avatar.frames[t % n], avatar.boxes[t % n], frame_at.get(t)
        start = int(k * step) if k is not None else 0
        if k is None or box is None or (keep and level_db(wav, start) < avatar.opts.silence_db):
            out.append(source)
            continue
        crop = crop_faces([source], [box], avatar.img_size)[0]
        face = predict(crop[None], mel[None, None, :, start : start + audio.MEL_STEP_SIZE])[0]
        frame = source.copy()
        paste(frame, box, face, avatar.mask)
        out.append(frame)
    return out


def read_tick(frame: np.ndarray) -> int | None:
    """The tick stamped in a received frame's corner (`live.webrtc.stamp_tick`), or None where a square and
    its complement do not disagree clearly (a frame VP8 blurred)."""
    return tick_of(frame[: 2 * STAMP_PX, : TICK_BITS * STAMP_PX].astype(float).mean(-1))


def tick_of(grey: np.ndarray) -> int | None:
    """The tick of a stamp's grey pixels (2 rows of `TICK_BITS` squares: a Gray code and its complement)."""
    gray, q = 0, STAMP_PX // 4
    for k in range(TICK_BITS):
        centre = (slice(q, STAMP_PX - q), slice(k * STAMP_PX + q, (k + 1) * STAMP_PX - q))
        top, bottom = grey[centre].mean(), grey[STAMP_PX:][centre].mean()
        if abs(top - bottom) < 128:
            return None
        gray |= int(top > bottom) << k
    tick = 0
    while gray:
        tick, gray = tick ^ gray, gray >> 1
    return tick


def mouth_error(frame: np.ndarray, expected: np.ndarray) -> float:
    """Mean absolute difference of the mouth regions."""
    return float(np.abs(frame[MOUTH].astype(int) - expected[MOUTH]).mean())


def judge(samples: list, ticks: list[int | None], expected: list[np.ndarray], sources: list[np.ndarray], error,
          instead: list[np.ndarray] | None = None) -> dict[str, list[tuple[int, bool]]]:  # fmt: skip
    """Whether each received sample (of a known tick) shows the offline frame of its tick: within VP8's
    margin of it, or at least twice as close to it as to the offline frames of the ticks before and after
    (and to `instead[tick]`, what it would show had the speech gone on), which a frame that VP8 updated only
    in part is. (tick, right) by kind: "generated" where the tick's frame is generated, "source" where it is
    the source."""
    out: dict[str, list[tuple[int, bool]]] = {"generated": [], "source": []}
    for sample, t in zip(samples, ticks, strict=True):
        if t is None:
            continue
        others = [expected[u] for u in (t - 1, t + 1) if 0 <= u < len(expected)]
        others += [instead[t]] if instead is not None and t < len(instead) else []
        own = error(sample, expected[t])
        nearest = min((error(sample, o) for o in others if not np.array_equal(o, expected[t])), default=np.inf)
        kind = "source" if np.array_equal(expected[t], sources[t % len(sources)]) else "generated"
        out[kind].append((t, own < VP8_MARGIN or 2 * own < nearest))
    return out
