"""Media by URL: `--face` and `--audio` may be http(s) addresses, opened by FFmpeg through PyAV and streamed.

A URL is re-opened by every reader, on every pass (probe, the detection pass, the generation pass and each
lap of a looping video; the speech once for its mel and once for the muxer). FFmpeg asks the server for the
bytes each one needs, the index and the part that `--start/--end` select, so nothing the size of the video
is downloaded or written to disk, and `--start` seeks over the network as it does in a file. A spool (a
copy written while the first pass streams) was the alternative; it is not what this does because a copy
keeps FFmpeg's timestamps only when it is the file's own bytes, which means downloading it whole (a remux of
just the range shifts them: 25 ticks on a B-frame H.264), and it would hold the whole range on disk. The
costs: a range crosses the network once per pass, the detection cache is keyed by the address (the content
cannot be hashed without downloading it), and a stream that ends early is caught by counting what arrived
(`video.iter_frames`).

Page URLs (YouTube, Vimeo, and any address that serves a web page) are resolved with yt-dlp, when it is
installed (`pip install -r requirements-url.txt`), to the address of the media the page plays; FFmpeg then
streams that address as above, so only the range asked for is read. Without yt-dlp, a page URL gets one
line saying what to install. A URL that fails (404, a name that does not resolve, a refused connection, a
timeout) gets one line naming it and the reason.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import urllib.parse

import av

from common.errors import UserError

URL_SCHEMES = ("http", "https")
TIMEOUT_S = 30  # a read that waits this long for the server fails (FFmpeg's rw_timeout)
PAGE_HOSTS = ("youtube.com", "youtu.be", "vimeo.com", "dailymotion.com", "tiktok.com", "twitter.com", "x.com",
              "instagram.com", "facebook.com", "twitch.tv", "bilibili.com", "soundcloud.com")  # fmt: skip
HTML_MARKS = (b"<!doctype html", b"<html", b"<head", b"<?xml")  # how a web page begins
SNIFF_BYTES = 1024  # read from a URL FFmpeg cannot parse, to tell a web page from broken media
INSTALL_YT_DLP = "pip install -r requirements-url.txt (yt-dlp)"
# what yt-dlp picks: one file FFmpeg can stream by itself (no separate DASH fragments to merge), at most 1080p
FORMATS = {
    "video": "bestvideo[height<=?1080][protocol^=http][protocol!*=dash]/best[vcodec!=none][protocol^=http]/best",
    "audio": "bestaudio[protocol^=http][protocol!*=dash]/best[acodec!=none][protocol^=http]/best",
}


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` is an http(s) address rather than a file."""
    return isinstance(path, str) and urllib.parse.urlsplit(path).scheme.lower() in URL_SCHEMES


def is_page_url(url: str) -> bool:
    """A site whose addresses are pages that play a video (not the video itself)."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    return any(host == h or host.endswith("." + h) for h in PAGE_HOSTS)


def open_input(path: str | os.PathLike, kind: str = "video") -> av.container.InputContainer:
    """`av.open` for reading: a file as it is; a URL with a timeout, through yt-dlp if it is a page, and
    any failure as a `UserError` naming it. `kind` ("video" or "audio") is what a page's media is read for."""
    if not is_url(path):
        return av.open(os.fspath(path))
    if is_page_url(path):
        return _open_url(*resolve_page(path, kind), shown=path)
    try:
        return av.open(path, options=_options(""))
    except av.error.InvalidDataError as e:  # not media: a web page (then yt-dlp), or broken media
        if not _serves_a_page(path):
            raise url_error(path, e) from None
    except av.error.FFmpegError as e:
        raise url_error(path, e) from None
    return _open_url(*resolve_page(path, kind), shown=path)


def _options(headers: str) -> dict[str, str]:
    """FFmpeg's options for a URL: the read timeout (microseconds), and a page's headers."""
    return {"rw_timeout": str(int(TIMEOUT_S * 1_000_000))} | ({"headers": headers} if headers else {})


def _open_url(url: str, headers: str, shown: str) -> av.container.InputContainer:
    try:
        return av.open(url, options=_options(headers))
    except av.error.FFmpegError as e:
        raise url_error(shown, e) from None


def url_error(url: str, error: Exception) -> UserError:
    """One line naming the URL and why it could not be read."""
    reason = getattr(error, "strerror", None) or str(error)
    if isinstance(error, av.error.InvalidDataError):
        reason = "what it serves is not media FFmpeg can read, or it arrived incomplete"
    elif isinstance(error, av.error.OSError) and not _resolves(url):
        reason = f"the host name {urllib.parse.urlsplit(url).hostname} does not resolve (DNS)"
    elif isinstance(error, av.error.OSError) and getattr(error, "errno", None) == errno.EIO:
        reason = "the connection failed or was cut off (input/output error)"
    elif isinstance(error, av.error.TimeoutError):
        reason = f"no answer within {TIMEOUT_S} s (timeout)"
    return UserError(f"{url}: cannot be read ({reason})")


def _resolves(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        socket.getaddrinfo(parts.hostname, parts.port or 80)
    except (OSError, UnicodeError):
        return False
    return True


def _serves_a_page(url: str) -> bool:
    """Whether the URL answers with a web page (HTML) rather than media; read through FFmpeg as raw bytes."""
    try:
        with open_data(url) as container:
            head = b"".join(bytes(p) for _, p in zip(range(4), container.demux(), strict=False))[:SNIFF_BYTES]
    except (UserError, av.error.FFmpegError):
        return False
    return head.lstrip().lower().startswith(HTML_MARKS)


@functools.lru_cache(maxsize=32)
def resolve_page(url: str, kind: str) -> tuple[str, str]:
    """(media URL, HTTP headers FFmpeg must send) of what a page plays, found by yt-dlp; cached, as every pass
    opens the page's media again. No yt-dlp: the line saying what to install."""
    try:
        import yt_dlp
    except ImportError:
        raise UserError(f"{url}: is a web page, not a media file; to read the {kind} it shows, "
                        f"{INSTALL_YT_DLP}, or give the media file's own URL") from None  # fmt: skip
    params = {"format": FORMATS[kind], "quiet": True, "no_warnings": True, "noplaylist": True,
              "socket_timeout": TIMEOUT_S}  # fmt: skip
    try:
        with yt_dlp.YoutubeDL(params) as ydl:
            info = ydl.extract_info(url, download=False)
    except Exception as e:  # yt-dlp's DownloadError, ExtractorError, network errors...
        raise UserError(f"{url}: yt-dlp cannot read it ({_first_line(e)})") from None
    if info.get("entries"):  # a playlist page despite noplaylist: its first item
        info = next(iter(info["entries"]))
    if not info.get("url"):
        raise UserError(f"{url}: yt-dlp found no single {kind} file to stream on this page")
    headers = "".join(f"{k}: {v}\r\n" for k, v in (info.get("http_headers") or {}).items())
    return info["url"], headers


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0].removeprefix("ERROR: ") if text else type(error).__name__


def read_bytes(url: str, limit: int) -> bytes:
    """The bytes a URL serves (a still image), through FFmpeg; more than `limit` is a `UserError`."""
    data = bytearray()
    try:
        with open_data(url) as container:
            for packet in container.demux():
                data += bytes(packet)
                if len(data) > limit:
                    raise UserError(f"{url}: larger than {limit >> 20} MB, too large for a still image")
    except av.error.FFmpegError as e:
        raise url_error(url, e) from None
    return bytes(data)


def open_data(url: str) -> av.container.InputContainer:
    """A URL opened as raw bytes (FFmpeg's `data` format), with the timeout."""
    try:
        return av.open(url, format="data", options=_options(""))
    except av.error.FFmpegError as e:
        raise url_error(url, e) from None
