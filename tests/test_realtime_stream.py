"""The streaming core: the incremental mel and the streamed frames equal the offline pipeline's, exactly.

Speech is fed in chunks of 1 ms, 20 ms and 333 ms (and random lengths for the mel); the frames must be
those `lipsync.LipSync` writes for the same face and audio, bit for bit, when generated in the same
batches (`streaming.offline_layout`): the generator's round-off depends on the batch.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import audio
import lipsync
from common.errors import UserError
from hparams import hparams
from lipsync.options import ModelOptions
from live import stream as streaming
from tests.media import FakeDetector, speech, write_video, write_wav

SR = 16000
BOX = (20, 110, 30, 120)  # top bottom left right, inside the 160x128 test frames
CHUNKS_MS = (1, 20, 333)


def chunked(wav: np.ndarray, sizes) -> list[np.ndarray]:
    out, i = [], 0
    for size in sizes:
        if i >= len(wav):
            break
        out.append(wav[i : i + size])
        i += size
    return out


@pytest.mark.parametrize("seconds", [0.01, 0.026, 0.3, 1.37, 4.0])
def test_mel_stream_equals_the_whole_signal_for_any_chunking(seconds):
    rng = np.random.default_rng(int(seconds * 1000))
    wav = speech(seconds) + rng.normal(0, 0.01, int(round(seconds * SR))).astype(np.float32)
    whole = audio.melspectrogram(wav, hparams)
    chunkings = {"16": [16] * len(wav), "320": [320] * len(wav), "5328": [5328] * len(wav),
                 "random": rng.integers(1, 3000, len(wav))}  # fmt: skip
    if seconds < 0.5:
        chunkings["1"] = [1] * len(wav)  # one sample at a time
    for (name, sizes), blas_threads in itertools.product(chunkings.items(), (None, 1)):
        with threadpool_limits(limits=blas_threads, user_api="blas"):  # realtime.py runs BLAS on one thread
            stream = audio.MelStream(hparams)
            parts = [stream.push(chunk) for chunk in chunked(wav, sizes)] + [stream.flush()]
        streamed = np.concatenate(parts, axis=1)
        assert streamed.shape == whole.shape and np.array_equal(streamed, whole), (name, blas_threads)


def test_mel_stream_columns_come_out_with_the_stated_lookahead():
    """Column j is out once the audio reaches j·hop + n_fft/2: no later (and none before 16 exist)."""
    wav = speech(1.0)
    stream = audio.MelStream(hparams)
    for n in range(1, len(wav) + 1, 40):
        stream.push(wav[n - 1 : n + 39] if n > 1 else wav[:40])
        pushed = min(len(wav), n + 39)
        final = (pushed - 400) // 200 + 1 if pushed > 400 else 0
        assert stream.n_columns == (final if final >= audio.GEMM_MIN_COLUMNS else 0)


def test_speech_frames_follow_the_offline_windows_and_count():
    fps = 25.0
    for seconds in (0.2, 0.48, 1.01, 2.5):
        wav = speech(seconds)
        offline = audio.frame_mel_starts(1 + len(wav) // 200, fps, int(np.ceil(seconds * fps - 1e-9)))
        mel = audio.melspectrogram(wav)
        frames = streaming.SpeechFrames(fps)
        got = [f for chunk in chunked(wav, [320] * len(wav)) for f in frames.feed(chunk)] + frames.end()
        assert [f.index for f in got] == list(range(len(offline)))
        for f, start in zip(got, offline, strict=True):
            assert np.array_equal(f.mel, mel[:, start : start + 16])


def test_speech_frames_come_out_at_most_212_ms_after_their_timestamp():
    fps, wav = 25.0, speech(2.0)
    frames = streaming.SpeechFrames(fps)
    for n in range(160, len(wav), 160):  # 10 ms at a time
        for f in frames.feed(wav[n - 160 : n]):
            start = int(f.index * 80 / fps)
            needed = (start + 15) * 0.0125 + 0.025  # the last column of its window, and half an STFT window
            assert needed <= n / SR + 1e-9 and n / SR < needed + 0.0101, (f.index, n)
            assert needed <= f.index / fps + streaming.LOOKAHEAD_S + 1e-9


def test_silence_and_too_short_speech():
    frames = streaming.SpeechFrames(25.0)
    silent = frames.feed(np.zeros(SR, np.float32))
    assert silent and all(f.level_db == streaming.SILENCE_FLOOR_DB for f in silent)
    loud = streaming.SpeechFrames(25.0).feed(speech(1.0))
    assert all(-30 < f.level_db < 0 for f in loud)
    short = streaming.SpeechFrames(25.0)
    assert short.feed(np.zeros(1000, np.float32)) == []
    with pytest.raises(UserError, match="too short"):
        short.end()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("stream media")
    return {"video": write_video(d / "face.mp4", 9), "speech": write_wav(d / "speech.wav", 0.9), "dir": d}


def offline_frames(sync, media, **options) -> list[np.ndarray]:
    frames: list[np.ndarray] = []
    sync(media["video"], media["speech"], media["dir"] / "offline.mp4", quiet=True,
         on_frame=lambda i, f: frames.append(f.copy()), **options)  # fmt: skip
    return frames


def streamed_frames(sync, media, chunk_ms: float, **options) -> list[np.ndarray]:
    wav, _ = audio.load_speech_wav(media["speech"])
    n_frames = len(streaming.speech_starts(len(wav), 25.0))
    avatar = streaming.prepare_avatar(sync, media["video"], len(wav), **options)
    cap, layout = streaming.offline_layout(avatar, sync.generator, n_frames, **options)
    stream = streaming.AvatarStream(avatar, sync.generator, layout=layout, cap=cap)
    out = []
    for chunk in chunked(wav, [int(round(chunk_ms * SR / 1000))] * len(wav)):
        out += stream.feed(chunk)
    out += stream.end()
    assert [i for i, _ in out] == list(range(len(out)))
    return [frame for _, frame in out]


@pytest.mark.parametrize(
    ("options", "chunks_ms"),
    [({"box": BOX}, CHUNKS_MS), ({"wav2lip_batch_size": 5}, (333,))],
    ids=["box", "detected,batch5"],
)
def test_streamed_frames_equal_the_offline_pipeline(sync, media, options, chunks_ms):
    """The 9-frame video loops under 0.9 s of speech (23 frames), so source frames are used twice or more."""
    offline = offline_frames(sync, media, **options)
    assert len(offline) == 23
    for chunk_ms in chunks_ms:
        streamed = streamed_frames(sync, media, chunk_ms, **options)
        assert len(streamed) == len(offline), chunk_ms
        same = [np.array_equal(a, b) for a, b in zip(streamed, offline, strict=True)]
        assert all(same), f"{chunk_ms} ms chunks: frames {[i for i, s in enumerate(same) if not s]} differ"


def test_streamed_frames_come_as_soon_as_their_window_is_complete(sync, media):
    """Without a layout, each chunk's frames come out of that chunk's `feed`."""
    avatar = streaming.prepare_avatar(sync, media["video"], box=BOX)
    stream = streaming.AvatarStream(avatar, sync.generator)
    wav = speech(0.6)
    seen = 0
    for n in range(320, len(wav) + 1, 320):
        seen += len(stream.feed(wav[n - 320 : n], wait=True))
        assert seen == max(0, int(((n / SR - streaming.LOOKAHEAD_S) * 25) // 1) + 1), n
    assert seen + len(stream.end()) == 15


def test_a_second_start_reads_the_boxes_from_the_cache(wav2lip_checkpoint, media, tmp_path):
    detector = FakeDetector()
    model = ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu", cache_dir=str(tmp_path))
    cached = lipsync.LipSync(model, detector=detector, quiet=True)
    first = streaming.prepare_avatar(cached, media["video"], quiet=True)
    seen = detector.frames_seen
    again = streaming.prepare_avatar(cached, media["video"], quiet=True)
    assert seen == 9 and detector.frames_seen == seen and again.boxes == first.boxes
