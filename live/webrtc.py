"""realtime.py's server mode: the live avatar over WebRTC (aiortc), its page and a small HTTP API (aiohttp).

    GET  /           the page (web/avatar.html): the avatar, talk (microphone), say a file, interrupt, figures
    POST /offer      {"sdp": ..., "type": "offer"} → {"sdp": ..., "type": "answer", "session": ID}
    POST /speak      an audio file (any format FFmpeg reads; raw body or multipart) for every session, or
                     the one named by ?session=ID, to say; it interrupts what that avatar was saying
    POST /interrupt  drop queued speech at once, back to idle (every session, or ?session=ID)
    GET  /health     {"sessions": [{id, state, fps, generated_fps, dropped, errors, latency_ms}, ...],
                     "precision": ..., "errors": ..., "last_error": ..., ...}

Each connection is a `Peer`: a `live.LiveSession` (its speech, queue and clock), a video track that shows
the session's frame at each tick, an audio track playing the speech delayed to match, and, if the client
sends one, its microphone fed into the session. All sessions share one model through one `SharedGenerator`,
which batches their frames together. Bad input is answered with a 4xx and one line of JSON. A client that
goes away is closed and forgotten: at once when it says so (its connection closes or fails), within
`INACTIVE_S` when it vanishes (a closed browser sends nothing more: not even the RTCP reports every client
sends each second), where ICE's own consent check would take 30 s or more. A session whose generator keeps
failing ends (its peer closes) with the cause on stderr and in /health's `last_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
from aiohttp import web
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

import audio
from common.devices import default_cpu_allocator
from common.errors import UserError
from live.figures import precision
from live.options import LiveOptions
from live.sessions import GeneratorError, LiveSession, SharedGenerator
from live.stream import Avatar, hq_names, prepare_avatar

PAGE = Path(__file__).resolve().parent / "avatar.html"
VIDEO_CLOCK = 90_000  # RTP's video clock rate
AUDIO_FRAME_S = 0.02  # 20 ms audio frames, as WebRTC sends them
MAX_UPLOAD = 50 << 20  # bytes of audio one /speak may send
CONNECT_TIMEOUT_S = 30.0  # a peer that has not connected by then is closed
INACTIVE_S = 5.0  # a connected peer that sent nothing for this long is gone (clients report every second)
TICK_BITS, STAMP_PX = 12, 8  # the test-only tick stamp: 12 bits (164 s at 25 fps), squares of 8 pixels


def stamp_tick(frame: np.ndarray, tick: int) -> np.ndarray:
    """A copy of `frame` with `tick` drawn in its top-left corner, for tests (`AvatarServer(stamp_ticks=True)`):
    bit k of its Gray code (consecutive ticks differ in one bit: a frame VP8 updated in part reads as one of
    the two) as a white (1) or black (0) square, its complement below it, so that a client can tell which
    tick a frame shows and compare it with that tick's offline frame."""
    out, gray = frame.copy(), tick ^ (tick >> 1)
    for k in range(TICK_BITS):
        bit = (gray >> k) & 1
        columns = slice(k * STAMP_PX, (k + 1) * STAMP_PX)
        out[:STAMP_PX, columns], out[STAMP_PX : 2 * STAMP_PX, columns] = 255 * bit, 255 * (1 - bit)
    return out


class AvatarVideo(MediaStreamTrack):
    """The session's frames, one per tick of its clock, paced in real time; it ends when the session does
    (`on_end` gets the reason)."""

    kind = "video"

    def __init__(self, session: LiveSession, on_end: Callable[[str], None], stamp_ticks: bool = False) -> None:
        super().__init__()
        self.session, self.on_end, self.stamp_ticks = session, on_end, stamp_ticks

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        session = self.session
        wait = session.display_time(session.tick) - session.shared.clock()
        if wait > 0:
            await asyncio.sleep(wait)
        try:
            session.skip_to(session.shared.clock())  # late: a viewer that stalled is not shown the past
            tick = session.tick
            shown = session.next_frame()
        except GeneratorError as e:
            self.on_end(str(e))
            raise MediaStreamError from e
        if self.stamp_ticks:
            shown = stamp_tick(shown, tick)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(shown), format="bgr24")
        frame.pts, frame.time_base = round(tick * VIDEO_CLOCK / session.fps), fractions.Fraction(1, VIDEO_CLOCK)
        return frame


class DelayedSpeech(MediaStreamTrack):
    """The speech the session says, on the session's timeline (delayed as its frames are): 20 ms frames."""

    kind = "audio"

    def __init__(self, session: LiveSession) -> None:
        super().__init__()
        self.session = session
        self.rate = session.avatar.hp.sample_rate
        self.samples = round(AUDIO_FRAME_S * self.rate)
        self.position: int | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        session, clock = self.session, self.session.shared.clock
        if self.position is None:  # start on the session's timeline, now
            self.position = max(0, round((clock() - session.start) * self.rate))
        else:
            self.position += self.samples
            wait = session.start + self.position / self.rate - clock()
            if wait > 0:
                await asyncio.sleep(wait)
        pcm = np.clip(session.audio_out.read(self.position, self.samples) * 32767, -32768, 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = self.rate, self.position, fractions.Fraction(1, self.rate)
        return frame


class Peer:
    """One connection: its session, its peer connection and the tasks feeding it (microphone, a file)."""

    def __init__(self, server: AvatarServer) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.server = server
        self.session = LiveSession(server.avatar, server.shared, server.live, name=self.id)
        self.pc = RTCPeerConnection()
        self.tasks: set[asyncio.Task] = set()
        self.speaking: asyncio.Task | None = None
        self.closed = False

    def spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def listen(self, track: MediaStreamTrack) -> None:
        """The client's microphone into the session (while no file is being said)."""
        rate = self.session.avatar.hp.sample_rate
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                for mono in resampler.resample(frame):
                    if self.speaking is None or self.speaking.done():
                        self.session.feed(mono.to_ndarray().reshape(-1))

    def say(self, wav: np.ndarray) -> None:
        """Say `wav` (16 kHz mono): what was being said is interrupted; fed at the pace it is spoken."""
        self.interrupt()
        self.speaking = self.spawn(self._feed(wav))

    async def _feed(self, wav: np.ndarray) -> None:
        rate = self.session.avatar.hp.sample_rate
        chunk = round(AUDIO_FRAME_S * rate)
        started = time.monotonic()
        for i in range(0, len(wav), chunk):
            self.session.feed(wav[i : i + chunk])
            await asyncio.sleep(max(0.0, started + (i + chunk) / rate - time.monotonic()))
        self.session.end()

    def interrupt(self) -> None:
        if self.speaking is not None:
            self.speaking.cancel()
            self.speaking = None
        self.session.interrupt()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.peers.pop(self.id, None)
        for task in list(self.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        self.session.close()
        await self.pc.close()

    def end(self, reason: str) -> None:
        """The session cannot go on (its generator kept failing): say why, once, and close the connection."""
        if not self.closed:
            print(f"session {self.id} ended: {reason}", file=sys.stderr)
            self.server.last_error = reason
            self.spawn(self.close())

    async def watch(self) -> None:
        """Close the peer once it is gone: never connected within `CONNECT_TIMEOUT_S` (a client that sent an
        offer and vanished), or connected and then silent for `INACTIVE_S` (a closed browser)."""
        waited = 0.0
        while self.pc.connectionState != "connected":
            if waited >= CONNECT_TIMEOUT_S:
                return await self.close()
            await asyncio.sleep(0.5)
            waited += 0.5
        heard, last, quiet = time.monotonic(), await received_packets(self.pc), 0
        while not self.closed:
            await asyncio.sleep(1.0)
            if (count := await received_packets(self.pc)) != last:
                heard, last, quiet = time.monotonic(), count, 0
                continue
            quiet += 1  # (several checks: after a stall of this loop, the packets that came are read first)
            if time.monotonic() - heard > INACTIVE_S and quiet >= 3:
                print(f"session {self.id}: nothing heard from the client for {INACTIVE_S:g} s, closed", file=sys.stderr)
                return await self.close()

    def figures(self) -> dict:
        """The session's figures (`live.figures.Stats.summary`, as file mode reports them), id and state."""
        session = self.session
        stats = session.stats
        shown = stats.generated + stats.dropped + stats.idle
        speaking = self.speaking is not None and not self.speaking.done()
        return {"id": self.id, "state": self.pc.connectionState, "speaking": speaking,
                **stats.summary(session.fps, shown)}  # fmt: skip


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class AvatarServer:
    """The aiohttp application: one avatar and one shared generator for every peer."""

    def __init__(self, avatar: Avatar, shared: SharedGenerator, live: LiveOptions, precision: str = "fp32",
                 stamp_ticks: bool = False) -> None:  # fmt: skip
        """`precision`: what the generator runs in, for /health; `stamp_ticks`: draw each frame's tick in its
        corner (`stamp_tick`), a setting for tests only."""
        self.avatar, self.shared, self.live = avatar, shared, live
        self.precision, self.stamp_ticks = precision, stamp_ticks
        self.max_sessions = live.max_sessions
        self.peers: dict[str, Peer] = {}
        self.last_error: str | None = None  # why the last session that ended for a failure ended

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_UPLOAD)
        app.add_routes([web.get("/", self.page), web.post("/offer", self.offer), web.post("/speak", self.speak),
                        web.post("/interrupt", self.interrupt), web.get("/health", self.health)])  # fmt: skip
        app.on_shutdown.append(self.shutdown)
        return app

    async def page(self, request: web.Request) -> web.Response:
        return web.FileResponse(PAGE)

    async def offer(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            description = RTCSessionDescription(sdp=body["sdp"], type=body["type"])
            if body["type"] != "offer" or not isinstance(body["sdp"], str):
                raise ValueError("type must be offer")
        except (ValueError, KeyError, TypeError) as e:
            return error(400, f'expected JSON {{"sdp": ..., "type": "offer"}} ({e})')
        if len(self.peers) >= self.max_sessions:
            return error(503, f"the server is full: {self.max_sessions} sessions (--max_sessions)")
        peer = Peer(self)
        self.peers[peer.id] = peer
        try:
            return web.json_response(await self._answer(peer, description))
        except Exception as e:  # noqa: BLE001 - aiortc rejects a bad SDP with assorted errors; the peer goes
            await peer.close()
            return error(400, f"the offer could not be answered: {e}")

    async def _answer(self, peer: Peer, description: RTCSessionDescription) -> dict:
        pc = peer.pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                peer.spawn(peer.listen(track))

        @pc.on("connectionstatechange")
        @pc.on("iceconnectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed") or pc.iceConnectionState in ("failed", "closed"):
                await peer.close()

        await pc.setRemoteDescription(description)
        pc.addTrack(AvatarVideo(peer.session, peer.end, self.stamp_ticks))
        pc.addTrack(DelayedSpeech(peer.session))
        await pc.setLocalDescription(await pc.createAnswer())
        peer.spawn(peer.watch())
        return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "session": peer.id}

    def _targets(self, request: web.Request) -> list[Peer] | web.Response:
        name = request.query.get("session")
        if name is None:
            return list(self.peers.values())
        return [self.peers[name]] if name in self.peers else error(404, f"no session {name!r}")

    async def speak(self, request: web.Request) -> web.Response:
        targets = self._targets(request)
        if isinstance(targets, web.Response):
            return targets
        data = await _upload(request)
        if not data:
            return error(400, "send an audio file as the body (or as a multipart file)")
        try:
            wav = await asyncio.get_running_loop().run_in_executor(None, _decode, data, self.avatar.hp)
        except UserError as e:
            return error(400, str(e))
        for peer in targets:
            peer.say(wav)
        return web.json_response(
            {"sessions": [p.id for p in targets], "seconds": len(wav) / self.avatar.hp.sample_rate}
        )

    async def interrupt(self, request: web.Request) -> web.Response:
        targets = self._targets(request)
        if isinstance(targets, web.Response):
            return targets
        for peer in targets:
            peer.interrupt()
        return web.json_response({"sessions": [p.id for p in targets]})

    async def health(self, request: web.Request) -> web.Response:
        name = request.query.get("session")
        peers = [p for p in self.peers.values() if name is None or p.id == name]
        return web.json_response({
            "sessions": [p.figures() for p in peers], "max_sessions": self.max_sessions, "precision": self.precision,
            "hq": hq_names(self.shared.generator),
            "generator_ms_per_frame": round(self.shared.seconds_per_frame * 1000, 1), "memory_mb": memory_mb(),
            "errors": self.shared.errors, "last_error": self.last_error or self.shared.last_error,
        })  # fmt: skip

    async def shutdown(self, app: web.Application) -> None:
        await asyncio.gather(*(peer.close() for peer in list(self.peers.values())))


async def _upload(request: web.Request) -> bytes:
    """The body, or the first file of a multipart body."""
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if getattr(part, "filename", None) is not None or part.name in ("file", "audio"):
                return await part.read()
        return b""
    return await request.read()


def _decode(data: bytes, hp) -> np.ndarray:
    """Speech from an upload's bytes, or a `UserError` saying why it is not speech (at least 0.2 s)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "upload"
        path.write_bytes(data)
        try:
            wav, _ = audio.load_speech_wav(path, hp)
        except UserError as e:
            raise UserError(str(e).replace(f"{path}: ", "the upload ").replace(str(path), "the upload")) from None
    if 1 + len(wav) // hp.hop_length() < audio.MEL_STEP_SIZE:
        raise UserError(f"the audio is too short: {len(wav) / hp.sample_rate:.3f} s, at least 0.2 s is needed")
    return wav


async def received_packets(pc: RTCPeerConnection) -> int:
    """Packets received from the client so far, on the transport its media and RTCP reports share."""
    senders = pc.getSenders()
    if not senders:
        return 0
    report = await senders[0].getStats()
    return sum(stats.packetsReceived for stats in report.values() if stats.type == "transport")


def memory_mb() -> float:
    """This process's resident memory."""
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def build(sync, face: str, live: LiveOptions, options: dict, stamp_ticks: bool = False) -> AvatarServer:
    """The server's state: the avatar prepared once, the shared generator started (`stamp_ticks`: tests)."""
    default_cpu_allocator()  # lipsync.LipSync tuned it for one long run; sessions come and go for days
    avatar = prepare_avatar(sync, face, **options)
    shared = SharedGenerator(sync.generator, live.live_batch, hp=sync.hp)
    return AvatarServer(avatar, shared, live, precision(sync), stamp_ticks)


def serve(sync, face: str, live: LiveOptions, options: dict) -> None:
    """Run the server until Ctrl-C."""
    server = build(sync, face, live, options)
    print(f"avatar ready ({server.avatar.shape[1]}x{server.avatar.shape[0]}, {server.avatar.fps:g} fps, generator "
          f"in {server.precision}): http://{live.host}:{live.port}/", file=sys.stderr)  # fmt: skip
    try:
        web.run_app(server.app(), host=live.host, port=live.port, print=None)
    finally:
        server.shared.close()
