"""realtime.py's server mode through a Python WebRTC client (aiortc), as a browser would use it: every frame
received is the offline frame of its tick (read from the stamp the server draws in a test-only setting),
nothing is dropped, an interruption shows the source from the next tick; bad input is a clear error; a
generator that keeps failing ends the session visibly; clients that leave or vanish leak nothing.

The server runs in this process on a thread of its own, on 127.0.0.1 and a free port. Its generator is
`tests.live_frames.MelPainter` (instant, and its mouth tells each window from its neighbours), its avatar a
160x128 test clip with a fixed box.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import subprocess
import sys
import time

import aiohttp
import numpy as np
import pytest
import torch
from aiortc import RTCSessionDescription

from lipsync.generation import Generator
from live import webrtc as webrtc_server
from tests.live_frames import MelPainter, expected_ticks, judge, mouth_error, read_tick
from tests.live_server import Recorder, client, connect, health, keep_frames, offer, start


@pytest.fixture(scope="module")
def running(painted_sync, talk_media):
    server = start(painted_sync, talk_media["video"])
    yield server
    server.stop()


def compare(frames: list[np.ndarray], avatar, recorder: Recorder, cut: int | None = None) -> dict[str, np.ndarray]:
    """(tick, right) of each received frame, by kind: whether it is the offline frame of the tick stamped on it
    (`judge`; the source from tick `cut` on, when the speech was interrupted there)."""
    ticks = [read_tick(f) for f in frames]
    assert sum(t is not None for t in ticks) >= 0.9 * len(frames), "the tick stamps did not survive VP8"
    last = max(t for t in ticks if t is not None)
    expected = expected_ticks(avatar, MelPainter(), recorder.wav, recorder.frame_ticks(avatar.fps), last + 1)
    instead = None
    if cut is not None:
        instead = list(expected)
        expected[cut:] = [avatar.frames[t % len(avatar.frames)] for t in range(cut, last + 1)]
    judged = judge(frames, ticks, expected, avatar.frames, mouth_error, instead)
    return {kind: np.array(pairs, int).reshape(-1, 2) for kind, pairs in judged.items()}


def test_a_client_sees_the_offline_frame_of_every_tick(running, talk_media):
    """The microphone says 1 s of silence, 2 s of speech, 3 s of silence; every frame received is its tick's
    offline frame (of the audio the session was fed), within VP8's loss, and none was dropped."""

    async def scenario() -> tuple[list, Recorder, dict]:
        pc = client(talk_media["talk"])
        frames = keep_frames(pc)
        answer = await connect(pc, running.url)
        recorder = Recorder(running.server.peers[answer["session"]].session)
        await asyncio.sleep(9.0)
        figures = await health(running.url, session=answer["session"])
        await pc.close()
        return frames, recorder, figures

    frames, recorder, figures = asyncio.run(scenario())
    right = compare(frames, running.server.avatar, recorder)
    generated, source = right["generated"][:, 1], right["source"][:, 1]
    assert len(generated) >= 30 and len(source) >= 60, (len(generated), len(source))  # 50 ticks of speech
    assert generated.mean() >= 0.9 and source.mean() >= 0.9, right
    (mine,) = figures["sessions"]
    assert mine["dropped"] == mine["errors"] == 0 and mine["generated"] >= 45, mine
    assert (
        figures["errors"] == 0 and figures["precision"] == "fp32" and set(mine["latency_ms"]) == {"p50", "p95", "max"}
    )


def test_speak_then_interrupt_shows_the_source_from_the_next_tick(running, talk_media):
    """/speak says the WAV (exact samples, no codec); /interrupt mid-speech: the ticks before it show the
    speech's offline frames, every tick from the one after it the source (faces made ahead are not shown)."""

    async def scenario() -> tuple[list, Recorder, dict]:
        pc = client()
        frames = keep_frames(pc)
        answer = await connect(pc, running.url)
        recorder = Recorder(running.server.peers[answer["session"]].session)
        params = {"session": answer["session"]}
        async with aiohttp.ClientSession() as http:
            said = await http.post(f"{running.url}/speak", params=params, data=talk_media["talk"].read_bytes())
            assert said.status == 200 and (await said.json())["seconds"] == pytest.approx(6.0, abs=0.01)
            await asyncio.sleep(5.2)  # the speech (from 1 s) shows from ~4.2 s (look-ahead + budget): 25 ticks
            stopped = await http.post(f"{running.url}/interrupt", params=params)
            assert stopped.status == 200
            assert (await http.post(f"{running.url}/interrupt", params={"session": "nobody"})).status == 404
        await asyncio.sleep(2.0)
        figures = await health(running.url, **params)
        await pc.close()
        return frames, recorder, figures

    frames, recorder, figures = asyncio.run(scenario())
    assert figures["sessions"][0]["dropped"] == figures["sessions"][0]["errors"] == 0, figures
    cut = recorder.interrupted[1]  # (/speak interrupts first, whatever was being said; closing, last)
    right = compare(frames, running.server.avatar, recorder, cut)
    generated, after = right["generated"], right["source"][right["source"][:, 0] >= cut]
    assert len(generated) >= 8 and generated[:, 1].mean() >= 0.9, right  # the speech, before the interruption
    assert len(after) >= 30 and after[:, 1].mean() >= 0.9, right  # the source from the next tick


def test_bad_input_is_a_clear_error_and_the_server_goes_on(running, talk_media):
    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            url = running.url
            reply = await http.post(f"{url}/speak", data=talk_media["notes"].read_bytes())
            assert reply.status == 400 and "cannot be decoded" in (await reply.json())["error"]
            form = aiohttp.FormData()
            form.add_field("file", talk_media["notes"].read_bytes(), filename="notes.txt")
            assert (await http.post(f"{url}/speak", data=form)).status == 400
            assert (await http.post(f"{url}/speak")).status == 400  # no body
            for body in (b"{not json", b'{"sdp": 3}', b'{"sdp": "v=0 garbage", "type": "offer"}',
                         b'{"sdp": "x", "type": "answer"}'):  # fmt: skip
                reply = await http.post(f"{url}/offer", data=body, headers={"Content-Type": "application/json"})
                assert reply.status == 400, body
                assert "error" in await reply.json()
            figures = await health(url)
            assert figures["sessions"] == [] and figures["errors"] == 0 and figures["last_error"] is None
            page = await http.get(f"{url}/")
            assert page.status == 200 and "<video" in await page.text()

    asyncio.run(scenario())


def test_a_generator_that_keeps_failing_ends_the_session(painted_sync, talk_media, monkeypatch, capfd):
    """The session's frames fail: counted, the cause logged once, and after 3 calls in a row the session ends:
    its video ends, it leaves /health, and /health says why."""

    def broken(faces: np.ndarray, mels: np.ndarray) -> np.ndarray:
        raise RuntimeError("the accelerator fell off")

    monkeypatch.setattr(painted_sync, "generator", Generator(broken, torch.device("cpu"), quiet=True))
    server = start(painted_sync, talk_media["video"])

    async def scenario() -> dict:
        pc = client()
        await connect(pc, server.url)
        async with aiohttp.ClientSession() as http:
            assert (await http.post(f"{server.url}/speak", data=talk_media["talk"].read_bytes())).status == 200
        for _ in range(100):
            await asyncio.sleep(0.1)
            if not (figures := await health(server.url))["sessions"]:
                break
        await pc.close()
        return figures

    try:
        figures = asyncio.run(scenario())
    finally:
        server.stop()
    assert figures["sessions"] == [] and figures["errors"] >= 3
    assert "failed 3 times in a row" in figures["last_error"] and "the accelerator fell off" in figures["last_error"]
    err = capfd.readouterr().err
    assert err.count("Traceback") == 1 and "ended: the generator failed 3 times in a row" in err


def test_twenty_clients_come_and_go_and_leave_no_memory_behind(painted_sync, talk_media):
    """20 sessions (5 rounds of 4 at once, while a fifth client is told the server is full) leave the memory
    in use within 1 MB a session of before: a leak of 2 MB a session would show."""
    server = start(painted_sync, talk_media["video"])
    try:
        for _ in range(3):  # warm up: aiortc's, the codecs' and the allocator's one-time allocations
            assert come_and_go(server, 5) == 4
        before = in_use_mb()
        assert sum(come_and_go(server, 5) for _ in range(5)) == 20
        assert not server.server.shared.sessions
        grown = in_use_mb() - before
        assert grown <= 20 * 1.0, f"{grown:.1f} MB more after 20 sessions"
    finally:
        server.stop()


def come_and_go(server, n: int) -> int:
    """`crowd`, then wait for the server to have closed every session: the clients accepted."""
    accepted = asyncio.run(crowd(server.url, n))
    for _ in range(100):
        if not server.server.peers:
            break
        server.call(asyncio.sleep(0.1))
    assert not server.server.peers
    return accepted


def in_use_mb() -> float:
    """Resident memory once the garbage is collected and glibc has handed its arenas' free pages back: memory
    the allocator keeps for later is no leak (it made the resident size vary by up to 40 MB from one run to
    the next), memory still held is."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return webrtc_server.memory_mb()


async def crowd(url: str, n: int) -> int:
    """`n` clients offer at once; those accepted watch for 1.5 s and disconnect mid-stream."""
    pcs = [client() for _ in range(n)]
    answers = await asyncio.gather(*(offer_of(pc, url) for pc in pcs))
    assert {a["status"] for a in answers} <= {200, 503}
    assert all("full" in a["error"] for a in answers if a["status"] == 503)
    await asyncio.sleep(1.5)
    for pc in pcs:
        await pc.close()
    return sum(a["status"] == 200 for a in answers)


async def offer_of(pc, url: str) -> dict:
    """The server's reply to `pc`'s offer; the answer taken if it accepted."""
    answer = await offer(pc, url)
    if answer["status"] == 200:
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    return answer


def test_a_client_that_vanishes_leaves_within_seconds(running, repo):
    """A client killed without a word (a closed browser) is closed when nothing has come from it for
    `INACTIVE_S` (5 s), not after ICE's 30 s or more."""
    process = subprocess.Popen([sys.executable, "-m", "tests.live_server", running.url], cwd=repo,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        session = process.stdout.readline().strip()
        for _ in range(200):
            figures = asyncio.run(health(running.url, session=session))
            if figures["sessions"] and figures["sessions"][0]["state"] == "connected":
                break
            time.sleep(0.1)
        assert figures["sessions"][0]["state"] == "connected", figures
        time.sleep(2.0)
        assert session in running.server.peers  # a live client is kept
    finally:
        process.kill()
        process.wait()
    killed = time.monotonic()
    while session in running.server.peers and time.monotonic() - killed < 30:
        time.sleep(0.2)
    gone = time.monotonic() - killed
    assert session not in running.server.peers and gone <= webrtc_server.INACTIVE_S + 4, f"left after {gone:.1f} s"
