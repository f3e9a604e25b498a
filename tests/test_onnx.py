"""ONNX: the three networks exported from deterministic weights, the goldens through ONNX Runtime, the
pipeline against the torch backend, and export_onnx.py's errors.

Each network is exported once per session (a few seconds each on 2 cores); the goldens are the same
numbers and tolerances as tests/test_models.py, test_face_detection.py and test_evaluation_syncnet.py.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export_onnx
import face_detection
import inference
from common import onnx_export
from common.errors import UserError
from evaluation import lse, media
from evaluation.onnx_syncnet import syncnet_loader
from face_detection.detection.sfd import bbox
from face_detection.detection.sfd.detect import candidates
from lipsync import onnx_models
from lipsync import pipeline as lipsync
from lipsync.options import ModelOptions
from tests.media import write_video, write_wav
from tools.detweights import DATA, assert_stats, det_state_dict, formula_input, load_golden

SPECS = export_onnx.specs()
BOX = [20, 110, 30, 120]  # --box (top, bottom, left, right) inside the 160x128 test frames
ENCODE = lipsync.encode  # the encode stage, before a test wraps it
MAX_LEVELS = 2  # the ONNX backend's frames may differ from the torch backend's by this much per pixel


@pytest.fixture(scope="session")
def syncnet_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("syncnet") / "syncnet_v2.model"
    torch.save(det_state_dict("syncnet_python_S"), path)
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def onnx_files(wav2lip_checkpoint, s3fd_weights, syncnet_weights, esrgan_small, parser_weights, cache_dir):
    """`onnx_files(model)`: its export (through the cache, as `--backend onnxruntime` makes it), once."""
    sources = {"wav2lip": wav2lip_checkpoint, "s3fd": s3fd_weights, "syncnet": syncnet_weights,
               "esrgan": esrgan_small, "bisenet": parser_weights}  # fmt: skip
    made: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in made:
            made[model] = onnx_export.cached_export(SPECS[model], sources[model], cache_dir, quiet=True)
        return made[model]

    get.sources = sources
    return get


@functools.cache
def session(path: Path) -> onnx_export.OnnxNet:
    spec = SPECS[Path(path).name.split("-")[0]]
    return onnx_export.OnnxNet(onnx_export.open_session(path, spec, torch.device("cpu"), 2))


# --- export ----------------------------------------------------------------------------------------------


def test_every_model_of_the_command_has_a_spec():
    assert tuple(SPECS) == export_onnx.MODELS


# The restorers take seconds a 512×512 face: tests/test_restore_onnx.py exports each once and holds it to the
# reference's goldens (its export's own check already runs another batch size against torch).
@pytest.mark.parametrize("model", [m for m in export_onnx.MODELS if m not in ("gfpgan", "codeformer")])
def test_export_is_valid_with_dynamic_batch(onnx_files, model):
    path = onnx_files(model)
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version == onnx_export.OPSET
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in proto.graph.input)  # symbolic batch
    inputs = SPECS[model].examples(3, 7, False)  # not the trace's batch or size
    with torch.no_grad():
        want = SPECS[model].network(onnx_files.sources[model], "--checkpoint_path")(*inputs)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    net = session(path)
    firsts = net(*(x[:1] for x in inputs))
    for got, first, ref in zip(net(*inputs), firsts, want, strict=True):
        atol = onnx_export.VERIFY_RTOL * float(ref.abs().max())
        assert got.shape == ref.shape and first.shape == (1, *ref.shape[1:])
        torch.testing.assert_close(got, ref, rtol=0, atol=atol)
        torch.testing.assert_close(first, ref[:1], rtol=0, atol=atol)  # batch 1: the same first item


def test_wrong_onnx_file_is_a_user_error(onnx_files, tmp_path):
    with pytest.raises(UserError, match="not an ONNX export of wav2lip"):
        onnx_export.open_session(onnx_files("s3fd"), SPECS["wav2lip"], torch.device("cpu"), 1)
    with pytest.raises(UserError, match="ONNX file not found.*--onnx_path"):
        onnx_export.open_session(tmp_path / "nope.onnx", SPECS["wav2lip"], torch.device("cpu"), 1)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        onnx_export.open_session(tmp_path / "junk.onnx", SPECS["wav2lip"], torch.device("cpu"), 1)


def test_providers_follow_the_device():
    assert onnx_export.providers(torch.device("cpu")) == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UserError, match="onnxruntime-gpu"):
            onnx_export.providers(torch.device("cuda"))


# --- the goldens through ONNX Runtime --------------------------------------------------------------------


def test_generator_golden(onnx_files):
    g = load_golden("wav2lip")["forward_4d"]
    (out,) = session(onnx_files("wav2lip"))(
        formula_input(g["inputs"]["audio_sequences"]), formula_input(g["inputs"]["face_sequences"])
    )
    print(f"wav2lip onnx max |dev| {assert_stats(out, g['output']):.2e}")


def test_s3fd_golden_forward_and_boxes(onnx_files):
    golden = load_golden("s3fd")
    net = session(onnx_files("s3fd"))
    outputs = net(formula_input(golden["raw_forward"]["inputs"]["x"]))
    for out, (name, stats) in zip(outputs, golden["raw_forward"]["outputs"].items(), strict=True):
        print(f"s3fd onnx {name}: max |dev| {assert_stats(out, stats, rtol=1e-4, atol=1e-5):.2e}")
    image = cv2.imread(str(DATA / "face_320x448.png"))
    batch = np.stack([image, image[:, ::-1]])
    seen = []
    spy = lambda x: seen.append(net(x)) or seen[-1]  # noqa: E731 - the forward pass, recorded
    fa = face_detection.FaceAlignment(device="cpu", path_to_detector="unused.pth", network=spy)
    assert fa.get_detections_for_batch(batch) == [tuple(r) for r in golden["pipeline"]["results"]]
    for d, want in zip(candidates(seen[0]), golden["pipeline"]["per_image_intermediates"], strict=True):
        assert len(d) == want["n_candidates"]
        kept = d[bbox.nms(d, 0.3)]
        np.testing.assert_allclose(kept[:5].numpy(), want["top5_after_nms"], atol=1e-2, rtol=0)


def test_syncnet_golden_and_lse(onnx_files):
    golden = load_golden("syncnet_python")
    model = syncnet_loader("onnxruntime", onnx_files("syncnet"))("unused", torch.device("cpu"))
    for method in ("forward_aud", "forward_lip"):
        g = golden[method]
        out = getattr(model, method)(formula_input(g["inputs"]["x"]))
        assert_stats(out, g["output"], rtol=1e-4, atol=1e-5 * max(1.0, g["output"]["std"]))
    g = load_golden("lse")["result_lossless_frames"]
    video = DATA / "lse_video.mp4"
    frames, audio = media.read_frames(video, lossless=True), media.read_audio(video)
    im, cc = lse.sync_features(model, frames, lse.mfcc(audio), g["n_windows"])
    assert_stats(cc, g["cc_feat"], rtol=1e-4, atol=1e-3)
    assert_stats(im, g["im_feat"], rtol=1e-4, atol=1e-3)
    r = lse.score_features(im, cc)
    assert r.offset == g["offset"]
    np.testing.assert_allclose([r.lse_d, r.lse_c], [g["LSE_D_min_dist"], g["LSE_C_confidence"]], rtol=1e-4)


# --- end to end ------------------------------------------------------------------------------------------


def run_inference(monkeypatch, argv: list[str]) -> list[np.ndarray]:
    """inference.py's main in this process; the frames it encodes, exactly."""
    frames: list[np.ndarray] = []
    monkeypatch.setattr(lipsync, "encode", lambda items, writer, on_frame: ENCODE(
        items, writer, lambda i, f: frames.append(f.copy())))  # fmt: skip
    inference.main(argv)
    return frames


def test_inference_onnxruntime_equals_torch(monkeypatch, tmp_path, wav2lip_checkpoint, onnx_files, cache_dir):
    """`--backend onnxruntime` takes the cached export (no new export) and its frames are the torch
    backend's within MAX_LEVELS."""
    onnx_files("wav2lip")
    face, speech = write_video(tmp_path / "face.mp4", 10), write_wav(tmp_path / "speech.wav", 0.4)
    common = ["--checkpoint_path", str(wav2lip_checkpoint), "--face", str(face), "--audio", str(speech), "--box",
              *map(str, BOX), "--device", "cpu", "--quiet", "--cache_dir", str(cache_dir)]  # fmt: skip
    monkeypatch.setattr(onnx_export, "export", lambda *a, **k: pytest.fail("exported again despite the cache"))
    onnx = run_inference(monkeypatch, [*common, "--backend", "onnxruntime", "--outfile", str(tmp_path / "o.mp4")])
    ref = run_inference(monkeypatch, [*common, "--backend", "torch", "--outfile", str(tmp_path / "t.mp4")])
    assert len(onnx) == len(ref) == 10 and (tmp_path / "o.mp4").is_file()
    diff = max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(onnx, ref, strict=True))
    print(f"onnxruntime vs torch: max {diff} levels per pixel")
    assert diff <= MAX_LEVELS


def test_lipsync_generator_is_onnx(wav2lip_checkpoint, onnx_files):
    model = ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu", backend="onnxruntime",
                         onnx_path=str(onnx_files("wav2lip")))  # fmt: skip
    assert isinstance(lipsync.LipSync(model, quiet=True).generator.predict, onnx_models.OnnxWav2Lip)
    with pytest.raises(UserError, match="--backend tensorrt"):
        ModelOptions(checkpoint_path=wav2lip_checkpoint, device="cpu", backend="tensorrt")


# --- export_onnx.py errors -------------------------------------------------------------------------------


def test_export_errors_are_one_line_and_leave_nothing(repo, tmp_path, s3fd_weights):
    (tmp_path / "a_file").write_text("")
    cases = {
        "wrong model": ["--model", "wav2lip", "--checkpoint_path", str(s3fd_weights), "--out", str(tmp_path / "w.onnx")],
        "unwritable": ["--model", "s3fd", "--checkpoint_path", str(s3fd_weights),
                       "--out", str(tmp_path / "a_file" / "s.onnx")],
    }  # fmt: skip
    runs = {k: subprocess.Popen([sys.executable, "export_onnx.py", *argv], cwd=repo, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for k, argv in cases.items()}  # fmt: skip
    errors = {}
    for name, proc in runs.items():
        errors[name] = proc.communicate(timeout=120)[1].strip()
        assert proc.returncode == 2, (name, errors[name])
        assert len(errors[name].splitlines()) == 1 and "Traceback" not in errors[name], (name, errors[name])
    assert "this is a s3fd checkpoint; --checkpoint_path expects Wav2Lip" in errors["wrong model"]
    assert "cannot write there" in errors["unwritable"] and "--out" in errors["unwritable"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
