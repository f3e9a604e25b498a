"""face_detection against the original Wav2Lip's S3FD: network, pipeline, NMS, loading errors, max_side.

The goldens (tests/data/golden/s3fd.json) were computed by the original code with deterministic weights,
so no pretrained file is needed here.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import face_detection
from common.errors import UserError
from face_detection.api import to_box
from face_detection.detection.sfd import bbox, default_weights_path, load_net, sfd_detector
from face_detection.detection.sfd.detect import batch_detect
from face_detection.detection.sfd.net_s3fd import HEADS, s3fd
from tools.detweights import DATA, assert_stats, det_state_dict, formula_input, load_golden, load_spec

GOLDEN = load_golden("s3fd")
PIPELINE = GOLDEN["pipeline"]
BOX_ATOL = 1e-2  # float boxes: the goldens' suggested tolerance (round-off of a different CPU / thread count)


def save_weights(path, state_dict) -> str:
    torch.save(state_dict, path)
    return str(path)


@functools.cache
def det_weights() -> dict[str, torch.Tensor]:
    """The deterministic s3fd weights, generated once (do not modify: copy what you change)."""
    return det_state_dict("s3fd")


def shifted_face_bias(delta: float) -> dict[str, torch.Tensor]:
    """Deterministic weights with every face logit lowered by `delta`: a detector that sees less."""
    sd = dict(det_weights())
    for name, _, _ in HEADS:
        key = f"{name}_mbox_conf.bias"
        sd[key] = sd[key].clone()
        sd[key][-1] -= delta
    return sd


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return cv2.imread(str(DATA / "face_320x448.png"))


@pytest.fixture(scope="module")
def batch(image) -> np.ndarray:
    return np.stack([image, image[:, ::-1]])


@pytest.fixture(scope="module")
def golden_run(s3fd_weights, batch) -> tuple[list, torch.Tensor]:
    """The golden call, once: its results and the candidates [2, N, 5] it worked from."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(batch_detect(*args, **kwargs))
        return seen[-1]

    fa = face_detection.FaceAlignment(
        face_detection.LandmarksType._2D, flip_input=False, device="cpu", path_to_detector=s3fd_weights
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sfd_detector, "batch_detect", spy)
        results = fa.get_detections_for_batch(batch)
    return results, seen[0]


# --- network -------------------------------------------------------------------------------------------


def test_state_dict_matches_spec():
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in s3fd().state_dict().items()]
    assert got == [(k, shape, dtype) for k, shape, dtype in load_spec("s3fd")]


@pytest.fixture(scope="module")
def raw_outputs() -> list[torch.Tensor]:
    net = s3fd().eval()
    net.load_state_dict(det_weights())
    with torch.no_grad():
        return net(formula_input(GOLDEN["raw_forward"]["inputs"]["x"]))


@pytest.mark.parametrize("i, name", list(enumerate(GOLDEN["raw_forward"]["outputs"])))
def test_raw_forward_matches_golden(raw_outputs, i, name, record_property):
    worst = assert_stats(raw_outputs[i], GOLDEN["raw_forward"]["outputs"][name], rtol=1e-4, atol=1e-5)
    record_property(f"max_dev_{name}", worst)


# --- pipeline ------------------------------------------------------------------------------------------


def test_pipeline_gives_golden_boxes(golden_run):
    assert golden_run[0] == [tuple(r) for r in PIPELINE["results"]]
    assert all(type(box) is face_detection.Box for box in golden_run[0])


def test_box_is_x1_y1_x2_y2():
    """S3FD's order enters as it is (clipped at 0 from below only, truncated); the original's flags are t, b, l, r."""
    box = to_box(np.array([-3.5, 10.9, 200.2, 300.7, 0.99], np.float32))
    assert box == (0, 10, 200, 300) and (box.x1, box.y1, box.x2, box.y2) == (0, 10, 200, 300)
    assert (box.width, box.height) == (200, 290)
    assert face_detection.Box.from_tblr([10, 300, 0, 200]) == box
    assert to_box(None) is None


@pytest.mark.parametrize("b", [0, 1])
def test_pipeline_intermediates(golden_run, b):
    want = PIPELINE["per_image_intermediates"][b]
    d = golden_run[1][b]
    assert len(d) == want["n_candidates"]
    np.testing.assert_allclose(float(d[:, 4].max()), want["candidate_score_stats"]["max"], rtol=1e-5)
    np.testing.assert_allclose(float(d[:, 4].double().mean()), want["candidate_score_stats"]["mean"], rtol=1e-5)
    kept = d[bbox.nms(d, 0.3)]
    assert len(kept) == want["n_after_nms"]
    assert int((kept[:, 4] > 0.5).sum()) == want["n_after_score_0_5"]
    np.testing.assert_allclose(kept[:5].numpy(), want["top5_after_nms"], atol=BOX_ATOL, rtol=0)
    # The shortcut get_detections_for_batch takes (top box, no NMS) agrees with the full path.
    assert to_box(kept[kept[:, 4] > 0.5][0].numpy()) == tuple(PIPELINE["results"][b])


def reference_candidates(outputs: list[torch.Tensor]) -> torch.Tensor:
    """The original's batch_detect loop, one anchor at a time: [B, N, 5]."""
    rows = []
    for level in range(len(outputs) // 2):
        face = torch.softmax(outputs[2 * level], dim=1)[:, 1]
        reg = outputs[2 * level + 1]
        stride = 4 * 2**level
        for _, y, x in zip(*np.where(face.numpy() > 0.05), strict=True):
            centre_x, centre_y, side = stride / 2 + x * stride, stride / 2 + y * stride, 4.0 * stride
            prior = torch.tensor([[centre_x, centre_y, side, side]], dtype=torch.float32)
            loc = reg[:, :, y, x]
            centre = prior[:, :2] + loc[:, :2] * 0.1 * prior[:, 2:]
            size = prior[:, 2:] * torch.exp(loc[:, 2:] * 0.2)
            top_left = centre - size / 2
            rows.append(torch.cat([top_left, size + top_left, face[:, y, x, None]], dim=1))
    return torch.stack(rows, dim=1)


def test_vectorised_candidates_equal_the_per_anchor_loop(s3fd_weights, image):
    """Candidates where ANY frame passes 0.05, duplicates and order included, on two unlike frames."""
    frames = torch.from_numpy(np.stack([image[300:396, 200:264], np.zeros((96, 64, 3), np.uint8)])).flip(-1)
    net = load_net(s3fd_weights)
    got = batch_detect(net, frames)
    with torch.no_grad():
        outputs = net(frames.permute(0, 3, 1, 2).float() - torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1))
    want = reference_candidates(outputs)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # bit-identical


def test_network_passes_stay_within_the_budget_with_the_whole_batchs_candidates(s3fd_weights, batch, golden_run):
    """A batch too big for one pass runs a frame at a time; the candidates are still the whole batch's
    (the golden call's), and a pass never holds more frames than `frames_per_pass` allows."""
    from face_detection.detection.sfd import detect

    net, seen = load_net(s3fd_weights), []

    def counting(x: torch.Tensor) -> list[torch.Tensor]:
        seen.append(len(x))
        return net(x)

    frames = torch.from_numpy(batch).flip(-1)
    h, w = frames.shape[1:3]
    assert detect.frames_per_pass((h, w)) >= len(frames)  # the golden call was one pass
    one_frame = detect.PASS_BYTES_PER_PIXEL * h * w
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(detect, "PASS_BUDGET", one_frame)  # room for one frame a pass
        got = batch_detect(counting, frames)
    assert seen == [1, 1]
    torch.testing.assert_close(got, golden_run[1], rtol=1e-5, atol=1e-5)  # the same candidates, to round-off
    assert detect.frames_per_pass((1080, 1920)) == 1  # 1080p: 16 frames in one pass needed 24 GB
    assert detect.frames_per_pass((1, 1), budget=0) == 1


def test_tensor_input_and_batch_of_one(s3fd_weights, image):
    fa = face_detection.FaceAlignment(device="cpu", path_to_detector=s3fd_weights)
    # The top box does not depend on the other frames of the batch once it scores above 0.05.
    assert fa.get_detections_for_batch(torch.from_numpy(image[:, ::-1].copy())[None]) == [tuple(PIPELINE["results"][1])]


def test_max_side_maps_boxes_back(s3fd_weights, image):
    """A 2x (pixel-repeated) frame shrunk back to 448 px sees the original pixels; boxes come back doubled."""
    big = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)
    fa = face_detection.FaceAlignment(device="cpu", path_to_detector=s3fd_weights, max_side=448)
    (got,) = fa.get_detections_for_batch(big[None])
    want = tuple(int(2 * v) for v in PIPELINE["per_image_intermediates"][0]["top5_after_nms"][0][:4])
    assert got == want


@pytest.mark.parametrize("delta", [2.0, 40.0], ids=["weak-scores", "no-candidates"])
def test_no_face_gives_none(tmp_path, delta):
    """Scores all under 0.5 (candidates exist) and none above 0.05 (no candidates) both mean no face."""
    path = save_weights(tmp_path / "s3fd.pth", shifted_face_bias(delta))
    fa = face_detection.FaceAlignment(device="cpu", path_to_detector=path)
    assert fa.get_detections_for_batch([np.zeros((64, 64, 3), np.uint8)] * 2) == [None, None]  # a list too
    assert [len(d) for d in fa.face_detector.detect_from_batch(torch.zeros(2, 64, 64, 3, dtype=torch.uint8))] == [0, 0]


# --- NMS -----------------------------------------------------------------------------------------------


def reference_nms(dets: np.ndarray, thresh: float) -> list[int]:
    """Greedy NMS one box at a time, as the original: best first, drop overlaps > thresh (+1 px areas)."""
    x1, y1, x2, y2, scores = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = list(scores.argsort()[::-1])
    keep = []
    while order:
        i, rest = order[0], np.array(order[1:], dtype=np.int64)
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        overlap = w * h / (areas[i] + areas[rest] - w * h)
        order = [j for j, o in zip(rest, overlap, strict=True) if o <= thresh]
    return keep


def random_dets(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 200, (n, 2))
    wh = rng.uniform(5, 60, (n, 2))
    scores = rng.integers(0, 20, n) / 20  # coarse scores: many ties
    dets = np.concatenate([xy, xy + wh, scores[:, None]], axis=1).astype(np.float32)
    dets[n // 2 :: 7] = dets[n // 3 : n // 3 + len(dets[n // 2 :: 7])]  # exact duplicate boxes too
    return dets


@pytest.mark.parametrize("tile", [7, 256])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thresh", [0.3, 0.5])
def test_nms_equals_reference(monkeypatch, tile, seed, thresh):
    monkeypatch.setattr(bbox, "NMS_TILE", tile)
    dets = random_dets(np.random.default_rng(seed), 700)
    assert bbox.nms(torch.from_numpy(dets), thresh).tolist() == reference_nms(dets, thresh)


def test_nms_of_nothing():
    assert bbox.nms(torch.zeros(0, 5), 0.3).tolist() == []


# --- loading -------------------------------------------------------------------------------------------


def test_default_weights_path_is_in_the_package(repo, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not the working directory's
    assert default_weights_path() == repo / "face_detection" / "detection" / "sfd" / "s3fd.pth"


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "s3fd.pth"
    with pytest.raises(UserError) as e:
        face_detection.FaceAlignment(device="cpu", path_to_detector=path)
    message = str(e.value)
    assert str(path) in message and "face_detection/detection/sfd/" in message and "s3fd.pth" in message
    assert "path_to_detector" in message and "README" in message and "\n" not in message


def bad_file(tmp_path: Path, s3fd_weights: Path, kind: str) -> str:
    """A file that is not usable S3FD weights, of the given kind."""
    path = tmp_path / "s3fd.pth"
    if kind in ("truncated", "garbage", "empty"):
        data = s3fd_weights.read_bytes()
        path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint", "empty": b""}[kind])
        return str(path)
    sd = dict(det_weights())
    if kind == "other-model":
        sd = det_state_dict("SyncNet_color")
    elif kind == "missing-key":
        sd.pop("fc7.bias")
    elif kind == "extra-key":
        sd["fc8.weight"] = torch.zeros(3)
    elif kind == "wrong-shape":
        sd["fc6.weight"] = torch.zeros(1024, 512, 1, 1)
    elif kind == "not-a-dict":
        sd = [torch.zeros(3)]
    return save_weights(path, sd)


@pytest.mark.parametrize(
    "kind", ["truncated", "garbage", "empty", "other-model", "missing-key", "extra-key", "wrong-shape", "not-a-dict"]
)
def test_bad_file_is_a_user_error(tmp_path, s3fd_weights, kind):
    path = bad_file(tmp_path, s3fd_weights, kind)
    with pytest.raises(UserError, match="s3fd|S3FD") as e:
        load_net(path)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_half_precision_file_loads_as_float32(tmp_path):
    path = save_weights(tmp_path / "s3fd.pth", {k: v.half() for k, v in det_weights().items()})
    assert {p.dtype for p in load_net(path).parameters()} == {torch.float32}


def test_detector_is_built_once_per_file_and_device(tmp_path, s3fd_weights):
    a = face_detection.FaceAlignment(device="cpu", path_to_detector=s3fd_weights)
    b = face_detection.FaceAlignment(device=torch.device("cpu"), path_to_detector=s3fd_weights)
    assert a.face_detector.face_detector is b.face_detector.face_detector
    other = save_weights(tmp_path / "s3fd.pth", shifted_face_bias(1.0))
    assert load_net(other) is not a.face_detector.face_detector


def test_cuda_without_cuda_is_a_user_error(s3fd_weights, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, even on a GPU one
    with pytest.raises(UserError, match="CUDA"):
        face_detection.FaceAlignment(device="cuda", path_to_detector=s3fd_weights)


def test_bad_arguments_are_user_errors(s3fd_weights):
    with pytest.raises(UserError, match="face_detector"):
        face_detection.FaceAlignment(device="cpu", face_detector="dlib", path_to_detector=s3fd_weights)
    with pytest.raises(UserError, match="max_side"):
        face_detection.FaceAlignment(device="cpu", path_to_detector=s3fd_weights, max_side=0)
