"""The restore step: its geometry (the face reaches the restorer where FFHQ's template puts a face and
comes back exactly where it was), the sharpen enhancer, and the step in the pipeline with a stand-in
restorer (only the box changes, its edge stays the generated face's, settings and errors)."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import inference
from face_detection import Box
from lipsync import pipeline as lipsync
from lipsync import restore
from lipsync.generation import Generator, batches_in_flight, generator_workers
from lipsync.options import ModelOptions, Options
from lipsync.restorers import SIZE, restored_crops, restorer_inputs
from tests.cli import cli
from tests.media import write_video, write_wav


def checker_face(side: int, seed: int = 0) -> np.ndarray:
    """A (side, side, 3) uint8 face of fine, random detail: any misplacement by a pixel shows."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (side // 6, side // 6, 3), dtype=np.uint8)
    return np.repeat(np.repeat(coarse, 6, axis=0), 6, axis=1)


def test_window_puts_the_box_where_the_template_has_its_face():
    box = Box(200, 170, 320, 300)  # x1, y1, x2, y2: 120 × 130, as on mt_sun
    x, y, side = restore.restore_window(box)
    assert side == round(restore.CONTEXT * 130)
    scale = SIZE / side
    in_template = [(box.x1 - x) * scale, (box.y1 - y) * scale, (box.x2 - x) * scale, (box.y2 - y) * scale]
    # the template's box (about 130-382 × 175-452 at 512 px): centred, lifted, the same height
    np.testing.assert_allclose((in_template[0] + in_template[2]) / 2, 256, atol=2)
    np.testing.assert_allclose((in_template[1] + in_template[3]) / 2, 313, atol=3)
    np.testing.assert_allclose(in_template[3] - in_template[1], 277, atol=2)


def test_window_beyond_the_frame_is_mirrored():
    frame = np.arange(60 * 80 * 3, dtype=np.uint32).reshape(60, 80, 3).astype(np.uint8)
    window = restore.cut_window(frame, -5, -4, 30)
    assert window.shape == (30, 30, 3)
    np.testing.assert_array_equal(window[4:, 5:], frame[:26, :25])
    np.testing.assert_array_equal(window[3, 5:], frame[1, :25])  # reflect-101: the edge row is not repeated
    np.testing.assert_array_equal(restore.cut_window(frame, 10, 10, 20), frame[10:30, 10:30])


def test_identity_restorer_gives_the_generated_face_back_in_place():
    """If the restorer changed nothing, the box cut back from its window is the generated face (up to the
    resizes): the window and its inverse agree to the pixel, and a shift of one frame pixel shows."""
    frame = np.full((360, 480, 3), 90, np.uint8)
    box = Box(150, 100, 270, 232)
    face = checker_face(96)
    crop = restore.window_crop(frame, box, face)
    assert crop.shape == (SIZE, SIZE, 3)
    want = restore.fit_to_box(restore.resized(face, restore.FACE_SIZE, restore.FACE_SIZE), box).astype(int)
    errors = {}
    for shift in (0, 1, 2):  # in frame pixels, each about 2 px of the restorer's window
        back = restore.restored_face(np.roll(crop, 2 * shift, axis=1), box, face)
        errors[shift] = np.abs(back.astype(int) - want).mean()
        assert back.shape == (restore.FACE_SIZE, restore.FACE_SIZE, 3) and back.dtype == np.uint8
    print(f"mean error of the round trip, in levels, by shift: {errors}")
    assert errors[0] < 3 and errors[1] > 2 * errors[0] and errors[2] > errors[1]


def test_restored_face_keeps_the_generated_edge():
    """Whatever the restorer returns, the face's outermost pixels stay the generated face's, and the inside
    is the restorer's (a box larger than the restorer's face: nothing to band-limit)."""
    box = Box(40, 30, 340, 330)
    face = checker_face(96, seed=1)
    white = np.full((SIZE, SIZE, 3), 255, np.uint8)
    out = restore.restored_face(white, box, face).astype(int)
    edge = restore.resized(face, restore.FACE_SIZE, restore.FACE_SIZE).astype(int)
    for a, b in ((out[0], edge[0]), (out[-1], edge[-1]), (out[:, 0], edge[:, 0]), (out[:, -1], edge[:, -1])):
        np.testing.assert_array_equal(a, b)
    assert (out[60:-60, 60:-60] == 255).all()


def test_fit_to_box_band_limits_only_for_smaller_boxes():
    """A face shrunk by the paste's bilinear resize aliases; band-limited first, it matches an area shrink."""
    face = checker_face(276, seed=3)
    small = Box(0, 0, 100, 110)
    fitted = restore.fit_to_box(face, small)
    assert fitted.shape == face.shape
    area = cv2.resize(face, (100, 110), interpolation=cv2.INTER_AREA).astype(int)
    pasted = lambda f: cv2.resize(f, (100, 110)).astype(int)  # noqa: E731 - the original paste's resize
    assert np.abs(pasted(fitted) - area).mean() < 0.25 * np.abs(pasted(face) - area).mean()
    assert restore.fit_to_box(face, Box(0, 0, 300, 300)) is face


def test_seam_weights():
    w = restore.seam_weights(130, 120)
    assert w.shape == (130, 120) and w.dtype == np.float32
    assert w[0].max() == w[-1].max() == w[:, 0].max() == w[:, -1].max() == 0.0
    assert w[24:106, 24:96].min() > 0.99  # 1 from twice the margin (12 px) inwards
    assert (np.diff(w[:65, 60]) >= 0).all()  # rises monotonically from the edge


def test_restorer_io_is_the_references_normalisation():
    """BGR uint8 → RGB in [-1, 1]; back: clamp, ×127.5 after +1, rounded (BasicSR's tensor2img)."""
    crops = np.zeros((1, SIZE, SIZE, 3), np.uint8)
    crops[0, 0, 0] = (0, 128, 255)  # B, G, R
    x = restorer_inputs(crops, torch.device("cpu"), torch.float32)
    assert x.shape == (1, 3, SIZE, SIZE)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [1.0, 128 / 127.5 - 1, -1.0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(restored_crops(x)[0, 0, 0], [0, 128, 255])
    y = x.clone()
    y[0, :, 0, 0] = torch.tensor([2.0, 0.004, -3.0])  # out of range, and a value that rounds up
    np.testing.assert_array_equal(restored_crops(y)[0, 0, 0], [0, 128, 255])


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_sharpen(dtype):
    """uint8 out (the generator's float faces rounded), the edge untouched, larger steps inside."""
    face = checker_face(96, seed=2).astype(dtype)
    out = restore.sharpen(face, 1.0)
    assert out.dtype == np.uint8 and out.shape == face.shape
    np.testing.assert_array_equal(restore.sharpen(face, 0.0), face)
    np.testing.assert_array_equal(out[0], face[0])
    np.testing.assert_array_equal(out[:, -1], face[:, -1])
    inner = (slice(16, 80), slice(16, 80))
    contrast = lambda img: np.abs(np.diff(img[inner].astype(float), axis=1)).mean()  # noqa: E731
    assert contrast(out) > 1.3 * contrast(face)


# --- the step in the pipeline (a stand-in restorer: the plumbing, not the network) ----------------------------

BOX = [20, 110, 30, 120]  # --box (top, bottom, left, right) around the drawn face of tests/media.py's frames


class Brighten:
    """Stands in for GFPGAN/CodeFormer (`restorers.Restore`): +`levels` everywhere, every call recorded."""

    calls: list[tuple[int, float, np.ndarray]] = []
    levels = 40

    def __init__(self, name: str, path: object, device: torch.device, dtype: torch.dtype) -> None:
        self.name = name

    def __call__(self, crops: np.ndarray, fidelity: float) -> np.ndarray:
        Brighten.calls.append((len(crops), fidelity, crops.copy()))
        return np.clip(crops.astype(int) + self.levels, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> dict:
    """A 4-frame video of tests/media.py's drawn face and 0.2 s of speech (5 output frames)."""
    d = tmp_path_factory.mktemp("restore clip")
    return {"video": write_video(d / "face.mp4", 4), "speech": write_wav(d / "speech.wav", 0.2), "dir": d}


def frames_of(checkpoint: Path, clip: dict, model: dict | None = None, **options) -> np.ndarray:
    sync = lipsync.LipSync(ModelOptions(checkpoint_path=str(checkpoint), device="cpu", **(model or {})), quiet=True)
    frames: list[np.ndarray] = []
    sync(clip["video"], clip["speech"], clip["dir"] / "out.mp4", box=BOX, quiet=True,
         on_frame=lambda i, f: frames.append(f.copy()), **options)  # fmt: skip
    return np.stack(frames).astype(int)


def split(diff: np.ndarray) -> tuple[int, int, float]:
    """(largest change outside the box, on its outermost pixels, mean change inside it away from the edge)."""
    top, bottom, left, right = BOX
    inside = np.zeros(diff.shape[1:3], bool)
    inside[top:bottom, left:right] = True
    ring = inside.copy()
    ring[top + 1 : bottom - 1, left + 1 : right - 1] = False
    core = diff[:, top + 20 : bottom - 20, left + 20 : right - 20]
    return int(diff[:, ~inside].max()), int(diff[:, ring].max()), float(core.mean())


def test_restorer_changes_only_the_box_and_meets_the_generated_edge(monkeypatch, wav2lip_checkpoint, clip):
    """With a restorer, pixels outside the box are the plain run's exactly. Against a restorer that changes
    nothing, the box's edge moves at most 2 levels (the restored face fades into the generated one) and the
    inside takes the restorer's +40 whole. The restorer sees one 512×512 window a call (CPU), with the
    clip's fidelity weight."""
    monkeypatch.setattr(restore, "TorchRestorer", Brighten)
    plain = frames_of(wav2lip_checkpoint, clip)
    monkeypatch.setattr(Brighten, "levels", 0)
    unchanged = frames_of(wav2lip_checkpoint, clip, {"enhancer": "codeformer"}, fidelity_weight=0.3)
    monkeypatch.setattr(Brighten, "levels", 40)
    Brighten.calls = []
    restored = frames_of(wav2lip_checkpoint, clip, {"enhancer": "codeformer"}, fidelity_weight=0.3)
    outside, edge, core = split(np.abs(restored - unchanged))
    print(f"restorer +40 vs +0: outside {outside}, edge {edge}, inside {core:.1f} levels; +0 vs no restorer: "
          f"{split(np.abs(unchanged - plain))} (resampling through the window)")  # fmt: skip
    assert outside == 0 and edge <= 2 and 36 <= core <= 41
    assert split(np.abs(restored - plain))[0] == 0
    assert [(n, w) for n, w, _ in Brighten.calls] == [(1, 0.3)] * len(plain)
    assert all(crops.shape == (1, SIZE, SIZE, 3) for _, _, crops in Brighten.calls)


def test_sharpen_through_the_command_line(wav2lip_checkpoint, clip, monkeypatch):
    """`--enhancer sharpen`: only the box changes, its edge by a level or two (the paste's resize reaches a
    pixel in); `--sharpen_amount 0` is the plain run."""
    plain = frames_of(wav2lip_checkpoint, clip)
    frames: dict[float, list[np.ndarray]] = {}
    encode = lipsync.encode
    for amount in (0.0, 2.0):
        got = frames.setdefault(amount, [])
        monkeypatch.setattr(lipsync, "encode", lambda items, writer, on_frame, got=got: encode(
            items, writer, lambda i, f: got.append(f.copy())))  # fmt: skip
        inference.main(["--checkpoint_path", str(wav2lip_checkpoint), "--face", str(clip["video"]), "--audio",
                        str(clip["speech"]), "--outfile", str(clip["dir"] / "sharp.mp4"), "--box", *map(str, BOX),
                        "--quiet", "--device", "cpu", "--enhancer", "sharpen", "--sharpen_amount", str(amount)])  # fmt: skip
    np.testing.assert_array_equal(np.stack(frames[0.0]), plain)
    outside, edge, core = split(np.abs(np.stack(frames[2.0]).astype(int) - plain))
    print(f"sharpen: outside {outside}, edge {edge}, inside {core:.1f} levels")
    assert outside == 0 and edge <= 3 and core > 1


def test_step_without_frames_restores_the_face_in_its_own_mirror():
    """A live session's shared generator has no frames: the face is its own context."""
    Brighten.calls = []
    step = restore.RestoreStep("gfpgan", Brighten("gfpgan", None, torch.device("cpu"), torch.float32), 1)
    faces = np.stack([checker_face(96), checker_face(96, seed=5)]).astype(np.float32)
    out = step(faces, None, None)
    assert out.shape == (2, restore.FACE_SIZE, restore.FACE_SIZE, 3) and out.dtype == np.uint8
    assert [(n, w) for n, w, _ in Brighten.calls] == [(1, 0.5)] * 2  # the default fidelity weight
    assert step.out_size(96) == restore.FACE_SIZE and step.out_size(384) == restore.FACE_SIZE
    assert restore.RestoreStep("sharpen", None, 1).out_size(384) == 384


def test_memory_budget_counts_the_restored_faces_and_their_windows(monkeypatch, wav2lip_checkpoint):
    """A frame in flight through a restorer is counted with its restored face and its 512×512 window (uint8
    in, float32 to the restorer and back, uint8 out), so `--memory_budget` shrinks the batches to fit them."""
    monkeypatch.setattr(restore, "TorchRestorer", Brighten)

    def generator(enhancer: str) -> Generator:
        model = ModelOptions(checkpoint_path=str(wav2lip_checkpoint), device="cpu", enhancer=enhancer)
        return lipsync.LipSync(model, quiet=True).generator

    restorer, sharpen = generator("gfpgan"), generator("sharpen")
    window = SIZE * SIZE * 3 * (1 + 4 + 4 + 1)
    assert restorer.extra_bytes == 96 * 96 * 3 * 4 + restore.FACE_SIZE**2 * 3 + window
    assert sharpen.extra_bytes == 96 * 96 * 3 * 4 + 96 * 96 * 3
    opts, frame_bytes = Options(memory_budget=64), 768 * 576 * 3  # mt_sun.mp4's frames
    cap = restorer.plan(100, opts, frame_bytes)[0]
    in_flight = batches_in_flight(generator_workers(torch.device("cpu"))[0])
    assert cap * (frame_bytes + window) * in_flight <= 64 << 20
    assert cap < sharpen.plan(100, opts, frame_bytes)[0]


def test_bad_settings_are_one_line(wav2lip_checkpoint, clip, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    argv = ["--checkpoint_path", wav2lip_checkpoint, "--face", clip["video"], "--audio", clip["speech"],
            "--outfile", out, "--box", *BOX, "--quiet", "--device", "cpu"]  # fmt: skip
    for extra, words in (
        (["--enhancer", "gfpgan"], "checkpoints/GFPGANv1.4.pth: file not found.*--enhancer_path.*'Restoration'"),
        (["--enhancer", "codeformer", "--enhancer_path", wav2lip_checkpoint],
         "a Wav2Lip checkpoint; --enhancer_path expects CodeFormer \\(codeformer.pth\\)"),
        (["--enhancer", "sharpen", "--enhancer_path", wav2lip_checkpoint], "--enhancer sharpen takes no weights"),
        (["--enhancer", "sharpen", "--fidelity_weight", "1.5"], "--fidelity_weight must be between 0 and 1"),
        (["--enhancer", "sharpen", "--sharpen_amount", "-1"], "--sharpen_amount must be 0 or more"),
    ):  # fmt: skip
        code, err = cli(argv + extra, capsys)
        err = err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert re.search(words, err), err
        assert not out.exists()
