"""realtime.py's server on a thread of the test process, and a WebRTC client for it (aiortc), shared by the
server and browser tests.

    python -m tests.live_server URL    # a client that connects, then waits to be killed (a closed browser)
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import MediaStreamError

import audio
from hparams import hparams
from live import webrtc as webrtc_server
from live.options import LiveOptions
from tests.ports import free_port

BOX = (20, 110, 30, 120)  # top bottom left right, inside the 160x128 test frames


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

    @staticmethod
    async def _cancel_the_rest() -> None:
        """The tasks the peers left (aiortc's among them), cancelled and awaited, not destroyed pending."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def call(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.runner.cleanup())
        self.call(self._cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.server.shared.close()


def start(sync, video: Path, max_sessions: int = 4, budget_ms: float = 3000) -> Running:
    """A server of `video` with `BOX`, each frame's tick stamped in its corner. The budget is generous: the
    client, the server and its generator share this process, on 2 busy cores."""
    live = LiveOptions(latency_budget_ms=budget_ms, max_sessions=max_sessions)
    return Running(webrtc_server.build(sync, str(video), live, {"box": BOX}, stamp_ticks=True))


class Recorder:
    """Wraps a session's `feed` and `interrupt`: the samples it was fed, the tick of frame 0 in force after
    each feed (an input that stalls moves it later) and the tick each interruption took effect from, to
    compute the frames it should have shown."""

    def __init__(self, session) -> None:
        self.session, self.samples, self.firsts, self.interrupted = session, [], [], []
        feed, interrupt = session.feed, session.interrupt

        def recorded_feed(samples, now=None):
            self.samples.append(np.asarray(samples, np.float32).ravel().copy())
            feed(samples, now)
            self.firsts.append(session.first)

        def recorded_interrupt():
            self.interrupted.append(session.tick)
            interrupt()

        session.feed, session.interrupt = recorded_feed, recorded_interrupt

    @property
    def wav(self) -> np.ndarray:
        return np.concatenate(self.samples) if self.samples else np.zeros(0, np.float32)

    def frame_ticks(self, fps: float) -> list[int]:
        """The tick of each frame the feeds completed: frame k's window (from column int(k·80/fps)) is
        complete once the audio reaches its last column + n_fft/2; it is shown at frame 0's tick then + k."""
        totals = np.cumsum([len(s) for s in self.samples])
        step, hop, pad = audio.MEL_COLUMNS_PER_SECOND / fps, hparams.hop_length(), hparams.n_fft // 2
        ticks = []
        while (i := int(np.searchsorted(totals, pad + hop * (int(len(ticks) * step) + 15)))) < len(totals):
            ticks.append(self.firsts[i] + len(ticks))
        return ticks


async def offer(pc: RTCPeerConnection, url: str) -> dict:
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        reply = await http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"})
        return {"status": reply.status, **(await reply.json())}


def client(microphone: Path | None = None) -> RTCPeerConnection:
    """A peer connection that receives the avatar, and sends `microphone` (a file) as its microphone."""
    pc = RTCPeerConnection()
    if microphone is not None:
        pc.addTrack(MediaPlayer(str(microphone)).audio)
    else:
        pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    return pc


def keep_frames(pc: RTCPeerConnection) -> list[np.ndarray]:
    """The video frames `pc` will receive, appended as they come."""
    frames: list[np.ndarray] = []

    @pc.on("track")
    def on_track(track) -> None:
        if track.kind == "video":

            async def read() -> None:
                with contextlib.suppress(MediaStreamError):
                    while True:
                        frames.append((await track.recv()).to_ndarray(format="bgr24"))

            asyncio.ensure_future(read())

    return frames


async def connect(pc: RTCPeerConnection, url: str) -> dict:
    """Offer, and take the answer: the server's reply (with its session id)."""
    answer = await offer(pc, url)
    assert answer["status"] == 200, answer
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    return answer


async def health(url: str, **params) -> dict:
    async with aiohttp.ClientSession() as http:
        return await (await http.get(f"{url}/health", params=params)).json()


async def connect_and_wait(url: str) -> None:
    pc = client()
    answer = await connect(pc, url)
    print(answer["session"], flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(connect_and_wait(sys.argv[1]))
