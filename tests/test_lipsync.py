"""lipsync.py: the pipeline end to end on synthetic media with a deterministic checkpoint.

The faithful steps are checked against an independent re-computation written the way the original
inference.py wrote them (lists of crops, NumPy masking and /255., the mel chunk loop, astype(uint8)).
A fake detector stands in for S3FD: it finds the drawn "face" square by its colour.
"""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

import audio
from common import devices, video
from common.errors import UserError
from face_detection import Box
from hparams import hparams
from lipsync import face_boxes, frames, generation
from lipsync import pipeline as lipsync
from lipsync import threads as streams
from lipsync.options import ModelOptions
from models import Wav2Lip
from tests.media import FakeDetector, face_frame, face_rect, read_output, write_video, write_wav

FPS = 25


@pytest.fixture(scope="session")
def sync(wav2lip_checkpoint) -> lipsync.LipSync:
    return lipsync.LipSync(
        ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu"), detector=FakeDetector(), quiet=True
    )


@pytest.fixture(scope="session")
def clip(tmp_path_factory) -> dict[str, Path]:
    """A 12-frame video with its own audio track, a 0.48 s speech file, and a longer one."""
    d = tmp_path_factory.mktemp("clip")
    track = write_wav(d / "track.wav", 0.48)
    return {
        "video": write_video(d / "face clip.v1.MP4", 12, audio=track),
        "speech": write_wav(d / "speech.wav", 0.48),
        "long": write_wav(d / "long.wav", 1.0),
        "dir": d,
    }


def run(sync, face, speech, out, **options):
    frames: list[np.ndarray] = []
    summary = sync(face, speech, out, on_frame=lambda i, f: frames.append(f.copy()), quiet=True, **options)
    return summary, frames


# --- the original's computation, written independently ---------------------------------------------


def original_smoothing(boxes: np.ndarray, T: int) -> np.ndarray:
    for i in range(len(boxes)):
        window = boxes[len(boxes) - T :] if i + T > len(boxes) else boxes[i : i + T]
        boxes[i] = np.mean(window, axis=0)
    return boxes


def original_mel_chunks(mel: np.ndarray, fps: float) -> list[np.ndarray]:
    chunks, i = [], 0
    while True:
        start = int(i * 80.0 / fps)
        if start + 16 > len(mel[0]):
            chunks.append(mel[:, len(mel[0]) - 16 :])
            return chunks
        chunks.append(mel[:, start : start + 16])
        i += 1


def original_output(frames, speech_path, wav2lip_checkpoint, pads=(0, 10, 0, 0)) -> list[np.ndarray]:
    model = Wav2Lip()
    model.load_state_dict(torch.load(wav2lip_checkpoint)["state_dict"])
    model.eval()
    results = []
    pady1, pady2, padx1, padx2 = pads
    for image in frames:
        rect = face_rect(image)
        results.append([max(0, rect[0] - padx1), max(0, rect[1] - pady1),
                        min(image.shape[1], rect[2] + padx2), min(image.shape[0], rect[3] + pady2)])  # fmt: skip
    boxes = original_smoothing(np.array(results), T=5)
    mel = audio.melspectrogram(audio.load_wav(speech_path, 16000))
    chunks = original_mel_chunks(mel, FPS)
    # datagen with the original's batch of 128: one batch for a short clip
    frame_batch = [frames[i % len(frames)].copy() for i in range(len(chunks))]
    coords = [boxes[i % len(frames)] for i in range(len(chunks))]
    img_batch = np.asarray(
        [cv2.resize(f[y1:y2, x1:x2], (96, 96)) for f, (x1, y1, x2, y2) in zip(frame_batch, coords, strict=True)]
    )
    img_masked = img_batch.copy()
    img_masked[:, 96 // 2 :] = 0
    img_batch = np.concatenate((img_masked, img_batch), axis=3) / 255.0
    mel_batch = np.asarray(chunks)
    mel_batch = np.reshape(mel_batch, [len(mel_batch), mel_batch.shape[1], mel_batch.shape[2], 1])
    with torch.no_grad():
        pred = model(
            torch.FloatTensor(np.transpose(mel_batch, (0, 3, 1, 2))),
            torch.FloatTensor(np.transpose(img_batch, (0, 3, 1, 2))),
        )
    pred = pred.cpu().numpy().transpose(0, 2, 3, 1) * 255.0
    for p, f, (x1, y1, x2, y2) in zip(pred, frame_batch, coords, strict=True):
        f[y1:y2, x1:x2] = cv2.resize(p.astype(np.uint8), (x2 - x1, y2 - y1))
    return frame_batch


# --- end to end ----------------------------------------------------------------------------------------


def test_faithful_mouth_region(sync, clip, wav2lip_checkpoint, tmp_path):
    out = tmp_path / "out.mp4"
    summary, frames = run(sync, clip["video"], clip["speech"], out)
    inputs = list(video.iter_frames(clip["video"]))
    expected = original_output(inputs, clip["speech"], wav2lip_checkpoint)
    assert len(expected) == 9  # the original stops short of the 12 frames 0.48 s need
    assert summary.frames == len(frames) == 12
    for got, want in zip(frames, expected, strict=False):
        diff = np.abs(got.astype(int) - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.002  # batch-size round-off may flip a truncation
    assert np.any(frames[0] != inputs[0])  # the mouth really was replaced
    written, *_ = read_output(out)
    assert np.abs(written[5].astype(int) - frames[5]).mean() < 5.0  # what was encoded, within H.264 yuv420p loss


def test_output_covers_audio_and_loops(sync, clip, tmp_path):
    out = tmp_path / "nested" / "dir" / "result.mp4"
    summary, frames = run(sync, clip["video"], clip["long"], out)
    written, seconds_v, seconds_a, _ = read_output(out)
    assert summary.frames == len(written) == 25 and seconds_v == pytest.approx(1.0)
    assert seconds_a == pytest.approx(1.0, abs=0.03)
    # frame 12 is the video's frame 0 again (looping forward): outside the face box they are equal
    assert np.array_equal(frames[12][:20], frames[0][:20]) and not np.array_equal(frames[11][:20], frames[0][:20])
    assert summary.missing == 0 and str(out) in summary.line()


def test_static_and_image_input(sync, clip, tmp_path):
    summary, frames = run(sync, clip["video"], clip["speech"], tmp_path / "s.mp4", static=True)
    assert all(np.array_equal(f[:20], frames[0][:20]) for f in frames)
    image = tmp_path / "my face.v2.JPG"  # PNG bytes under a misleading name
    image.write_bytes(cv2.imencode(".png", face_frame(0))[1].tobytes())
    summary, frames = run(sync, image, clip["long"], tmp_path / "i.mp4", fps=10)
    assert summary.frames == len(frames) == 10
    assert read_output(tmp_path / "i.mp4")[1] == pytest.approx(1.0)


def test_faceless_frames(sync, tmp_path):
    clip_path = write_video(tmp_path / "gaps.mp4", 12, faceless=frozenset({3, 4, 5}))
    speech = write_wav(tmp_path / "s.wav", 0.48)
    inputs = list(video.iter_frames(clip_path))
    summary, frames = run(sync, clip_path, speech, tmp_path / "keep.mp4")
    assert summary.missing == 3 and summary.missing_ranges == [pytest.approx((0.12, 0.24))]
    assert all(np.array_equal(frames[i], inputs[i]) for i in (3, 4, 5))
    assert "no face in 3 frames (0.12-0.24 s)" in summary.line()
    summary, frames = run(sync, clip_path, speech, tmp_path / "last.mp4", no_face="last")
    assert summary.missing == 0 and not np.array_equal(frames[4], inputs[4])
    with pytest.raises(UserError, match="face not detected in frame 3"):
        run(sync, clip_path, speech, tmp_path / "error.mp4", no_face="error")
    assert not (tmp_path / "error.mp4").exists()


def test_audio_sources(sync, clip, tmp_path):
    mp3 = tmp_path / "really an mp3.wav"
    with av.open(str(mp3), "w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=16000)
        stream.layout = "mono"
        with av.open(str(clip["long"])) as src:
            for frame in src.decode(audio=0):
                frame.pts = None
                out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    summary, _ = run(sync, clip["video"], mp3, tmp_path / "mp3.mp4")
    assert summary.frames in (25, 26)  # MP3 adds encoder padding
    summary, _ = run(sync, clip["video"], clip["video"], tmp_path / "track.mp4")  # a video's audio track
    assert summary.frames == 12
    silent = write_wav(tmp_path / "silent.wav", 0.4, silent=True)
    summary, _ = run(sync, clip["video"], silent, tmp_path / "silent.mp4")
    written, _, seconds_a, _ = read_output(tmp_path / "silent.mp4")
    assert len(written) == 10 and seconds_a == pytest.approx(0.4, abs=0.03)


def test_box_crop_resize_rotate(sync, clip, tmp_path):
    summary, frames = run(sync, clip["video"], clip["speech"], tmp_path / "b.mp4", box=[20, 100, 30, 120])
    assert frames[0].shape == (128, 160, 3)
    summary, frames = run(
        sync, clip["video"], clip["speech"], tmp_path / "c.mp4", resize_factor=2, rotate=True, crop=[4, -1, 0, 60],
        box=[10, 70, 5, 55],
    )  # fmt: skip
    assert frames[0].shape == (80 - 4, 60, 3)  # 160x128 → 80x64 → turned: 64 wide, 80 tall → cropped


def test_feather_blend(sync, clip, tmp_path):
    box = [20, 100, 30, 120]
    _, pasted = run(sync, clip["video"], clip["speech"], tmp_path / "p.mp4", box=box)
    _, feathered = run(sync, clip["video"], clip["speech"], tmp_path / "f.mp4", box=box, blend="feather")
    inputs = list(video.iter_frames(clip["video"]))
    y1, y2, x1, x2 = box
    top = slice(y1, y1 + (y2 - y1) * 3 // 8)
    assert np.array_equal(feathered[0][top, x1:x2], inputs[0][top, x1:x2])  # upper face untouched
    assert np.array_equal(feathered[0][y2 - 1, x1:x2], inputs[0][y2 - 1, x1:x2])  # no hard bottom edge
    centre = (slice((y1 + 3 * y2) // 4 - 2, (y1 + 3 * y2) // 4 + 2), slice((x1 + x2) // 2 - 2, (x1 + x2) // 2 + 2))
    assert np.abs(feathered[0][centre].astype(int) - pasted[0][centre]).max() <= 1  # the mouth is generated


def test_detection_cache_and_det_every(wav2lip_checkpoint, clip, tmp_path):
    detector = FakeDetector()
    cache = tmp_path / "cache"
    model = ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu", cache_dir=str(cache))
    sync = lipsync.LipSync(model, detector=detector, quiet=True)
    first, frames1 = run(sync, clip["video"], clip["speech"], tmp_path / "1.mp4")
    assert detector.frames_seen == 12 and len(list((cache / "boxes").iterdir())) == 1
    second, frames2 = run(sync, clip["video"], clip["long"], tmp_path / "2.mp4")
    assert detector.frames_seen == 12  # boxes came from the cache
    # the same boxes: equal frames where the audio is equal, up to the round-off of another batch size
    assert all(np.abs(a.astype(int) - b).max() <= 2 for a, b in zip(frames1[:6], frames2[:6], strict=True))
    run(sync, clip["video"], clip["speech"], tmp_path / "3.mp4", pads=[0, 5, 0, 0])
    assert detector.frames_seen == 12  # padding is applied after the cache
    run(sync, clip["video"], clip["speech"], tmp_path / "4.mp4", det_every=5)  # another cache key
    assert detector.frames_seen == 12 + 4  # frames 0, 5, 10 and the last one


def test_det_every_detects_around_a_keyframe_without_face(wav2lip_checkpoint, tmp_path):
    detector = FakeDetector()
    sync = lipsync.LipSync(
        ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu"), detector=detector, quiet=True
    )
    clip_path = write_video(tmp_path / "gap.mp4", 12, faceless=frozenset({5, 6}))
    summary, _ = run(sync, clip_path, write_wav(tmp_path / "s.wav", 0.48), tmp_path / "out.mp4", det_every=5)
    # keyframes 0, 5, 10, 11; keyframe 5 has no face, so frames 1-4 and 6-9 are detected one by one
    assert detector.frames_seen == 4 + 8
    assert summary.missing == 2 and summary.missing_ranges == [pytest.approx((0.2, 0.28))]
    assert face_boxes.frames_near_misses({0: (0, 0, 1, 1), 3: None, 6: (0, 0, 1, 1), 9: (0, 0, 1, 1)}) == [1, 2, 4, 5]


def test_api_function(wav2lip_checkpoint, clip, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu")
    summary = lipsync.lipsync(clip["video"], clip["speech"], model, box=[20, 100, 30, 120], quiet=True)
    assert summary.outfile == Path("results/result_voice.mp4") and (tmp_path / summary.outfile).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no temp/ folder


# --- stages ------------------------------------------------------------------------------------------


def test_smoothing_is_the_original():
    rng = np.random.default_rng(0)
    for n in (1, 3, 5, 9, 23):
        rects = rng.integers(0, 300, size=(n, 4))
        want = original_smoothing(rects.copy(), 5)
        assert np.array_equal(face_boxes.smoothen(rects, 5), want)
        assert face_boxes.smooth_runs([tuple(r) for r in rects]) == [tuple(r) for r in want]
    runs = face_boxes.smooth_runs([(0, 0, 10, 10), None, (2, 2, 12, 12), (4, 4, 14, 14)])
    assert runs == [(0, 0, 10, 10), None, (3, 3, 13, 13), (3, 3, 13, 13)]


def test_mel_starts_extend_the_original():
    mel = np.zeros((80, 641), np.float32)  # 8 s at 16 kHz
    original = original_mel_chunks(mel, 25)
    starts = audio.frame_mel_starts(641, 25, 200)
    assert len(original) == 197 and len(starts) == 200
    assert starts[:197] == audio.mel_chunk_starts(641, 25) and starts[197:] == [625] * 3
    windows = audio.mel_windows(np.arange(80 * 641, dtype=np.float32).reshape(80, 641), starts[:3])
    assert windows.shape == (3, 1, 80, 16)


def test_box_helpers():
    assert face_boxes.pad_and_clip(Box(10, 20, 50, 60), (0, 10, 0, 0), (65, 100, 3)) == Box(10, 20, 50, 65)
    assert face_boxes.fill_from_last([None, (1, 1, 2, 2), None, (3, 3, 4, 4)]) == [(1, 1, 2, 2)] * 3 + [(3, 3, 4, 4)]
    boxes = face_boxes.interpolate({0: (0, 0, 10, 10), 4: (4, 8, 14, 18), 6: None, 7: (0, 0, 1, 1)}, 8)
    assert boxes[:5] == [(0, 0, 10, 10), (1, 2, 11, 12), (2, 4, 12, 14), (3, 6, 13, 16), (4, 8, 14, 18)]
    assert boxes[5:] == [None, None, (0, 0, 1, 1)]
    assert lipsync.missing_ranges([False, True, True, False, True], 25) == [(0.04, 0.12), (0.16, 0.2)]
    with pytest.raises(UserError, match="--box"):
        frames.check_region((0, 200, 0, 50), (128, 160, 3), "--box")
    assert frames.check_region((0, -1, 10, -1), (128, 160, 3), "--crop") == Box(x1=10, y1=0, x2=160, y2=128)


def test_generator_inputs_are_the_originals():
    faces = np.random.default_rng(1).integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    mels = np.zeros((2, 1, 80, 16), np.float32)
    _, got = generation.generator_inputs(faces, mels, torch.device("cpu"), torch.float32)
    masked = faces.copy()
    masked[:, hparams.img_size // 2 :] = 0
    want = torch.FloatTensor(np.transpose(np.concatenate((masked, faces), axis=3) / 255.0, (0, 3, 1, 2)))
    assert torch.equal(got, want)
    pred = torch.tensor([[[[0.9999]], [[0.5]], [[0.0]]]])
    assert generation.to_uint8(pred).ravel().tolist() == [254, 127, 0]  # truncation, not rounding


def test_background_stage_propagates_errors():
    def stage():
        yield 1
        raise ValueError("stage failed")

    it = streams.background(stage())
    assert next(it) == 1
    with pytest.raises(ValueError, match="stage failed"):
        next(it)
    assert list(streams.background(range(5))) == [0, 1, 2, 3, 4]
    early = streams.background(iter(range(1000)))
    assert next(early) == 0
    early.close()  # stops the producing thread


def test_ordered_map_keeps_order_bounds_work_in_flight_and_restores_threads():
    import threading
    import time

    main_threads = torch.get_num_threads()
    started, lock, seen_threads = [], threading.Lock(), set()

    def items():
        for i in range(20):
            with lock:
                started.append(i)
            yield i

    def slow(i):
        seen_threads.add(torch.get_num_threads())
        time.sleep(0.02 * ((i * 7) % 3))  # finish out of order
        return i * i

    out = []
    for result in streams.ordered_map(slow, items(), workers=3, threads=1):
        with lock:
            assert len(started) - len(out) <= 3 + 1  # never more than workers + 1 pulled ahead of the consumer
        out.append(result)
    assert out == [i * i for i in range(20)]
    assert seen_threads == {1} and torch.get_num_threads() == main_threads

    def failing(i):
        if i == 4:
            raise ValueError("batch 4 failed")
        return i

    with pytest.raises(ValueError, match="batch 4 failed"):
        list(streams.ordered_map(failing, range(10), workers=2, threads=1))
    assert torch.get_num_threads() == main_threads


def test_cpu_generator_runs_batches_side_by_side(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert generation.generator_workers(torch.device("cpu")) == (2, 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert generation.generator_workers(torch.device("cpu")) == (
        generation.CPU_WORKERS_MAX,
        16 // generation.CPU_WORKERS_MAX,
    )
    assert generation.generator_workers(torch.device("cuda"))[0] == 1


@pytest.mark.parametrize(
    ("n", "batch_size", "workers"), [(200, 16, 2), (17, 16, 1), (33, 16, 4), (3, 16, 4), (1, 128, 1)]
)
def test_batches_end_together_on_every_worker(n, batch_size, workers):
    """200 frames on 2 workers: 14 batches of 14-15 frames, not 12 of 16 and a last one of 8 run alone."""
    sizes = generation.batch_sizes(n, batch_size, workers)
    assert sum(sizes) == n and max(sizes) <= batch_size and max(sizes) - min(sizes) <= 1
    assert len(sizes) % workers == 0 or len(sizes) == n < workers
    assert len(sizes) == -(-n // (batch_size * workers)) * workers or len(sizes) == n
    assert generation.batch_sizes(0, batch_size, workers) == []


def test_oom_halves_the_batch(capsys):
    calls = []

    def fn(chunk):
        calls.append(len(chunk))
        if len(chunk) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return list(chunk)

    limit = devices.BatchLimit(1 << 30, "the generator", quiet=False)
    assert devices.in_chunks(fn, list(range(7)), limit, cap=8) == list(range(7))
    assert limit.size == 1 and calls[:3] == [7, 3, 1]  # a failed chunk of n is retried as n // 2
    assert "retrying with batches of 1" in capsys.readouterr().err
    limit.halve(8)  # another thread failing at a size already halved below changes nothing
    assert limit.size == 1
    with pytest.raises(UserError, match="single frame"):
        limit.halve(1)


def test_progress_follows_the_stages_and_raising_cancels(wav2lip_checkpoint, clip, tmp_path):
    sync = lipsync.LipSync(
        ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu"), detector=FakeDetector(), quiet=True
    )
    seen: list[tuple[str, int, int]] = []
    sync(clip["video"], clip["speech"], tmp_path / "a.mp4", quiet=True, on_progress=lambda *r: seen.append(r))
    assert [r for r in seen if r[0] == "detect faces"][-1] == ("detect faces", 12, 12)
    assert [r for r in seen if r[0] == "lip-sync"] == [("lip-sync", i, 12) for i in range(1, 13)]
    assert seen.index(("detect faces", 12, 12)) < seen.index(("lip-sync", 1, 12))

    class CancelledError(Exception):
        pass

    def cancel_at_5(stage, done, total):
        if stage == "lip-sync" and done == 5:
            raise CancelledError

    with pytest.raises(CancelledError):
        sync(clip["video"], clip["speech"], tmp_path / "b.mp4", quiet=True, on_progress=cancel_at_5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]  # no partial file left
