"""The live path (`LiveSession` on a `SharedGenerator`, what the server and `--pace realtime` run), on a
simulated clock: its frames are the offline frames, tick for tick; drops stay bounded when the machine cannot
keep up and do not happen when it can; an interruption shows the source frames from the next tick; a
generator that fails is counted, logged once and, if it keeps failing, ends the session.

The clock is virtual and the workers are simulated (each call takes `per_frame` seconds of virtual time a
frame), so the schedule is deterministic whatever the load of the machine; the faces are the generator's own.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

import audio
from lipsync.generation import Generator
from live import sessions as live
from live import stream as streaming
from live.options import LiveOptions
from tests.live_frames import MelPainter, offline_frames
from tests.media import speech, write_video, write_wav

BOX = (20, 110, 30, 120)
STEP = 0.004  # seconds of virtual time per step: 5 steps a 20 ms chunk, 10 a tick


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("live media")
    return {"video": write_video(d / "face.mp4", 9), "speech": write_wav(d / "speech.wav", 1.0), "dir": d}


class VirtualClock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class Simulation:
    """Sessions saying their speech from tick 0 (as file mode begins them), fed `chunk_ms` chunks when their
    last sample is spoken, on `workers` simulated generator workers."""

    def __init__(self, avatar, generator: Generator, wavs: list[np.ndarray], *, chunk_ms: float = 20,
                 per_frame: float | Callable[[int], float] = 0.01, workers: int = 2, budget_ms: float = 500,
                 batch: int = 4) -> None:  # fmt: skip
        self.clock, self.wavs = VirtualClock(), wavs
        self.per_frame = per_frame if callable(per_frame) else lambda n: per_frame  # seconds a frame, at batch n
        self.chunk = round(chunk_ms * 16)
        self.shared = live.SharedGenerator(generator, batch, clock=self.clock, workers=0)
        opts = LiveOptions(latency_budget_ms=budget_ms, live_batch=batch)
        start = chunk_ms / 1000 + streaming.LOOKAHEAD_S + opts.budget
        self.sessions = [live.LiveSession(avatar, self.shared, opts, start=start) for _ in wavs]
        for s in self.sessions:
            s.begin(first_tick=0, now=0.0)
        self.shown: list[list[np.ndarray]] = [[] for _ in wavs]
        self.running: list[tuple | None] = [None] * workers  # each worker's (jobs, faces, started, done at)
        self.batches: list[list[live.Job]] = []
        self.fed, self.chunks = 0, max(-(-len(w) // self.chunk) for w in wavs)

    def run_until(self, t: float, keep: bool = True, on_tick=None) -> None:
        """Advance the clock to `t` (or the step after): feed, run the workers, show each session's due ticks."""
        with threadpool_limits(limits=1, user_api="blas"):  # as realtime.py runs it
            while self.clock.now < t - 1e-9:
                self.clock.now += STEP
                self._feed()
                self._work()
                for i, s in enumerate(self.sessions):
                    while s.display_time(s.tick) <= self.clock.now + 1e-9:
                        tick, frame = s.tick, s.next_frame()
                        if keep:
                            self.shown[i].append(frame.copy())
                        if on_tick is not None:
                            on_tick(i, tick)

    def stop_feeding(self) -> None:
        self.chunks = self.fed

    def _feed(self) -> None:
        """Chunk i of each speech when its last sample is spoken, and the end with the last (as file mode)."""
        while self.fed < self.chunks and (self.fed + 1) * self.chunk / 16000 <= self.clock.now + 1e-9:
            end = (self.fed + 1) * self.chunk
            for s, wav in zip(self.sessions, self.wavs, strict=True):
                if (piece := wav[end - self.chunk : end]).size:
                    s.feed(piece)
                    if end >= len(wav):
                        s.end()
            self.fed += 1

    def _work(self) -> None:
        now = self.clock.now
        for w, running in enumerate(self.running):
            if running is not None and running[3] <= now + 1e-9:
                jobs, faces, started, _ = running
                if faces is not None:
                    self.shared.finish(jobs, faces, started, now)
                self.running[w] = running = None
            if running is None and (jobs := self.shared.next_batch(now)):
                self.batches.append(jobs)
                done = now + self.per_frame(len(jobs)) * len(jobs)
                self.running[w] = (jobs, self.shared.generate(jobs), now, done)


def n_frames(wav: np.ndarray) -> int:
    return len(streaming.speech_starts(len(wav), 25.0))


def painter(sync) -> Generator:
    return Generator(MelPainter(), sync.device, quiet=True)


@pytest.mark.parametrize(
    ("options", "chunk_ms", "sessions"),
    [({"box": BOX}, 20, 1), ({"box": BOX}, 333, 1), ({}, 20, 1), ({}, 333, 2)],
    ids=["box,20ms", "box,333ms", "detected,20ms", "detected,333ms,2 sessions"],
)
def test_live_frames_are_the_offline_frames_tick_for_tick(painted_sync, media, options, chunk_ms, sessions):
    """Every tick shows the offline frame of that tick: its own window (a window one tick off changes the
    painted mouth), its own crop and source frame. With two sessions, their frames share batches."""
    offline = offline_frames(painted_sync, media["video"], media["speech"], media["dir"] / "o.mp4", **options)
    wav, _ = audio.load_speech_wav(media["speech"])
    avatar = streaming.prepare_avatar(painted_sync, media["video"], len(wav), **options)
    sim = Simulation(avatar, painted_sync.generator, [wav] * sessions, chunk_ms=chunk_ms)
    sim.run_until(sim.sessions[0].display_time(n_frames(wav) - 1))
    for s, shown in zip(sim.sessions, sim.shown, strict=True):
        assert len(shown) == len(offline) == 25
        wrong = [t for t, (a, b) in enumerate(zip(shown, offline, strict=True)) if not np.array_equal(a, b)]
        assert not wrong, f"ticks {wrong} differ from the offline frames"
        assert s.stats.dropped == s.stats.errors == 0 and s.stats.generated == 25
    if sessions > 1:
        assert any(len({id(j.session) for j in jobs}) > 1 for jobs in sim.batches)


def test_the_network_live_is_offline_within_round_off(sync, media):
    """With the network itself, two sessions at once (their frames batched together, not as offline): every
    tick within 2 levels of the offline frame."""
    offline = offline_frames(sync, media["video"], media["speech"], media["dir"] / "net.mp4", box=BOX)
    wav, _ = audio.load_speech_wav(media["speech"])
    avatar = streaming.prepare_avatar(sync, media["video"], len(wav), box=BOX)
    sim = Simulation(avatar, sync.generator, [wav, wav])
    sim.run_until(sim.sessions[0].display_time(n_frames(wav) - 1))
    assert any(len({id(j.session) for j in jobs}) > 1 for jobs in sim.batches)
    for s, shown in zip(sim.sessions, sim.shown, strict=True):
        diff = [int(np.abs(a.astype(int) - b).max()) for a, b in zip(shown, offline, strict=True)]
        assert max(diff) <= 2 and s.stats.dropped == 0 and s.stats.generated == 25, diff


def test_latency_stays_bounded_when_the_machine_cannot_keep_up(painted_sync, media):
    """60 s of speech for 4 sessions at 25 fps (100 frames/s) on 2 workers of 9 frames/s each: frames are
    dropped, each session gets its share, and the latency of the last 5 s is no higher than the first 5 s'."""
    avatar = streaming.prepare_avatar(painted_sync, media["video"], box=BOX)
    generator = painted_sync.generator
    for sessions in (1, 4):
        sim = Simulation(avatar, generator, [speech(60.0)] * sessions, per_frame=0.11)
        sim.run_until(61.0, keep=False)
        generated = sum(s.stats.generated for s in sim.sessions)
        assert generated / 60.0 >= 0.9 * 2 / 0.11  # the workers stay busy: ~18 frames/s in all
        for s in sim.sessions:
            lat = np.array(s.stats.latencies)
            assert s.stats.dropped > 0 and lat.max() <= 0.5
            assert s.stats.generated >= 0.8 * generated / sessions
            per_second = len(lat) // 60  # the 5 s after the first, and 5 s before the last (which ends the speech)
            early, late = lat[per_second : 6 * per_second], lat[-6 * per_second : -per_second]
            assert np.percentile(late, 95) <= np.percentile(early, 95) + 0.01


def test_no_drops_when_the_machine_keeps_up(painted_sync, media):
    """A generator of 20 frames/s on each of 2 workers (bf16 on 2 idle cores makes 40-50 in all): every frame
    of 5 s is generated, in full batches, within the budget."""
    avatar = streaming.prepare_avatar(painted_sync, media["video"], box=BOX)
    sim = Simulation(avatar, painted_sync.generator, [speech(5.0)], per_frame=0.05)
    sim.run_until(6.5, keep=False)
    (s,) = sim.sessions
    assert s.stats.dropped == 0 and s.stats.generated == s.stats.speech_frames == 125
    assert np.percentile(s.stats.latencies, 95) <= 0.5 and s.stats.first_ready - s.stats.first_feed < 0.8
    assert sum(len(jobs) == 4 for jobs in sim.batches) >= 0.9 * len(sim.batches)


BF16_COST = {1: 0.064, 2: 0.052, 3: 0.044, 4: 0.042}  # s of one core a frame, by batch (2-core EPYC, bf16)


def test_the_defaults_keep_up_with_bf16_on_2_cores_with_room_to_spare(painted_sync, media):
    """The generator's measured bf16 cost on this 2-core CPU, 1.7 times over (the encoder and display share
    the cores; a busier moment): 30 s of 20 ms chunks with the default budget and batch drop nothing, in
    batches of 2.5 frames or more on average. (Taking the frames as they came, not gathered into batches,
    dropped 81 of the 750.)"""
    avatar = streaming.prepare_avatar(painted_sync, media["video"], box=BOX)
    defaults = LiveOptions()

    def cost(n: int) -> float:
        return 1.7 * BF16_COST[min(n, 4)]

    sim = Simulation(avatar, painted_sync.generator, [speech(30.0)], per_frame=cost,
                     budget_ms=defaults.latency_budget_ms, batch=defaults.live_batch)  # fmt: skip
    sim.run_until(31.5, keep=False)
    (s,) = sim.sessions
    assert s.stats.dropped == 0 and s.stats.generated == s.stats.speech_frames == 750
    assert np.mean([len(jobs) for jobs in sim.batches]) >= 2.5 and max(s.stats.latencies) < defaults.budget


def test_an_interruption_shows_the_source_from_the_next_tick(painted_sync, media):
    """Frames were generated ahead of their ticks; after `interrupt` none of them is shown: the source frames,
    from the very next tick (README: "idle from the next frame"), and its speech is silent."""
    wav = speech(2.0)
    avatar = streaming.prepare_avatar(painted_sync, media["video"], box=BOX)
    sim = Simulation(avatar, painted_sync.generator, [wav])
    (s,) = sim.sessions
    sim.run_until(s.display_time(20))
    assert s.tick == 21 and s.faces, "faces ready ahead of their ticks"
    generated = s.stats.generated
    assert generated == 21
    s.interrupt()
    sim.stop_feeding()  # as the server cancels what /speak was saying
    sim.run_until(s.display_time(45))
    after = sim.shown[0][21:]
    assert len(after) == 25
    wrong = [21 + i for i, f in enumerate(after) if not np.array_equal(f, avatar.frames[(21 + i) % 9])]
    assert not wrong, f"ticks {wrong} after the interruption are not the source frames"
    assert s.stats.generated == generated and not s.audio_out.read(round(21 * 640), 16000).any()


class Failing:
    """A forward pass that raises on the calls `failing(call)` says, else paints."""

    def __init__(self, failing) -> None:
        self.failing, self.calls, self.paint = failing, 0, MelPainter()

    def __call__(self, faces: np.ndarray, mels: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.failing(self.calls):
            raise RuntimeError("out of cheese")
        return self.paint(faces, mels)


def test_a_generator_failure_is_counted_and_logged_once(painted_sync, media, capfd):
    avatar = streaming.prepare_avatar(painted_sync, media["video"], box=BOX)
    wav = speech(1.0)
    generator = Generator(Failing(lambda call: call in (3, 5)), torch.device("cpu"), quiet=True)
    sim = Simulation(avatar, generator, [wav])
    sim.run_until(sim.sessions[0].display_time(n_frames(wav) - 1))
    (s,) = sim.sessions
    assert s.stats.errors == 2 and s.failure is None and sim.shared.errors == 2
    assert s.stats.dropped >= 2 and s.stats.generated + s.stats.dropped == 25
    err = capfd.readouterr().err
    assert err.count("RuntimeError: out of cheese") == 1 and err.count("Traceback") == 1


def test_a_generator_that_keeps_failing_ends_the_session(painted_sync, media):
    avatar = streaming.prepare_avatar(painted_sync, media["video"], box=BOX)
    wav = speech(1.0)
    generator = Generator(Failing(lambda call: call > 1), torch.device("cpu"), quiet=True)
    sim = Simulation(avatar, generator, [wav])
    with pytest.raises(live.GeneratorError, match="failed 3 times in a row .*RuntimeError: out of cheese"):
        sim.run_until(sim.sessions[0].display_time(n_frames(wav) - 1))
    assert sim.sessions[0].stats.errors == 3


def test_delayed_audio_places_speech_on_the_timeline():
    out = live.DelayedAudio(16000)
    out.write(100, np.ones(50, np.float32))
    out.write(200, np.full(10, 2.0, np.float32))
    got = out.read(90, 130)
    assert got[:10].sum() == 0 and got[10:60].sum() == 50 and got[110:120].sum() == 20
    out.clear_from(120)
    assert out.read(90, 130)[10:].sum() == 20  # 100..119 kept, the rest dropped
