"""The idle stage (`--idle keep`): where the speech is silent the source face stays, and the generated
mouth fades in and out around it.

Whether a frame is silent is decided from the audio alone, per frame: the RMS level of the samples its mel
window covers (`audio.window_samples`, `audio.level_db`) against `--silence_db`, the measure and threshold
the live avatar uses (live/sessions.py), so one setting means the same in both doors. A silent frame weighs
0: it skips the generator and is the source frame, bit for bit. A speech frame weighs 1, except the
`fade_frames` nearest a silent one, which weigh 1/(n+1) … n/(n+1) by their distance from it: the generated
face is blended into the source over them, so neither the mouth nor the box around it jumps (the
generated box is a 96×96 face scaled up, softer than the source around it). The fade lies inside the
speech, never over silence; a frame's window already reaches 200 ms ahead, so the first frames that count as
speech are those just before the voice starts, where the generated mouth is still closed.

The stage wraps the crop and paste stages (`hold` before, `fade` after) and keeps, between the two, the
source pixels of each fading frame's box and whether each silent frame had a box, a few frames' worth.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from audio import Speech
from face_detection import Box
from lipsync.options import Options

FADE_S = 0.12  # speech fades in and out over this long: 3 frames at 25 fps (weights 1/4, 1/2, 3/4)


def fade_frames(fps: float) -> int:
    """Frames of partial weight at each end of a run of speech."""
    return max(1, round(FADE_S * fps))


def speech_weights(levels_db: np.ndarray, silence_db: float, fade: int) -> np.ndarray:
    """Per frame, how much of the generated face it shows: 0 where silent (level below `silence_db`), rising
    by 1/(fade+1) a frame from a silent frame's neighbour to 1."""
    silent = np.asarray(levels_db) < silence_db
    distance = np.full(len(silent), np.inf)  # frames to the nearest silent frame
    for order in (slice(None), slice(None, None, -1)):
        last = -np.inf
        for i in np.arange(len(silent))[order]:
            last = i if silent[i] else last
            distance[i] = min(distance[i], abs(i - last))
    return np.minimum(1.0, distance / (fade + 1))


def frame_weights(speech: Speech, opts: Options, fps: float) -> np.ndarray:
    """The weight of each output frame: all 1 with `idle="generate"` (the original: every frame generated)."""
    if opts.idle == "generate" or speech.levels_db is None:
        return np.ones(speech.n_frames)
    return speech_weights(speech.levels_db, opts.silence_db, fade_frames(fps))


Item = tuple[np.ndarray, Box | None, int]  # (frame, box, mel start): what the crop stage takes


class IdleFrames:
    """The idle stage over the output frames' `weights` (`frame_weights`)."""

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = weights
        self._sources: dict[int, tuple[Box, np.ndarray]] = {}  # fading frame → its box and the box's source pixels
        self._boxed: dict[int, bool] = {}  # silent frame → whether it has a face box

    def hold(self, items: Iterable[Item]) -> Iterator[Item]:
        """Before cropping: a silent frame goes on without its box (no crop, no generation); a fading frame's
        box pixels are kept for `fade`."""
        for i, (frame, box, start) in enumerate(items):
            weight = self.weights[i]
            if weight == 0:
                self._boxed[i] = box is not None
                box = None
            elif weight < 1 and box is not None:
                self._sources[i] = box, frame[box.y1 : box.y2, box.x1 : box.x2].copy()
            yield frame, box, start

    def fade(self, pasted: Iterable[tuple[np.ndarray, bool]]) -> Iterator[tuple[np.ndarray, bool]]:
        """After pasting: a fading frame's box blended from the source by its weight (in place); a silent frame
        reported by whether it had a face (it is the source frame, untouched)."""
        for i, (frame, has_face) in enumerate(pasted):
            if i in self._boxed:
                has_face = self._boxed.pop(i)
            elif i in self._sources:
                box, source = self._sources.pop(i)
                region = frame[box.y1 : box.y2, box.x1 : box.x2]
                blend = source + (region.astype(np.float32) - source) * np.float32(self.weights[i])
                region[:] = np.rint(blend).astype(np.uint8)
            yield frame, has_face
