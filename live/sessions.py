"""Live streams over the streaming core: a display clock, idle, interruption, a latency budget, and one
generator shared by every session, batched across them.

A `LiveSession` is one viewer. Its avatar shows one frame per tick of its clock (the face video's rate).
Speech fed into it (`feed`, chunk by chunk, as it arrives) becomes frames through `streaming.SpeechFrames`;
frame i of an utterance is shown at tick first + i, where `first` is the first tick at least look-ahead
(212.5 ms) + the latency budget after the utterance's first chunk arrived: every frame then has the
budget to be generated once its window is complete. The speech's audio, placed on the same timeline,
is kept for the audio track (`audio_out`), so sound and mouth stay in sync.

- Idle: while no speech arrives, or a frame's audio is quieter than the avatar's `silence_db`, the avatar
  shows its source frames, looping forward as the video does (`idle="generate"` runs the generator on
  silence).
- Interruption (`interrupt`) drops everything queued for later ticks at once and returns to idle.
- Bounded latency: the `SharedGenerator` takes, for each session in turn, its newest frame that can still be
  ready before its tick; older frames that cannot are dropped, and the tick repeats the last frame shown.
  A frame's latency (from the moment its window was complete to the frame being ready) thus stays under
  the budget however long the stream runs, and when the machine cannot keep up, frames are dropped,
  evenly, instead of the stream falling behind.
- Full batches: a frame waits up to a quarter of the budget for others to share its generator call. The
  display delay is fixed (look-ahead + budget), so the wait costs the viewer nothing, and a batch of 4 takes
  ~35 % less CPU a frame than frames one at a time: what lets bf16 keep up on 2 cores without drops.
- Failures: a generator call that raises loses its frames (counted as drops and as `errors` in the stats
  of each session they belonged to); its cause is logged once, with its traceback. A session whose frames
  fail `FAILURES_TO_END` calls in a row ends: its next frame raises `GeneratorError`, with the cause.

Per session: the mel state and a few samples (~10 kB), at most budget × fps queued windows and crops
(~35 kB each), the generated faces awaiting their tick (27 kB each at 96×96), the delayed audio (under
`AUDIO_KEPT_S`, 640 kB) and the last frame shown (786 kB at 512×512): about 1 MB at 512×512.
"""

from __future__ import annotations

import bisect
import math
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import audio
from common.errors import UserError
from hparams import HParams, hparams
from lipsync.generation import Generator, generator_workers
from live.figures import Stats
from live.options import LiveOptions
from live.stream import LOOKAHEAD_S, Avatar, SpeechFrame, SpeechFrames

BATCH_SHARE_OF_BUDGET = 0.5  # a generator call may take up to half the latency budget (the rest: waiting)
GATHER_SHARE_OF_BUDGET = 0.25  # a frame may wait this share of the budget for others to fill its batch
FAILURES_TO_END = 3  # generator calls in a row that failed on a session's frames: the session ends
CAUSES_LOGGED = 20  # distinct failure causes logged with their traceback; later ones are only counted
AUDIO_KEPT_S = 10.0  # delayed speech kept for the audio track; older samples go, read or not
Clock = Callable[[], float]


@dataclass
class Job:
    """One frame to generate: its crop and window, when it may start and the tick it must be ready for."""

    session: LiveSession
    tick: int
    crop: np.ndarray
    mel: np.ndarray
    eligible: float  # its window complete (and at most the budget before its tick)
    deadline: float  # its tick's display time


def single_threaded_blas() -> None:
    """NumPy's BLAS on one thread for the rest of the process (realtime.py calls it once, at the top).

    A stream multiplies 16 mel columns at a time, a few microseconds of work; on two threads, the second
    waits for a core the generator keeps busy, and a 20 ms chunk's mel then takes 3-12 ms instead of 0.1.
    The products are the same on one thread (tests/test_realtime_stream.py holds them to the offline mel).
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


class GeneratorError(UserError):
    """A session's frames kept failing in the generator: the session ends, with the cause in its message
    (one line; the traceback was logged when the cause first appeared)."""


class SharedGenerator:
    """The generate stage for every live session: one model, worker threads, batches across sessions.

    Each worker takes up to `batch` frames, going round the sessions (the newest frame of each that can
    still make its tick), runs them through the generator in one call and hands each face back to its
    session. Keeps the sessions and a running estimate of the seconds a frame takes.
    """

    def __init__(self, generator: Generator, batch: int, clock: Clock = time.monotonic,
                 hp: HParams = hparams, workers: int | None = None) -> None:  # fmt: skip
        """`batch`: frames per generator call (`LiveOptions.live_batch`); `workers`: threads running the
        generator (default: as offline); 0 for none: the caller then runs `next_batch` and `finish` itself
        (a simulation)."""
        self.generator, self.batch, self.clock, self.hp = generator, batch, clock, hp
        n_workers, self.threads = generator_workers(generator.device)
        self.workers = n_workers if workers is None else workers
        self.lock = threading.Condition()
        self.sessions: list[LiveSession] = []
        self.seconds_per_frame = 0.0  # measured, per worker
        self.errors, self.last_error = 0, None  # failed generator calls, and the last one's cause
        self._causes: set[str] = set()  # the causes logged
        self._turn = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"live-{i}")
                         for i in range(self.workers)]  # fmt: skip
        self._warm = threading.Semaphore(0)
        for thread in self._threads:
            thread.start()
        for _ in self._threads:  # ready: the first frame will not pay for building the kernels
            self._warm.acquire()

    def add(self, session: LiveSession) -> None:
        with self.lock:
            self.sessions.append(session)

    def remove(self, session: LiveSession) -> None:
        with self.lock:
            if session in self.sessions:
                self.sessions.remove(session)
            session.pending.clear()

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self.lock.notify_all()
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        torch.set_num_threads(self.threads)
        self._warm_up()
        while True:
            with self.lock:
                while not self._closed and not (jobs := self.next_batch(self.clock())):
                    self.lock.wait(timeout=self._next_wake())
                if self._closed:
                    return
            started = self.clock()
            if (faces := self.generate(jobs)) is not None:
                self.finish(jobs, faces, started, self.clock())

    def generate(self, jobs: list[Job]) -> np.ndarray | None:
        """The faces of `jobs`, or None when the generator raised: the failure is then counted against each
        session whose frames it lost, and its cause logged (once per cause); the server goes on."""
        try:
            return self.generator.predict(np.stack([j.crop for j in jobs]), np.stack([j.mel[None] for j in jobs]))
        except Exception as e:  # noqa: BLE001 - the frames are lost; the sessions count it, and go on or end
            message = f"{type(e).__name__}: {e}"
            with self.lock:
                self.errors, self.last_error = self.errors + 1, message
                first = message not in self._causes and len(self._causes) < CAUSES_LOGGED
                self._causes.add(message)
                for session in {id(j.session): j.session for j in jobs}.values():
                    session.generator_failed(message)
            if first:
                print(f"the generator failed on {len(jobs)} frames (dropped; logged once per cause):", file=sys.stderr)
                traceback.print_exception(e, file=sys.stderr)
            return None

    def finish(self, jobs: list[Job], faces: np.ndarray, started: float, now: float) -> None:
        """Hand generated faces back to their sessions; learn how long a frame takes."""
        per_frame = (now - started) / len(jobs)
        with self.lock:
            old = self.seconds_per_frame
            self.seconds_per_frame = per_frame if old == 0 else 0.8 * old + 0.2 * per_frame
            for job, face in zip(jobs, faces, strict=True):
                job.session.deliver(job, face, now)

    def _warm_up(self) -> None:
        """One call per batch size before the first frame: the first call of a shape builds its kernels. A
        generator that fails here fails on the first frames too, where it is counted and logged."""
        size, mels = self.hp.img_size, self.hp.num_mels
        try:
            for n in range(1, self.batch + 1):
                self.generator.predict(np.zeros((n, size, size, 3), np.uint8), np.zeros((n, 1, mels, 16), np.float32))
        except Exception:  # noqa: BLE001 - counted and logged where it fails again, on the first frames
            pass
        finally:
            self._warm.release()

    def next_batch(self, now: float) -> list[Job]:
        """Up to `batch` jobs, one session at a time in turn, each session's newest first; fewer when a batch
        would take more than half the tightest latency budget (a slow or busy machine), or when the oldest
        frame that may start has waited its share of the budget (`gather_until`) for the batch to fill."""
        if not self.sessions:
            return []
        budget = min(s.budget for s in self.sessions)
        size = max(1, min(self.batch, int(BATCH_SHARE_OF_BUDGET * budget / max(self.seconds_per_frame, 1e-9))))
        ready = self._ready_count(now)
        if not ready or (ready < size and now < self.gather_until(now)):
            return []
        busy = self.seconds_per_frame * size
        order = self.sessions[self._turn % len(self.sessions) :] + self.sessions[: self._turn % len(self.sessions)]
        self._turn += 1
        jobs: list[Job] = []
        while order and len(jobs) < size:
            session = order.pop(0)
            if (job := session.take(now, busy)) is not None:
                jobs.append(job)
                order.append(session)  # its next job, after one of every other session's
        return jobs

    def _ready_count(self, now: float) -> int:
        return sum(job.eligible <= now for s in self.sessions for job in s.pending.values())

    def gather_until(self, now: float) -> float:
        """When the oldest frame that may start now stops waiting for others to fill its batch (inf if none)."""
        budget = min((s.budget for s in self.sessions), default=0.0)
        oldest = min((j.eligible for s in self.sessions for j in s.pending.values() if j.eligible <= now), default=None)
        return math.inf if oldest is None else oldest + GATHER_SHARE_OF_BUDGET * budget

    def _next_wake(self) -> float:
        """Seconds until a job may start or a gathering batch must go (a short wait at most: feeds also wake
        the workers)."""
        now = self.clock()
        times = [job.eligible for s in self.sessions for job in s.pending.values() if job.eligible > now]
        return min(0.05, max(0.001, min([*times, self.gather_until(now)], default=now + 0.05) - now))


class LiveSession:
    """One viewer's avatar: speech in (`feed`, `end`, `interrupt`), one frame per tick out (`next_frame`).

    `start` is the wall time (on `clock`) of tick 0. Thread-safe: audio may be fed from one thread while
    frames are taken from another and generated on the shared generator's.
    """

    def __init__(self, avatar: Avatar, shared: SharedGenerator, live: LiveOptions | None = None, *,
                 start: float | None = None, name: str = "") -> None:  # fmt: skip
        self.avatar, self.shared, self.name = avatar, shared, name
        self.fps, self.budget = avatar.fps, (live or LiveOptions()).budget
        self.idle, self.silence_db = avatar.opts.idle, avatar.opts.silence_db
        self.start = shared.clock() if start is None else start
        self.frames = avatar.frame_loop()
        self.tick = 0  # the next tick to show
        self.plan: dict[int, Job | str] = {}  # tick → its Job, "idle" (silence) or "none" (no face)
        self.pending: dict[int, Job] = {}  # tick → frame to generate
        self.faces: dict[int, np.ndarray] = {}  # tick → generated face awaiting its tick
        self.speech: SpeechFrames | None = None  # the utterance being fed
        self.first = 0  # tick of its frame 0
        self.end_tick = 0  # first tick after the last utterance ended
        self.stats = Stats()
        self.audio_out = DelayedAudio(avatar.hp.sample_rate)
        self.last_frame: np.ndarray | None = None
        self.failure: str | None = None  # why the session ended (the generator kept failing), if it did
        self._failures_in_a_row = 0
        self._silent_mel: np.ndarray | None = None
        shared.add(self)

    def display_time(self, tick: int) -> float:
        return self.start + tick / self.fps

    def feed(self, samples: np.ndarray, now: float | None = None) -> None:
        """Speech as it arrives (16 kHz mono float32, any length); starts an utterance if none is on."""
        now = self.shared.clock() if now is None else now
        samples = np.asarray(samples, np.float32).ravel()
        with self.shared.lock:
            if self.speech is None:
                self.begin(now=now)
            if self.stats.first_feed is None:
                self.stats.first_feed = now
            position = self.speech.mel_stream.n_samples
            frames = self.speech.feed(samples)
            if frames and self.first + frames[0].index < self.tick:
                # the input stalled and its frames would all be late: shown a budget from now, later on
                self.first = math.ceil((now + self.budget - self.start) * self.fps) - frames[0].index
            self.audio_out.write(round(self.first * self.avatar.hp.sample_rate / self.fps) + position, samples)
            self._schedule(frames, now)

    def end(self, now: float | None = None) -> int:
        """The utterance is over: its last frames (at least 0.2 s of speech is needed); returns its frame count."""
        now = self.shared.clock() if now is None else now
        with self.shared.lock:
            if self.speech is None:
                return 0
            speech, self.speech = self.speech, None
            self._schedule(speech.end(), now)
            self.end_tick = self.first + speech.next
            return speech.next

    def interrupt(self) -> None:
        """Drop every frame and sample queued for later ticks; the avatar is idle from the next tick."""
        with self.shared.lock:
            self.speech = None
            self.end_tick = self.tick
            for table in (self.plan, self.pending, self.faces):
                for tick in [t for t in table if t >= self.tick]:
                    del table[tick]
            self.audio_out.clear_from(round(self.tick * self.avatar.hp.sample_rate / self.fps))

    def close(self) -> None:
        self.interrupt()
        self.shared.remove(self)

    def begin(self, first_tick: int | None = None, now: float | None = None) -> None:
        """Start an utterance (`feed` starts one by itself): its frame 0 shown at `first_tick`, by default
        the first tick a budget after that frame can be generated."""
        now = self.shared.clock() if now is None else now
        with self.shared.lock:
            self.speech = SpeechFrames(self.fps, self.avatar.hp)
            if first_tick is None:
                # frame i's window is complete once the audio up to i/fps + LOOKAHEAD_S has arrived, which is
                # now for i = 0 at the earliest (later by at most a chunk, which a chunk's own wait covers)
                first_tick = math.ceil((now + LOOKAHEAD_S + self.budget - self.start) * self.fps - 1e-6)
            self.first = max(first_tick, self.tick, self.end_tick)

    def _schedule(self, frames: list[SpeechFrame], now: float) -> None:
        for f in frames:
            tick = self.first + f.index
            self.stats.speech_frames += 1
            if tick < self.tick:  # its tick was shown before its audio arrived (a stalled input): a drop
                self.stats.dropped, self.stats.idle = self.stats.dropped + 1, self.stats.idle - 1
            elif f.level_db < self.silence_db and self.idle == "keep":
                self.plan[tick] = "idle"
            else:
                self._queue(tick, f.mel, now)
        self.shared.lock.notify_all()

    def _queue(self, tick: int, mel: np.ndarray, now: float) -> None:
        crop = self.avatar.crops[self.avatar.index(tick)]
        if crop is None:
            self.plan[tick] = "none"
            return
        deadline = self.display_time(tick)
        self.plan[tick] = self.pending[tick] = Job(self, tick, crop, mel, max(now, deadline - self.budget), deadline)

    def take(self, now: float, busy: float) -> Job | None:
        """The newest job that may start now (shared lock held); older ones that can no longer be ready before
        their tick (`busy` seconds from now) are dropped."""
        eligible = [t for t, job in self.pending.items() if job.eligible <= now]
        if not eligible or self.failure is not None:
            return None
        newest = max(eligible)
        for tick in [t for t, job in self.pending.items() if job.deadline < now + busy and t != newest]:
            del self.pending[tick]
        return self.pending.pop(newest)

    def deliver(self, job: Job, face: np.ndarray, now: float) -> None:
        """A generated face (shared lock held): kept for its tick, unless that tick was already shown."""
        self._failures_in_a_row = 0
        if now > job.deadline or job.tick < self.tick or self.plan.get(job.tick) is not job:
            return
        self.faces[job.tick] = face
        self.stats.latencies.append(now - job.eligible)
        if self.stats.first_ready is None:
            self.stats.first_ready = now

    def generator_failed(self, message: str) -> None:
        """A generator call lost some of this session's frames (shared lock held): counted; the session ends
        after `FAILURES_TO_END` in a row."""
        self.stats.errors += 1
        self._failures_in_a_row += 1
        if self._failures_in_a_row >= FAILURES_TO_END and self.failure is None:
            self.failure = (f"the generator failed {self._failures_in_a_row} times in a row on this session's "
                            f"frames ({message}); the session ends")  # fmt: skip
            self.pending.clear()

    def next_frame(self) -> np.ndarray:
        """The frame of the next tick: generated, repeated (its face was not ready: dropped) or the source's;
        `GeneratorError` once the session has ended."""
        with self.shared.lock:
            if self.failure is not None:
                raise GeneratorError(self.failure)
            tick, self.tick = self.tick, self.tick + 1
            kind, face = self.plan.pop(tick, None), self.faces.pop(tick, None)
            self.pending.pop(tick, None)
            if self.idle == "generate" and self.speech is None:
                self._queue_silence(tick + math.ceil(self.budget * self.fps))
        source = next(self.frames)
        if face is not None:
            frame = source.copy()
            self.avatar.paste(frame, self.avatar.index(tick), face)
            self.stats.generated += 1
        elif isinstance(kind, Job):
            frame = self.last_frame if self.last_frame is not None else source
            self.stats.dropped += 1
        else:
            frame = source
            self.stats.idle += 1
        self.last_frame = frame
        return frame

    def skip_to(self, now: float) -> None:
        """Catch the clock up with `now` (a viewer that connected late): past ticks are not shown."""
        while self.display_time(self.tick + 1) <= now:
            self.next_frame()

    def _queue_silence(self, tick: int) -> None:
        """`idle="generate"`: a frame of silence for an idle tick (shared lock held)."""
        if tick in self.plan or tick < self.end_tick:
            return
        if self._silent_mel is None:
            silence = np.zeros(self.avatar.hp.n_fft * 8, np.float32)
            self._silent_mel = audio.melspectrogram(silence, self.avatar.hp)[:, : audio.MEL_STEP_SIZE]
        self._queue(tick, self._silent_mel, self.shared.clock())
        self.shared.lock.notify_all()


class DelayedAudio:
    """The speech's samples placed on the session's timeline (sample 0 = tick 0), read back in order."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.chunks: list[tuple[int, np.ndarray]] = []  # (position, samples), by position
        self.lock = threading.Lock()

    def write(self, position: int, samples: np.ndarray) -> None:
        """Place `samples` at `position`; what lies more than `AUDIO_KEPT_S` before them goes (no reader)."""
        oldest = position - round(AUDIO_KEPT_S * self.sample_rate)
        with self.lock:
            self.chunks = [(p, s) for p, s in self.chunks if p + len(s) > oldest]
            bisect.insort(self.chunks, (position, samples), key=lambda c: c[0])

    def read(self, position: int, n: int) -> np.ndarray:
        """`n` samples from `position` (silence where nothing was said); earlier chunks are dropped."""
        out = np.zeros(n, np.float32)
        with self.lock:
            self.chunks = [(p, s) for p, s in self.chunks if p + len(s) > position]
            for p, s in self.chunks:
                if p >= position + n:
                    break
                lo, hi = max(p, position), min(p + len(s), position + n)
                out[lo - position : hi - position] = s[lo - p : hi - p]
        return out

    def clear_from(self, position: int) -> None:
        with self.lock:
            self.chunks = [(p, s[: max(0, position - p)]) for p, s in self.chunks if p < position]
