"""The streaming core: a face prepared once (`Avatar`), then speech fed a little at a time and lip-synced
frames out as soon as each frame's mel window is complete.

    sync = LipSync("checkpoints/wav2lip_gan.pth")                 # or LipSync(ModelOptions(..., cache_dir=...))
    avatar = prepare_avatar(sync, "face.mp4", box=(60, 400, 120, 380))   # once
    stream = AvatarStream(avatar, sync.generator)
    for chunk in chunks:                                  # 16 kHz mono float32, any length (1 ms, 20 ms...)
        for i, frame in stream.feed(chunk): show(i, frame)
    for i, frame in stream.end(): show(i, frame)          # the last frames need the end of the audio

Look-ahead, inherent to Wav2Lip: frame i's window is the 16 mel columns from int(i·80/fps), 200 ms of
audio from its timestamp; the last of them is final once the audio reaches n_fft/2 (25 ms) past its centre.
Frame i can therefore be generated once the audio up to i/fps + 15·12.5 ms + 25 ms = i/fps + 212.5 ms has
arrived (`LOOKAHEAD_S`); the frames whose windows the offline pipeline takes flush with the end of the
speech come at `end()`.

The stages are the offline pipeline's (lipsync.py), composed for a stream:

    mel windows  SpeechFrames (audio.MelStream)   the frames whose window became complete, chunk by chunk
    crop         Avatar.crops                     each source frame's face crop, computed once
    generate     generation.Generator.generate    batches of frames, on the generator's worker threads
                 (+ the enhance steps: ESRGAN)     (the face parse of each source frame: once, in the Avatar)
    paste        crops.paste_batches              each generated face into a copy of its source frame
                 (Avatar.paste for one frame)       through the parse's mask when there is a face parser

`AvatarStream`'s frames are the offline pipeline's, bit for bit, when it batches frames as the offline run
does (`layout=offline_layout(...)`): the generator's round-off depends on the batch.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

import audio
from common import video
from common.errors import UserError
from face_detection import Box
from hparams import HParams, hparams
from lipsync.crops import Batch, Paster, crop_faces, feather_mask, paste, paste_batches
from lipsync.face_parsing import pack, unpack
from lipsync.frames import FrameSource, loop_frames
from lipsync.generation import Generator, generator_workers
from lipsync.options import Options
from lipsync.threads import Workers
from live.options import LIVE_DEFAULTS

HOP_S = 1 / audio.MEL_COLUMNS_PER_SECOND  # 12.5 ms between mel columns
LOOKAHEAD_S = (audio.MEL_STEP_SIZE - 1) * HOP_S + 0.025  # 212.5 ms: a window's last column, plus n_fft/2
SILENCE_FLOOR_DB = audio.SILENCE_FLOOR_DB  # the level of digital silence, instead of -inf


@dataclass
class SpeechFrame:
    """One output frame's audio: its index in the speech, its mel window and the level of what it covers."""

    index: int
    mel: np.ndarray  # (num_mels, 16) float32
    level_db: float  # RMS of the samples the window covers, dB full scale


class SpeechFrames:
    """The mel-windows stage for a stream: audio chunks in, each frame's window out once it is complete.

    Frame i takes the window at int(i·80/fps) while it lies in the final columns; at `end()` the rest take
    `audio.frame_mel_starts`' windows (flush with the end), for as many frames as the offline pipeline
    makes of the same audio. Keeps the mel columns and samples from the next frame's window on (the last
    16 columns at least: an end window may reach back), a few kB.
    """

    def __init__(self, fps: float, hp: HParams = hparams) -> None:
        self.fps, self.hp = fps, hp
        self.step = audio.MEL_COLUMNS_PER_SECOND / fps  # as audio.mel_chunk_starts computes it
        self.mel_stream = audio.MelStream(hp)
        self.next = 0  # the next frame to emit
        self._mel = np.zeros((hp.num_mels, 0), np.float32)
        self._mel_start = 0  # column index of self._mel[:, 0]
        self._wav = np.zeros(0, np.float32)
        self._wav_start = 0  # sample index of self._wav[0]

    def feed(self, samples: np.ndarray) -> list[SpeechFrame]:
        """The frames whose window `samples` completed."""
        samples = np.asarray(samples, np.float32).ravel()
        self._wav = np.concatenate([self._wav, samples])
        self._append(self.mel_stream.push(samples))
        out = []
        while (start := int(self.next * self.step)) + audio.MEL_STEP_SIZE <= self.mel_stream.n_columns:
            out.append(self._frame(start))
        self._trim()
        return out

    def end(self) -> list[SpeechFrame]:
        """The remaining frames, once the speech is over (a `UserError` if it was shorter than one window)."""
        self._append(self.mel_stream.flush())
        starts = speech_starts(self.mel_stream.n_samples, self.fps, self.hp)
        return [self._frame(start) for start in starts[self.next :]]

    def _append(self, columns: np.ndarray) -> None:
        if columns.shape[1]:
            self._mel = np.concatenate([self._mel, columns], axis=1)

    def _frame(self, start: int) -> SpeechFrame:
        lo, hi = audio.window_samples(start, self.hp)  # the samples it covers: silence is judged as offline
        level = audio.level_db(self._wav[max(0, lo - self._wav_start) : hi - self._wav_start])
        window = self._mel[:, start - self._mel_start : start - self._mel_start + audio.MEL_STEP_SIZE]
        self.next += 1
        return SpeechFrame(self.next - 1, window.copy(), level)

    def _trim(self) -> None:
        keep = min(int(self.next * self.step), self.mel_stream.n_columns - audio.MEL_STEP_SIZE)
        if keep > self._mel_start:
            self._mel = self._mel[:, keep - self._mel_start :]
            self._mel_start = keep
        first_sample = max(0, keep * self.hp.hop_length() - self.hp.n_fft // 2)
        if first_sample > self._wav_start:
            self._wav = self._wav[first_sample - self._wav_start :]
            self._wav_start = first_sample


def speech_starts(n_samples: int, fps: float, hp: HParams = hparams) -> list[int]:
    """Each output frame's window start for `n_samples` of speech, as the offline pipeline takes them."""
    n_columns = 1 + n_samples // hp.hop_length()
    return audio.frame_mel_starts(n_columns, fps, video.frames_to_cover(n_samples / hp.sample_rate, fps))


@dataclass
class Avatar:
    """A face prepared once for any number of streams: its boxes, its crops and (if they fit) its frames.

    Output frame t shows source frame t mod n (the video looping forward, as offline), or the one frame of
    a still face. `frames` is None when the decoded video would exceed the memory budget: each stream then
    decodes it again, lap after lap. The crops (S×S, 27 kB each at 96×96) are always kept.
    """

    source: FrameSource
    boxes: list[Box | None]  # per source frame
    crops: list[np.ndarray | None]  # per source frame: the generator's face crop, None without a face
    frames: list[np.ndarray] | None
    mask: np.ndarray | None  # the feather mask, or None to paste as the original
    opts: Options  # the clip options it was prepared with (idle and silence_db are read by live sessions)
    hp: HParams
    paster: Paster | None = None  # the HQ paste (`face_masks.MaskedPaste`), when the pipeline has HQ networks
    parses: list[bytes | None] | None = None  # per source frame: its face parse (PNG, ~10 kB), with a parser

    @property
    def img_size(self) -> int:
        return self.hp.img_size

    @property
    def fps(self) -> float:
        return self.source.fps

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    def index(self, t: int) -> int:
        """The source frame that output frame `t` shows."""
        return t % len(self.boxes)

    def parse(self, j: int) -> np.ndarray | None:
        """Source frame `j`'s face parse (512×512 labels), or None (no parser, or no face)."""
        data = self.parses[j] if self.parses is not None else None
        return unpack(data) if data is not None else None

    def paste(self, frame: np.ndarray, j: int, face: np.ndarray) -> None:
        """Paste a generated face into `frame` (a copy of source frame `j`), as the offline paste stage does."""
        if self.paster is None:
            paste(frame, self.boxes[j], face, self.mask)
        else:
            self.paster(frame, self.boxes[j], face, self.parse(j))

    def frame_loop(self) -> Iterator[np.ndarray]:
        """The source frames of output frames 0, 1, 2, … (shared arrays: copy before drawing on them)."""
        if self.frames is not None:
            return itertools.cycle(self.frames)
        return (frame for _, frame in loop_frames(self.source, sys.maxsize, self.source.static))


def prepare_avatar(sync, face: str | os.PathLike, speech_samples: int | None = None, **options) -> Avatar:
    """Decode `face`, find and smooth its boxes (or take `box`), and crop every frame, once.

    `sync` is a `lipsync.LipSync` (its detector, its detection cache, its hparams). `options` are
    `lipsync.options.Options` fields (`box`, `pads`, `nosmooth`, `resize_factor`, `blend`, `idle`...), over
    `LIVE_DEFAULTS` (idle keeps the source face). Boxes are
    smoothed over the whole video, or, when the length of the speech is known (`speech_samples`), over the
    frames it covers: the offline run smooths only the frames it uses.
    """
    opts = Options(**(LIVE_DEFAULTS | options))
    source = FrameSource(video.probe(face), opts, sync.hp.fps)
    n_out = len(speech_starts(speech_samples, source.fps, sync.hp)) if speech_samples else sys.maxsize
    found = sync.face_boxes(source, opts, n_out)
    frames = [next(iter(source))] if source.static else _within_budget(source, opts)
    n_source = len(frames) if frames is not None else sum(1 for _ in source)
    boxes = [found[j % len(found)] for j in range(n_source)]
    size = sync.hp.img_size
    crops = [crop_faces([f], [b], size)[0] if b is not None else None
             for f, b in zip(frames if frames is not None else source, boxes, strict=False)]  # fmt: skip
    mask = feather_mask(size) if opts.blend == "feather" else None
    paster = sync.enhance.paster(opts, mask)
    parses = _parse_frames(sync.enhance.parser, frames if frames is not None else source, boxes)
    return Avatar(source, boxes, crops, frames, mask, opts, sync.hp, paster, parses)


def _parse_frames(parser, frames: Iterable[np.ndarray], boxes: list[Box | None]) -> list[bytes | None] | None:
    """Each source frame's face parse, once (`face_parsing.FaceParser`, its cache included), packed; None
    without a parser. Streams then blend through them without parsing anything."""
    if parser is None:
        return None
    parses: list[bytes | None] = []
    for frame, box in zip(frames, boxes, strict=False):
        parses.append(pack(parser([frame], [box])[0]) if box is not None else None)
    return parses


def _within_budget(source: FrameSource, opts: Options) -> list[np.ndarray] | None:
    """The video's frames if they fit the memory budget, else None (streams then decode them lap by lap)."""
    limit = opts.frames_within_budget(source.frame_bytes)
    frames = list(itertools.islice(source, limit + 1))
    return frames if len(frames) <= limit else None


class AvatarStream:
    """Speech in, chunk by chunk; the avatar's lip-synced frames out, in order, as soon as they are made.

    Every frame is generated (nothing is dropped: `live.LiveSession` adds a clock, idle and a latency
    budget). `layout`: how many consecutive frames each generator batch takes (the offline run's, for
    identical frames); by default, the frames each chunk completes, `cap` at a time. Batches run on the
    generator's worker threads as offline, while more audio is fed. Keeps the speech's state, the frames
    waiting for their batch and at most workers + 1 batches in flight; `end` (or `close`) stops the threads.
    """

    def __init__(self, avatar: Avatar, generator: Generator, *, layout: Iterable[int] | None = None,
                 cap: int | None = None) -> None:  # fmt: skip
        self.avatar, self.generator = avatar, generator
        self.cap = cap or generator.default_batch_size
        self.sizes = iter(layout) if layout is not None else None
        self.speech = SpeechFrames(avatar.fps, avatar.hp)
        self.frames = avatar.frame_loop()
        self.waiting: list[SpeechFrame] = []
        self._next_size: int | None = None
        self.workers = Workers(*generator_workers(generator.device))  # the offline pipeline's pool
        self._ready: list[tuple[int, np.ndarray]] = []

    def feed(self, samples: np.ndarray, wait: bool = False) -> list[tuple[int, np.ndarray]]:
        """(frame index, BGR frame) of the frames made since the last call; with `wait`, of every frame whose
        window (and batch) `samples` completed."""
        self.waiting += self.speech.feed(samples)
        self._submit(self._full_batches())
        return self._collect(wait)

    def end(self) -> list[tuple[int, np.ndarray]]:
        """The remaining frames: the speech is over."""
        self.waiting += self.speech.end()
        groups = self._full_batches()
        while self.waiting:
            size = min(self._take_size(), len(self.waiting))
            groups.append(self.waiting[:size])
            self.waiting, self._next_size = self.waiting[size:], None
        self._submit(groups)
        frames = self._collect(wait=True)
        self.close()
        return frames

    def close(self) -> None:
        self.workers.close()

    def _take_size(self) -> int:
        if self._next_size is None:
            self._next_size = next(self.sizes, self.cap) if self.sizes is not None else self.cap
        return self._next_size

    def _full_batches(self) -> list[list[SpeechFrame]]:
        groups = []
        while self.waiting and (self.sizes is None or len(self.waiting) >= self._take_size()):
            size = min(self._take_size(), len(self.waiting))
            groups.append(self.waiting[:size])
            self.waiting, self._next_size = self.waiting[size:], None
        return groups

    def _submit(self, groups: list[list[SpeechFrame]]) -> None:
        """Crop each group of consecutive frames here (in order), generate it on a worker."""
        for group in groups:
            while self.workers.backlogged:
                self._ready += self._finish(*self.workers.take())
            self.workers.submit(self._generate, group[0].index, *self._batch(group))

    def _generate(self, first: int, batch: Batch, mel: np.ndarray) -> tuple[int, Batch]:
        """The generate stage for one batch (on a worker): its first frame's index, and the batch generated."""
        return first, self.generator.generate(batch, mel, self.cap)

    def _collect(self, wait: bool) -> list[tuple[int, np.ndarray]]:
        out, self._ready = self._ready, []
        while self.workers.next_ready(wait):
            out += self._finish(*self.workers.take())
        return out

    def _finish(self, first: int, generated: Batch) -> list[tuple[int, np.ndarray]]:
        """The paste stage for one generated batch."""
        pasted = paste_batches([generated], self.avatar.mask, shared_frames=True, paster=self.avatar.paster)
        return [(first + i, frame) for i, (frame, _) in enumerate(pasted)]

    def _batch(self, group: list[SpeechFrame]) -> tuple[Batch, np.ndarray]:
        """A generator batch of `group`, and the mel its windows index (theirs side by side)."""
        indices = [self.avatar.index(f.index) for f in group]
        boxes = [self.avatar.boxes[j] for j in indices]
        faces = [self.avatar.crops[j] for j in indices if self.avatar.crops[j] is not None]
        size = self.avatar.img_size
        stacked = np.stack(faces) if faces else np.zeros((0, size, size, 3), np.uint8)
        windows = [f.mel for f, b in zip(group, boxes, strict=True) if b is not None]
        mel = np.concatenate(windows, axis=1) if windows else np.zeros((0, 0), np.float32)
        starts = [k * audio.MEL_STEP_SIZE for k in range(len(windows))]
        batch = Batch([next(self.frames) for _ in group], boxes, stacked, starts)
        if self.avatar.parses is not None:  # parsed once with the avatar: the workers need not
            batch.parses = [self.avatar.parse(j) for j in indices if self.avatar.boxes[j] is not None]
        return batch, mel


def hq_names(generator: Generator) -> list[str]:
    """The HQ networks the generator runs with (ESRGAN, the face parser), for the figures and /health."""
    return generator.enhance.names() if generator.enhance is not None else []


def check_live_budget(sync, budget_s: float) -> float | None:
    """Seconds one frame takes through the generator and the enhance steps (ESRGAN), measured once after a
    warm-up call, or None without steps; a `UserError` when that alone exceeds the latency budget (every
    frame would be dropped): realtime pace and the server refuse to start then. A ×4 ESRGAN takes seconds
    a frame on a CPU: realtime super-resolution is a GPU feature. The face parse costs a live stream
    nothing (each avatar frame is parsed once, when the avatar is prepared)."""
    if not sync.enhance.steps:
        return None
    size, mels = sync.hp.img_size, sync.hp.num_mels
    crop, mel = np.zeros((1, size, size, 3), np.uint8), np.zeros((1, 1, mels, audio.MEL_STEP_SIZE), np.float32)
    sync.generator.predict(crop, mel)
    started = time.perf_counter()
    sync.generator.predict(crop, mel)
    seconds = time.perf_counter() - started
    if seconds > budget_s:
        raise UserError(
            f"{' and '.join(sync.enhance.names())}: one frame takes {seconds * 1000:.0f} ms on {sync.device} "
            f"(with the generator), more than --latency_budget_ms {budget_s * 1000:.0f}: every frame would be "
            "dropped. Run realtime with --sr_path on a GPU, or without it (--pace fast in file mode has no budget)"
        )
    return seconds


def offline_layout(avatar: Avatar, generator: Generator, n_frames: int, **options) -> tuple[int, list[int]]:
    """(cap, batch sizes): the generator batches `lipsync.LipSync` makes of `n_frames` frames of this face."""
    return generator.plan(n_frames, Options(**options), avatar.source.frame_bytes)
