"""Wav2Lip-HQ (super-resolution + face-parsing mask) end to end: equal to the fork's own output, our soft mask,
the parse cache, the weight files and their errors, memory accounting.

The reference numbers (tests/data/hq/fork_tiny_clip.npz) are the face box of the frames the fork itself
wrote (Markfryazino/wav2lip-hq @ 33b7b53, --box honoured), on the tiny clip below with the deterministic
Wav2Lip weights and tools/detweights.py's stand-ins for ESRGAN (the full 64/23/32 network) and the parser.
The clip is lossless (FFV1, BGR) so that OpenCV, which the fork reads it with, and PyAV decode the same
pixels. Elsewhere a small ESRGAN (16 features, 2 blocks) keeps the tests fast.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common.errors import UserError
from face_detection import Box
from lipsync import face_masks
from lipsync import pipeline as lipsync
from lipsync.face_parsing import ParseCache
from lipsync.hq_weights import load_bisenet, load_rrdbnet
from lipsync.options import ModelOptions
from models.rrdbnet import RRDBNet
from tests.cli import cli
from tests.media import face_frame, write_video, write_wav
from tools.detweights import DATA, sr_stand_in

FORK = np.load(DATA / "hq" / "fork_tiny_clip.npz")
TINY_BOX = [int(v) for v in FORK["box"]]  # top, bottom, left, right: 72×68, not square
SMALL = dict(num_feat=16, num_block=2, num_grow_ch=8)
MAX_DIFFERING = 0.005  # of the box's pixels may differ from the fork by one level (the generator's round-off)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The fork's clip (3 frames at 10 fps, 0.3 s of speech: 3 output frames for both), and a 6-frame speech."""
    d = tmp_path_factory.mktemp("hq clip")
    return {"video": write_video(d / "face.avi", 3, 10, lossless=True), "speech": write_wav(d / "speech.wav", 0.3),
            "long": write_wav(d / "long.wav", 0.6), "dir": d}  # fmt: skip


@pytest.fixture(scope="session")
def esrgan_full(tmp_path_factory) -> Path:
    """The fork's ESRGAN size (64 features, 23 blocks, ×4) with the stand-in weights, as esrgan_yunying.pth."""
    path = tmp_path_factory.mktemp("esrgan full") / "esrgan_full.pth"
    torch.save({"params": sr_stand_in(RRDBNet())}, path)
    return path


def hq_sync(checkpoint, sr=None, parser=None, **model) -> lipsync.LipSync:
    options = ModelOptions(checkpoint_path=str(checkpoint), device="cpu", sr_path=sr and str(sr),
                           segmentation_path=parser and str(parser), **model)  # fmt: skip
    return lipsync.LipSync(options, quiet=True)


def run_frames(sync, clip: dict, speech: str = "speech", **options) -> np.ndarray:
    """Every output frame, before encoding."""
    frames: list[np.ndarray] = []
    sync(clip["video"], clip[speech], clip["dir"] / "out.mp4", box=TINY_BOX, quiet=True,
         on_frame=lambda i, f: frames.append(f.copy()), **options)  # fmt: skip
    return np.stack(frames)


def in_box(frames: np.ndarray) -> np.ndarray:
    y1, y2, x1, x2 = TINY_BOX
    return frames[:, y1:y2, x1:x2]


def assert_like_fork(got: np.ndarray, want: np.ndarray) -> None:
    """The fork's box to the generator's round-off: one level at a handful of pixels (2 of 4896 seen)."""
    assert got.shape == want.shape
    diff = np.abs(got.astype(int) - want)
    differing = (diff > 0).any(-1).mean(axis=(1, 2))
    assert diff.max() <= 1 and differing.max() <= MAX_DIFFERING, (diff.max(), differing)


# --- equal to the fork -------------------------------------------------------------------------------------


def test_mask_alone_equals_the_fork(wav2lip_checkpoint, parser_weights, tiny):
    """The fork's --no_sr: the truncated prediction resized to the box, blended at 512 by the hard mask."""
    frames = run_frames(hq_sync(wav2lip_checkpoint, parser=parser_weights), tiny)
    assert_like_fork(in_box(frames), FORK["mask"])
    outside = frames.copy()
    outside[:, TINY_BOX[0] : TINY_BOX[1], TINY_BOX[2] : TINY_BOX[3]] = 0
    assert np.array_equal(outside[0][:, :20], face_frame(0)[:, :20])  # nothing outside the box moves


def test_super_resolution_and_mask_equal_the_fork(wav2lip_checkpoint, esrgan_full, parser_weights, tiny):
    """The fork's default, with the full-size ESRGAN: SR of the float prediction, rounded, resized to the box,
    the mask blend at 512 and the truncating store."""
    frames = run_frames(hq_sync(wav2lip_checkpoint, esrgan_full, parser_weights), tiny)
    assert_like_fork(in_box(frames), FORK["sr_mask"])


def fork_blend_variant(rounded_store: bool = False, at_box: bool = False, interpolation: int = cv2.INTER_LINEAR):
    """`face_masks.fork_blend` written again, with one step done another way when asked."""

    def blend(frame, box, face, labels, region):
        crop = frame[box.y1 : box.y2, box.x1 : box.x2]
        size = (box.width, box.height)
        patch = cv2.resize(face, size, interpolation=interpolation)
        mask = face_masks.region_mask(labels, region)
        if at_box:
            mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
            crop[:] = np.where(mask[..., None], patch, crop)
            return
        source, target = (cv2.resize(x, (512, 512), interpolation=interpolation) for x in (crop, patch))
        blended = cv2.resize(np.where(mask[..., None], target, source).astype(np.float32), size)
        crop[:] = np.rint(blended) if rounded_store else blended

    return blend


@pytest.mark.parametrize(
    ("fault", "caught"),
    [({}, False), ({"rounded_store": True}, True), ({"at_box": True}, True), ({"interpolation": cv2.INTER_AREA}, True)],
    ids=["none", "rounded store", "blend at the box's size", "INTER_AREA resizes"],
)
def test_a_wrong_step_is_caught(wav2lip_checkpoint, parser_weights, tiny, monkeypatch, fault, caught):
    """The reference is strict enough: the paste written again passes, and with one step done another way
    it fails the comparison."""
    monkeypatch.setattr(face_masks, "fork_blend", fork_blend_variant(**fault))
    got = in_box(run_frames(hq_sync(wav2lip_checkpoint, parser=parser_weights), tiny))
    if not caught:
        assert_like_fork(got, FORK["mask"])
        return
    with pytest.raises(AssertionError):
        assert_like_fork(got, FORK["mask"])


# --- better than the fork -----------------------------------------------------------------------------------


def test_soft_mask_keeps_every_pixel_outside_it(wav2lip_checkpoint, esrgan_small, parser_weights, tiny):
    sync = hq_sync(wav2lip_checkpoint, esrgan_small, parser_weights)
    source = face_frame(0)
    box = Box(TINY_BOX[2], TINY_BOX[0], TINY_BOX[3], TINY_BOX[1])
    labels = sync.enhance.parser([source], [box])[0]
    soft = run_frames(sync, tiny, hq_mode="soft")[0]
    fork = run_frames(sync, tiny)[0]
    weights = face_masks.soft_weights(labels, "face", box.width, box.height)
    crop = (slice(box.y1, box.y2), slice(box.x1, box.x2))
    untouched = weights == 0
    assert 0.05 < untouched.mean() < 0.9  # the parse leaves part of the box out
    assert np.array_equal(soft[crop][untouched], source[crop][untouched])  # exact source values there
    border = np.ones(weights.shape, bool)
    border[1:-1, 1:-1] = False
    assert np.array_equal(soft[crop][border], source[crop][border])  # no box edge can show
    assert (weights > 0.99).any() and ((weights > 0) & (weights < 1)).mean() > 0.02  # feathered, not hard
    # the fork rewrites the whole box: outside its mask too (blurred by two resizes, truncated)
    hard = cv2.resize(face_masks.region_mask(labels, "face").astype(np.float32), (box.width, box.height)) == 0
    assert (fork[crop][hard] != source[crop][hard]).any()


def test_mask_regions():
    labels = np.zeros((512, 512), np.uint8)
    labels[:, :200] = face_masks.SKIN
    labels[300:350, 200:300] = face_masks.UPPER_LIP
    labels[350:400, 200:300] = face_masks.LOWER_LIP
    face, lower, mouth = (face_masks.region_mask(labels, r) for r in ("face", "lower_face", "mouth"))
    assert face.sum() == 512 * 200 + 100 * 100 and mouth.sum() == 100 * 100
    assert not lower[:256].any() and np.array_equal(lower[256:], face[256:])
    assert not (mouth & ~face).any()


# --- the parse: once per source frame, cached ---------------------------------------------------------------


def test_parse_runs_once_per_source_frame_and_is_cached(wav2lip_checkpoint, parser_weights, tiny, tmp_path):
    cache = tmp_path / "cache"
    sync = hq_sync(wav2lip_checkpoint, parser=parser_weights, cache_dir=str(cache))
    parsed = []
    labels = sync.enhance.parser.labels
    sync.enhance.parser.labels = lambda crops: parsed.append(len(crops)) or labels(crops)
    first = run_frames(sync, tiny, "long")  # 6 output frames: the 3-frame video twice
    assert sum(parsed) == 3 and len(list((cache / "parsing").glob("*.png"))) == 3
    again = hq_sync(wav2lip_checkpoint, parser=parser_weights, cache_dir=str(cache))
    again.enhance.parser.labels = lambda crops: parsed.append(len(crops)) or labels(crops)
    assert np.array_equal(run_frames(again, tiny, "long"), first) and sum(parsed) == 3  # all from the disk


def test_parse_cache_reads_only_whole_entries(tmp_path):
    cache = ParseCache("x" * 32, tmp_path)
    labels = np.random.default_rng(0).integers(0, 19, (512, 512), dtype=np.uint8)
    key = cache.key(labels[..., None].repeat(3, -1))
    cache.put(key, labels)
    assert np.array_equal(ParseCache("x" * 32, tmp_path).get(key), labels)  # from the disk
    (tmp_path / "parsing" / f"{key}.png").write_bytes(b"\x89PNG torn")
    assert ParseCache("x" * 32, tmp_path).get(key) is None  # a damaged entry is a miss
    assert ParseCache("y" * 32, tmp_path).key(labels) != ParseCache("x" * 32, tmp_path).key(labels)


# --- memory --------------------------------------------------------------------------------------------------


def test_memory_budget_counts_the_sr_faces_and_parses(wav2lip_checkpoint, esrgan_small, parser_weights):
    from lipsync.options import Options

    plain = hq_sync(wav2lip_checkpoint)
    hq = hq_sync(wav2lip_checkpoint, esrgan_small, parser_weights)
    assert hq.generator.extra_bytes == 96 * 96 * 3 * 4 + 384 * 384 * 3 + 512 * 512
    opts = Options(memory_budget=16)
    frame_bytes = 256 * 256 * 3
    assert hq.generator.plan(100, opts, frame_bytes)[0] < plain.generator.plan(100, opts, frame_bytes)[0]


# --- weight files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["params", "params_ema"])
@pytest.mark.parametrize("scale", [4, 2, 1])
def test_esrgan_files_load_in_both_containers_and_scales(tmp_path, key, scale):
    saved = RRDBNet(scale=scale, **SMALL)
    saved.load_state_dict(sr_stand_in(saved))
    path = tmp_path / "esrgan.pth"
    torch.save({key: saved.state_dict()}, path)
    model = load_rrdbnet(path)
    assert model.scale == scale and not model.training
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), saved.eval()(x))


def test_wrong_or_missing_weight_files_are_one_line(wav2lip_checkpoint, esrgan_small, parser_weights, tmp_path):
    missing = tmp_path / "esrgan_yunying.pth"
    cases = [
        (lambda: load_rrdbnet(wav2lip_checkpoint), "this is a Wav2Lip checkpoint; --sr_path expects ESRGAN"),
        (lambda: load_rrdbnet(parser_weights), "this is a BiSeNet checkpoint; --sr_path"),
        (lambda: load_bisenet(esrgan_small), "this is a RRDBNet checkpoint; --segmentation_path expects"),
        (lambda: load_bisenet(wav2lip_checkpoint), "this is a Wav2Lip checkpoint; --segmentation_path"),
        (lambda: load_rrdbnet(missing), "file not found.*checkpoints/.*--sr_path.*README.md, section 'HQ'"),
        (lambda: load_bisenet(missing), "file not found.*face_segmentation.pth.*section 'HQ'"),
    ]
    for load, words in cases:
        with pytest.raises(UserError, match=words) as e:
            load()
        assert "\n" not in str(e.value)


def test_x2_model_in_fork_mode_and_feather_with_a_parser_are_refused(wav2lip_checkpoint, parser_weights, tiny,
                                                                      tmp_path):  # fmt: skip
    x2 = tmp_path / "RealESRGAN_x2plus.pth"
    torch.save({"params_ema": sr_stand_in(RRDBNet(scale=2, **SMALL))}, x2)
    sync = hq_sync(wav2lip_checkpoint, x2, parser_weights)
    with pytest.raises(UserError, match="×2 ESRGAN.*--hq_mode soft"):
        run_frames(sync, tiny)
    assert run_frames(sync, tiny, hq_mode="soft").shape == (3, 128, 160, 3)  # a ×2 model where ×4 is not required
    with pytest.raises(UserError, match="--blend feather and --segmentation_path"):
        run_frames(sync, tiny, blend="feather", hq_mode="soft")


def test_command_line_errors_are_one_line(wav2lip_checkpoint, tiny, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    argv = ["--checkpoint_path", wav2lip_checkpoint, "--face", tiny["video"], "--audio", tiny["speech"],
            "--outfile", out, "--box", *TINY_BOX, "--quiet"]  # fmt: skip
    for extra, words in (
        (["--sr_path", wav2lip_checkpoint], "a Wav2Lip checkpoint; --sr_path expects ESRGAN's RRDBNet"),
        (["--segmentation_path", tmp_path / "none.pth"], "file not found.*--segmentation_path"),
    ):
        code, err = cli(argv + extra, capsys)
        err = err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert re.search(words, err), err
        assert not out.exists()


# --- live --------------------------------------------------------------------------------------------------------


def test_live_stream_equals_the_offline_run_and_parses_each_frame_once(wav2lip_checkpoint, esrgan_small,
                                                                          parser_weights, tiny):  # fmt: skip
    from live.options import LiveOptions
    from live.replay import replay

    sync = hq_sync(wav2lip_checkpoint, esrgan_small, parser_weights)
    offline = run_frames(sync, tiny, "long", idle="generate")  # 6 frames: the 3-frame video twice
    parsed = []
    labels = sync.enhance.parser.labels
    sync.enhance.parser.labels = lambda crops: parsed.append(len(crops)) or labels(crops)
    sync.enhance.parser.cache.memory.clear()
    frames: list[np.ndarray] = []
    figures = replay(sync, tiny["video"], tiny["long"], tiny["dir"] / "live.mp4", LiveOptions(pace="fast"),
                     on_frame=lambda i, f: frames.append(f.copy()), box=TINY_BOX, idle="generate")  # fmt: skip
    assert np.array_equal(np.stack(frames), offline)  # the offline run's frames, bit for bit
    assert sum(parsed) == 3  # once per source frame, when the avatar was prepared
    assert figures["hq"] == ["super-resolution ×4", "face parser"]


def test_realtime_refuses_super_resolution_that_cannot_keep_its_budget(wav2lip_checkpoint, esrgan_small, tiny,
                                                                         capsys):  # fmt: skip
    import realtime
    from live.stream import check_live_budget

    sync = hq_sync(wav2lip_checkpoint, esrgan_small)
    assert 0 < check_live_budget(sync, budget_s=60.0) < 60.0
    assert check_live_budget(hq_sync(wav2lip_checkpoint), budget_s=0.0) is None  # no step: nothing to check
    argv = ["--checkpoint_path", wav2lip_checkpoint, "--sr_path", esrgan_small, "--face", tiny["video"],
            "--audio", tiny["speech"], "--outfile", tiny["dir"] / "rt.mp4", "--box", *TINY_BOX,
            "--latency_budget_ms", "1"]  # fmt: skip
    code, err = cli(argv, capsys, realtime.main)
    err = err.strip().splitlines()
    assert code == 2 and re.search(r"super-resolution ×4: one frame takes \d+ ms on cpu", err[-1])
    assert "GPU" in err[-1] and not (tiny["dir"] / "rt.mp4").exists()


# --- ONNX Runtime, and the other doors --------------------------------------------------------------------------


def test_onnx_backend_runs_both_networks(wav2lip_checkpoint, esrgan_small, parser_weights, tiny, tmp_path):
    from lipsync.face_parsing import OnnxParser
    from lipsync.super_resolution import OnnxSR

    want = run_frames(hq_sync(wav2lip_checkpoint, esrgan_small, parser_weights), tiny, hq_mode="soft")
    sync = hq_sync(wav2lip_checkpoint, esrgan_small, parser_weights, backend="onnxruntime", cache_dir=str(tmp_path))
    assert isinstance(sync.enhance.steps[0].forward, OnnxSR) and isinstance(sync.enhance.parser.labels, OnnxParser)
    assert {p.name.split("-")[0] for p in (tmp_path / "onnx").glob("*.onnx")} == {"wav2lip", "esrgan", "bisenet"}
    diff = np.abs(run_frames(sync, tiny, hq_mode="soft").astype(int) - want)
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_evaluation_takes_the_hq_flags():
    from evaluation.gen_videos_from_filelist import parse_args

    args = parse_args(["--filelist", "f", "--results_dir", "r", "--data_root", "d", "--checkpoint_path", "c",
                       "--sr_path", "esrgan.pth", "--segmentation_path", "seg.pth", "--hq_mode", "soft"])  # fmt: skip
    assert (args.sr_path, args.segmentation_path, args.hq_mode, args.mask_region) == (
        "esrgan.pth", "seg.pth", "soft", "face")  # fmt: skip
