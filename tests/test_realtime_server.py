"""realtime.py's server mode through a Python WebRTC client (aiortc), as a browser would use it, and its
answers to bad input: non-media uploads, malformed offers, clients that vanish, many sessions at once.

The server runs in this process on a thread of its own, on 127.0.0.1 and a free port, and is stopped by
the fixture. The avatar is a 160x128 test clip with a fixed box; the client's microphone plays a WAV of
silence, speech, then silence.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer

from audio import save_wav
from live import webrtc as webrtc_server
from live.options import LiveOptions
from tests import test_lipsync
from tests.media import speech, write_video

sync = test_lipsync.sync  # the fixture: a LipSync with the fake detector, shared with that module
BOX = (20, 110, 30, 120)  # top bottom left right
MOUTH = (slice(70, 106), slice(35, 115))  # rows, columns: the lower half of the box, where the generator draws
BUDGET_MS = 3000  # generous: the test is about what arrives, on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """An AvatarServer served on a thread of its own until `stop()`."""

    def __init__(self, server: webrtc_server.AvatarServer) -> None:
        self.server, self.port = server, free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = web.AppRunner(server.app())
        self.call(self._start())
        self.url = f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def call(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.server.shared.close()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("server media")
    talk = np.concatenate([np.zeros(16000, np.float32), speech(2.0), np.zeros(48000, np.float32)])
    save_wav(talk, d / "talk.wav", 16000)
    notes = d / "notes.txt"
    notes.write_text("not audio\n" * 100)
    return {"video": write_video(d / "face.mp4", 25), "talk": d / "talk.wav", "notes": notes, "dir": d}


def start(sync, media, max_sessions: int = 4) -> Running:
    live = LiveOptions(latency_budget_ms=BUDGET_MS, live_batch=2, max_sessions=max_sessions)
    return Running(webrtc_server.build(sync, str(media["video"]), live, {"box": BOX}))


@pytest.fixture(scope="module")
def running(sync, media):
    server = start(sync, media)
    yield server
    server.stop()


async def offer(pc: RTCPeerConnection, url: str) -> dict:
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        reply = await http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"})
        return {"status": reply.status, **(await reply.json())}


async def watch(url: str, microphone: Path | None, seconds: float) -> tuple[list, dict]:
    """Connect (sending `microphone` as the microphone), keep the video frames for `seconds`, disconnect."""
    pc = RTCPeerConnection()
    if microphone is not None:
        pc.addTrack(MediaPlayer(str(microphone)).audio)
    else:
        pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    frames: list[np.ndarray] = []

    @pc.on("track")
    def on_track(track) -> None:
        if track.kind == "video":

            async def read() -> None:
                while True:
                    frames.append((await track.recv()).to_ndarray(format="bgr24"))

            asyncio.ensure_future(read())

    answer = await offer(pc, url)
    assert answer["status"] == 200, answer
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    await asyncio.sleep(seconds)
    async with aiohttp.ClientSession() as http:
        health = await (await http.get(f"{url}/health", params={"session": answer["session"]})).json()
    await pc.close()
    return frames, health


def mouth_error(frame: np.ndarray, sources: list[np.ndarray]) -> float:
    """How far the mouth region is from the nearest source frame's (mean absolute difference)."""
    return min(float(np.abs(frame[MOUTH].astype(int) - s[MOUTH]).mean()) for s in sources)


def test_a_client_sees_the_avatar_speak_its_microphone(running, media):
    frames, health = asyncio.run(watch(running.url, media["talk"], 9.0))
    assert len(frames) > 100 and all(f.shape == (128, 160, 3) for f in frames)
    sources = running.server.avatar.frames
    errors = np.array([mouth_error(f, sources) for f in frames])
    assert (errors > 15).sum() >= 5, errors.round(1)  # the mouth was redrawn while the WAV spoke
    assert (errors[:20] < 6).all(), errors[:20].round(1)  # silence first: the source frames (after VP8)
    assert (errors[-25:] < 6).all(), errors[-25:].round(1)  # and silence again at the end
    (mine,) = health["sessions"]
    assert mine["generated"] >= 5 and mine["fps"] > 15 and set(mine["latency_ms"]) == {"p50", "p95", "max"}


def test_speak_and_interrupt_over_http(running, media):
    async def scenario() -> tuple[list, list]:
        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")
        answer = await offer(pc, running.url)
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        session = running.server.peers[answer["session"]]
        async with aiohttp.ClientSession() as http:
            with open(media["talk"], "rb") as f:
                said = await http.post(f"{running.url}/speak", params={"session": answer["session"]}, data=f)
            assert said.status == 200 and (await said.json())["seconds"] == pytest.approx(6.0, abs=0.01)
            await asyncio.sleep(2.0)
            assert session.speaking is not None and session.session.plan
            stopped = await http.post(f"{running.url}/interrupt", params={"session": answer["session"]})
            assert stopped.status == 200 and not session.session.plan and not session.session.pending
            missing = await http.post(f"{running.url}/interrupt", params={"session": "nobody"})
            assert missing.status == 404
        await pc.close()
        return [], []

    asyncio.run(scenario())


def test_bad_input_is_a_clear_error_and_the_server_goes_on(running, media):
    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            url = running.url
            reply = await http.post(f"{url}/speak", data=media["notes"].read_bytes())
            assert reply.status == 400 and "cannot be decoded" in (await reply.json())["error"]
            form = aiohttp.FormData()
            form.add_field("file", media["notes"].read_bytes(), filename="notes.txt")
            assert (await http.post(f"{url}/speak", data=form)).status == 400
            assert (await http.post(f"{url}/speak")).status == 400  # no body
            for body in (b"{not json", b'{"sdp": 3}', b'{"sdp": "v=0 garbage", "type": "offer"}',
                         b'{"sdp": "x", "type": "answer"}'):  # fmt: skip
                reply = await http.post(f"{url}/offer", data=body, headers={"Content-Type": "application/json"})
                assert reply.status == 400, body
                assert "error" in await reply.json()
            health = await http.get(f"{url}/health")
            assert health.status == 200 and (await health.json())["sessions"] == []
            page = await http.get(f"{url}/")
            assert page.status == 200 and "<video" in await page.text()

    asyncio.run(scenario())


def test_many_sessions_at_once_and_clients_that_vanish_leak_nothing(sync, media):
    server = start(sync, media, max_sessions=4)
    try:
        asyncio.run(crowd(server.url, 2))  # warm up: aiortc's and the codecs' one-time allocations
        gc.collect()
        before = webrtc_server.memory_mb()
        accepted = asyncio.run(crowd(server.url, 20))
        assert accepted == 4  # the rest were told the server is full
        for _ in range(100):
            if not server.server.peers:
                break
            server.call(asyncio.sleep(0.1))
        assert not server.server.peers and not server.server.shared.sessions
        gc.collect()
        assert webrtc_server.memory_mb() <= before * 1.1
    finally:
        server.stop()


async def crowd(url: str, n: int) -> int:
    """`n` clients offer at once; those accepted watch for 2 s and disconnect mid-stream."""
    pcs = [RTCPeerConnection() for _ in range(n)]
    for pc in pcs:
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")
    answers = await asyncio.gather(*(offer(pc, url) for pc in pcs))
    statuses = sorted(a["status"] for a in answers)
    assert set(statuses) <= {200, 503}
    full = [a for a in answers if a["status"] == 503]
    assert all("full" in a["error"] for a in full)
    connected = [(pc, a) for pc, a in zip(pcs, answers, strict=True) if a["status"] == 200]
    for pc, answer in connected:
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    await asyncio.sleep(2.0)
    for pc in pcs:
        await pc.close()
    return len(connected)
