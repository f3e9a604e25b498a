"""`--face` and `--audio` as http(s) URLs, against HTTP servers on 127.0.0.1 started and stopped here: the
same frames as the file, ranges read by seeking over the network, one line for a dead URL (404, DNS, refused,
timeout, a connection dropped halfway) with no output, page URLs through yt-dlp (a fake of it) or the line
saying what to install."""

from __future__ import annotations

import functools
import http.server
import re
import socket
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from common import media_urls
from common.errors import UserError
from lipsync.options import ModelOptions
from lipsync.pipeline import LipSync
from tests.cli import cli
from tests.media import FakeDetector, write_video, write_wav

BOX = (20, 100, 30, 120)  # inside the 160x128 test frames


@pytest.fixture(scope="module")
def sync(wav2lip_checkpoint) -> LipSync:
    """The deterministic weights on the CPU, with the fake detector (boxes come from --box here anyway)."""
    return LipSync(ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu"), detector=FakeDetector(), quiet=True)


class MediaHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder with byte ranges (FFmpeg seeks with them: to an MP4's index at its end, to a range);
    `drop_after` (a fraction) closes the connection that far into each response; records the requests."""

    drop_after: float | None = None
    requests: list[dict[str, str]]

    def log_message(self, *args) -> None:
        self.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404, "Not Found")
            return None
        size, wanted = path.stat().st_size, re.match(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        first = int(wanted[1] or 0) if wanted else 0
        last = int(wanted[2]) if wanted and wanted[2] else size - 1
        self.send_response(206 if wanted else 200)
        if wanted:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Type", "text/html" if path.suffix == ".html" else "application/octet-stream")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        f = path.open("rb")
        f.seek(first)
        self.remaining = last - first + 1
        return f

    def copyfile(self, source, outputfile) -> None:
        n = self.remaining if self.drop_after is None else int(self.remaining * self.drop_after)
        try:
            while n > 0 and (block := source.read(min(n, 1 << 16))):
                outputfile.write(block)
                n -= len(block)
        except (BrokenPipeError, ConnectionResetError):  # FFmpeg hung up: it seeks elsewhere
            pass
        if self.drop_after is not None:
            self.close_connection = True


def serve(folder: Path, **attributes) -> Iterator[tuple[str, list]]:
    """An HTTP server for `folder` on a free port of 127.0.0.1: (its base URL, the requests it saw)."""
    requests: list[dict[str, str]] = []
    handler = type("Handler", (MediaHandler,), {"requests": requests, **attributes})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("served")
    write_video(d / "clip.mp4", 75, keyint=10)  # 3 s, a keyframe every 10 frames
    write_video(d / "talk.mp4", 10, audio=write_wav(d / "speech.wav", 1.2))
    with (
        av.open(str(d / "clip.mp4")) as src,
        av.open(str(d / "fast.mp4"), "w", options={"movflags": "faststart"}) as out,
    ):
        stream = out.add_stream_from_template(src.streams.video[0])  # the index first: playable while it arrives
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    whole = (d / "fast.mp4").read_bytes()
    (d / "short.mp4").write_bytes(whole[: len(whole) * 6 // 10])  # served whole, but 60 % of the file
    (d / "page.html").write_text("<!DOCTYPE html>\n<html><body><video src='clip.mp4'></video></body></html>\n" * 40)
    return d


@pytest.fixture(scope="module")
def server(media):
    yield from serve(media)


def frames_of(sync, face, speech, out, **options) -> list[np.ndarray]:
    frames = []
    sync(face, speech, out, on_frame=lambda i, f: frames.append(f.copy()), box=BOX, **options)
    return frames


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) > 0 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_face_and_audio_urls_give_the_files_frames(sync, media, server, tmp_path):
    base, requests = server
    local = frames_of(sync, media / "clip.mp4", media / "speech.wav", tmp_path / "a.mp4")
    remote = frames_of(sync, f"{base}/clip.mp4", f"{base}/speech.wav", tmp_path / "b.mp4")
    assert same(local, remote)
    ranged_local = frames_of(sync, media / "clip.mp4", media / "talk.mp4", tmp_path / "c.mp4", start=1.6, end=2.4,
                             audio_start=0.2)  # fmt: skip
    del requests[:]
    ranged = frames_of(sync, f"{base}/clip.mp4", f"{base}/talk.mp4", tmp_path / "d.mp4", start=1.6, end=2.4,
                       audio_start=0.2)  # fmt: skip
    assert same(ranged_local, ranged)
    starts = [int(r.get("range", "bytes=0-")[6:].split("-")[0]) for r in requests if r["path"] == "/clip.mp4"]
    assert max(starts) > 0  # FFmpeg asked for parts of the file (its index, the range's keyframe), not all of it


def test_page_url_without_yt_dlp_says_what_to_install(sync, server, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yt_dlp", None)  # import yt_dlp raises ImportError
    media_urls.resolve_page.cache_clear()
    for page in ("https://www.youtube.com/watch?v=abcdefghijk", f"{server[0]}/page.html"):
        with pytest.raises(UserError, match=r"requirements-url\.txt") as error:
            sync(page, f"{server[0]}/speech.wav", tmp_path / "out.mp4", box=BOX)
        assert page in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out.mp4").exists()


def test_page_url_through_yt_dlp_reads_only_the_range(sync, media, server, tmp_path, monkeypatch):
    base, requests = server
    calls = []

    class YoutubeDL:
        def __init__(self, params):
            self.params = params

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def extract_info(self, url, download):
            calls.append((url, download, self.params["format"]))
            return {"url": f"{base}/clip.mp4", "http_headers": {"User-Agent": "fake-yt-dlp/1.0"}}

    monkeypatch.setitem(sys.modules, "yt_dlp", types.SimpleNamespace(YoutubeDL=YoutubeDL))
    media_urls.resolve_page.cache_clear()
    page = "https://www.youtube.com/watch?v=abcdefghijk"
    del requests[:]
    frames = frames_of(sync, page, media / "speech.wav", tmp_path / "p.mp4", start=2, end=2.4)
    assert same(frames, frames_of(sync, media / "clip.mp4", media / "speech.wav", tmp_path / "f.mp4", start=2,
                                  end=2.4))  # fmt: skip
    assert calls and all(c[:2] == (page, False) for c in calls)  # resolved, never downloaded by yt-dlp
    assert requests and all(r.get("user-agent") == "fake-yt-dlp/1.0" for r in requests)  # its headers sent
    media_urls.resolve_page.cache_clear()


def test_a_stream_that_ends_early_is_refused(sync, server, tmp_path):
    """A server that ends a file early, without any error, is caught by counting the frames that arrived."""
    with pytest.raises(UserError, match=r"short\.mp4: the stream ended early, at [\d.]+ s of 3\.00 s"):
        sync(f"{server[0]}/short.mp4", write_wav(tmp_path / "long.wav", 3.0), tmp_path / "out.mp4", box=BOX)
    assert not (tmp_path / "out.mp4").exists()


@pytest.fixture
def dead_ends(media):
    """URLs that fail, each with the words its one line must hold."""
    silent = socket.socket()  # accepts connections and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    dropping = serve(media, drop_after=0.5)
    base, _ = next(dropping)
    yield {
        "http://127.0.0.1:{}/missing.mp4": "404",
        "http://no-such-host.invalid/clip.mp4": "does not resolve",
        f"http://127.0.0.1:{refused.getsockname()[1]}/clip.mp4": "refused",
        f"http://127.0.0.1:{silent.getsockname()[1]}/clip.mp4": "timeout",
        f"{base}/clip.mp4": "cannot be read",  # every response cut off halfway
    }
    dropping.close()
    silent.close()
    refused.close()


def test_dead_urls_one_line_and_no_output(dead_ends, server, wav2lip_checkpoint, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(media_urls, "TIMEOUT_S", 1)
    out = tmp_path / "out" / "result.mp4"
    for template, words in dead_ends.items():
        url = template.format(server[0].rsplit(":", 1)[1])
        for flag in ("--face", "--audio"):
            face, speech = (url, f"{server[0]}/speech.wav") if flag == "--face" else (f"{server[0]}/clip.mp4", url)
            argv = ["--checkpoint_path", wav2lip_checkpoint, "--face", face, "--audio", speech, "--outfile", out,
                    "--quiet", "--box", *BOX]  # fmt: skip
            code, err = cli(argv, capsys)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1, (url, flag, lines)
            assert url in lines[0] and words in lines[0], (url, flag, lines)
            assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])
