"""A speech file fed through the streaming core as if it were live, into a video file: realtime.py's file mode.

- `pace="fast"`: chunk after chunk as fast as they go, every frame generated in the offline run's
  batches (`streaming.offline_layout`): the frames are inference.py's, bit for bit.
- `pace="realtime"`: each chunk fed when its last sample would have been spoken, through a `LiveSession`
  with its clock, idle, latency budget and drops; the output holds the frames shown at each tick.

Either way the result is an H.264 + AAC file written atomically (as inference.py writes it) and a dict of
figures (`live.figures.Stats.summary`: frames, generated, dropped, idle, errors, fps, generated_fps,
first_frame_ms and latency_ms: p50, p95, max) and the precision the generator ran in, where a frame's
latency runs from feeding the chunk that completed its mel window to the frame being ready. A generator that
keeps failing ends the run with `live.sessions.GeneratorError`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

import audio
from common import video
from common.atomic_files import check_writable
from lipsync.options import Options
from live.figures import Stats, precision
from live.options import LiveOptions
from live.sessions import LiveSession, SharedGenerator
from live.stream import LOOKAHEAD_S, Avatar, AvatarStream, hq_names, offline_layout, prepare_avatar, speech_starts

OnFrame = Callable[[int, np.ndarray], None]


def chunks_of(wav: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
    for i in range(0, len(wav), chunk):
        yield wav[i : i + chunk]


def replay(
    sync, face: str | os.PathLike, audio_path: str | os.PathLike, outfile: str | os.PathLike,
    live: LiveOptions | None = None, *, on_frame: OnFrame | None = None, **options,
) -> dict:  # fmt: skip
    """Lip-sync `face` to `audio_path` through the stream, chunk by chunk, into `outfile`; returns the figures.

    `sync` is a `lipsync.LipSync`; `live` holds the pace, the chunk length, the latency budget and the live
    batch; `options` are `lipsync.options.Options` fields; `on_frame(i, frame)` sees each output frame
    before it is encoded.
    """
    live = live or LiveOptions()
    check_writable(Path(outfile).parent, "--outfile")
    span = Options(**options).audio_range  # --audio_start/--audio_end: the part of the speech that is said
    wav, gain = audio.load_speech_wav(audio_path, sync.hp, span)
    avatar = prepare_avatar(sync, face, len(wav), **options)
    n_frames = len(speech_starts(len(wav), avatar.fps, sync.hp))
    chunk = max(1, round(live.chunk_ms * sync.hp.sample_rate / 1000))
    height, width = avatar.shape[:2]
    writer = video.VideoWriter(outfile, avatar.source.writer_fps, width, height, audio_path, audio_gain=gain,
                               audio_span=span)  # fmt: skip
    with writer:
        write = _writer(writer, on_frame)
        if live.pace == "fast":
            figures = _fast(sync, avatar, chunks_of(wav, chunk), n_frames, write, options)
        else:
            figures = _realtime(sync, avatar, chunks_of(wav, chunk), n_frames, write, chunk / sync.hp.sample_rate, live)
    return figures | {"precision": precision(sync), "hq": hq_names(sync.generator)}


def _writer(writer: video.VideoWriter, on_frame: OnFrame | None) -> OnFrame:
    def write(i: int, frame: np.ndarray) -> None:
        if on_frame is not None:
            on_frame(i, frame)
        writer.write(frame)

    return write


def _fast(sync, avatar: Avatar, chunks: Iterator[np.ndarray], n_frames: int, write: OnFrame, options: dict) -> dict:
    """Every frame, in the offline run's batches, as fast as they come."""
    cap, layout = offline_layout(avatar, sync.generator, n_frames, **options)
    stream = AvatarStream(avatar, sync.generator, layout=layout, cap=cap)
    stats, completed = Stats(), {}  # frame → when the chunk completing its window was fed
    started = stats.first_feed = time.perf_counter()
    try:
        for piece in [*chunks, None]:
            fed = time.perf_counter()
            before = stream.speech.next
            frames = stream.feed(piece) if piece is not None else stream.end()
            completed.update((i, fed) for i in range(before, stream.speech.next))
            for i, frame in frames:
                now = time.perf_counter()
                stats.first_ready = stats.first_ready or now
                stats.latencies.append(now - completed.pop(i))
                write(i, frame)
    finally:
        stream.close()
    figures = stats.summary(avatar.fps, n_frames)
    figures["fps"] = round(n_frames / (time.perf_counter() - started), 2)
    return figures


def _realtime(sync, avatar: Avatar, chunks: Iterator[np.ndarray], n_frames: int, write: OnFrame, chunk_s: float,
              live: LiveOptions) -> dict:  # fmt: skip
    """Chunks fed at the pace they are spoken; the frames shown at each tick written as they are shown."""
    shared = SharedGenerator(sync.generator, live.live_batch, clock=time.perf_counter, hp=sync.hp)
    t0 = time.perf_counter()
    start = t0 + chunk_s + LOOKAHEAD_S + live.budget  # tick 0: frame 0, shown a budget after it can be made
    session = LiveSession(avatar, shared, live, start=start)
    session.begin(first_tick=0)
    failure: list[BaseException] = []
    shower = threading.Thread(target=_show, args=(session, n_frames, write, failure), daemon=True)
    shower.start()
    try:
        for i, piece in enumerate(chunks):
            _sleep_until(t0 + (i + 1) * chunk_s)
            session.feed(piece)
            if failure:
                break
        session.end()
    finally:
        shower.join()
        session.close()
        shared.close()
    if failure:
        raise failure[0]
    return session.stats.summary(avatar.fps, n_frames)


def _show(session: LiveSession, n_frames: int, write: OnFrame, failure: list[BaseException]) -> None:
    """The display: at each tick's time, the frame the session shows then, into the file."""
    try:
        for tick in range(n_frames):
            _sleep_until(session.display_time(tick))
            write(tick, session.next_frame())
    except BaseException as e:  # noqa: BLE001 - handed to the feeding thread, which raises it
        failure.append(e)


def _sleep_until(when: float) -> None:
    delay = when - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
