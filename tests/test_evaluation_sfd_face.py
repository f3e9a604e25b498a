"""syncnet_python's S3FD (`sfd_face.pth`) on our network: key mapping, trunk options, multi-face detection.

No pretrained file: the weights are deterministic (tools/detweights.py) in syncnet_python's layout, checked
against a replica of its `S3FDNet` (flat `vgg` list, dilated fc6, ceil-mode pool3) and of its `detect_faces`
post-processing, both rebuilt here from their description.
"""

from __future__ import annotations

import functools
import itertools
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from common.errors import UserError
from evaluation import tracking
from face_detection.detection.sfd import sfd_face
from face_detection.detection.sfd.net_s3fd import L2Norm, s3fd
from tools.detweights import DATA, det_value

SCRIPT = "evaluation.scores_LSE.calculate_scores_real_videos"
GAIN = 3.0  # as for Wav2Lip's s3fd goldens

# syncnet_python's S3FDNet: (module, c_in, c_out, kernel) of every conv; `vgg` indices count ReLUs and pools.
VGG = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
       (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]  # fmt: skip
CONVS = [(f"vgg.{i}", a, b, 3) for i, a, b in VGG] + [("vgg.31", 512, 1024, 3), ("vgg.33", 1024, 1024, 1)]
CONVS += [("extras.0", 1024, 256, 1), ("extras.1", 256, 512, 3), ("extras.2", 512, 128, 1), ("extras.3", 128, 256, 3)]
SOURCES = (256, 512, 512, 1024, 512, 256)  # channels of the six maps the heads read
CONVS += [(f"loc.{i}", c, 4, 3) for i, c in enumerate(SOURCES)]
CONVS += [(f"conf.{i}", c, 4 if i == 0 else 2, 3) for i, c in enumerate(SOURCES)]
NORMS = [("L2Norm3_3", 256, 10.0), ("L2Norm4_3", 512, 8.0), ("L2Norm5_3", 512, 5.0)]


def layout() -> list[tuple[str, list[int]]]:
    keys = []
    for name, c_in, c_out, k in CONVS:
        keys += [(f"{name}.weight", [c_out, c_in, k, k]), (f"{name}.bias", [c_out])]
    return keys + [(f"{name}.weight", [c]) for name, c, _ in NORMS]


@functools.cache
def sfd_weights() -> dict[str, torch.Tensor]:
    """Deterministic weights in syncnet_python's layout (do not modify: copy what you change)."""
    return {k: det_value(k, s, GAIN) for k, s in layout()}


def with_face_bias(level: int, bias: float) -> dict[str, torch.Tensor]:
    """The weights with the face logit of one level raised, so that many anchors there pass 0.9."""
    w = dict(sfd_weights())
    b = w[f"conf.{level}.bias"].clone()
    b[-1] += bias
    w[f"conf.{level}.bias"] = b
    return w


class ReferenceS3FDNet(nn.Module):
    """syncnet_python's S3FDNet layout, its keys natively: returns [conf, loc] per level like ours."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for name, c_in, c_out, k in CONVS[:15]:
            index = int(name.split(".")[1])
            while len(layers) < index:  # pools sit where the indices jump; the one after conv3_3 rounds up
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=len(layers) == 16))
            dilation = 6 if name == "vgg.31" else 1
            layers += [nn.Conv2d(c_in, c_out, k, padding=dilation * (k // 2), dilation=dilation), nn.ReLU()]
        self.vgg = nn.ModuleList(layers)
        for name, c, scale in NORMS:
            setattr(self, name, L2Norm(c, scale))
        self.extras = nn.ModuleList(nn.Conv2d(a, b, k, 2 if k == 3 else 1, k // 2) for _, a, b, k in CONVS[15:19])
        self.loc = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for _, a, b, _ in CONVS[19:25])
        self.conf = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for _, a, b, _ in CONVS[25:31])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        sources = []
        for (start, end), norm in zip(
            ((0, 16), (16, 23), (23, 30)), ("L2Norm3_3", "L2Norm4_3", "L2Norm5_3"), strict=True
        ):
            for layer in self.vgg[start:end]:
                x = layer(x)
            sources.append(getattr(self, norm)(x))
        for layer in self.vgg[30:]:
            x = layer(x)
        sources.append(x)
        for k, layer in enumerate(self.extras):
            x = torch.relu(layer(x))
            if k % 2:
                sources.append(x)
        outs = []
        for i, s in enumerate(sources):
            c = self.conf[i](s)
            if i == 0:
                c = torch.cat([c[:, :3].max(dim=1, keepdim=True).values, c[:, 3:]], dim=1)
            outs += [c, self.loc[i](s)]
        return outs


def reference_detect(outs: list[torch.Tensor], hw: tuple[int, int], conf_th: float = 0.9) -> np.ndarray:
    """syncnet_python's Detect + detect_faces for one image, anchor by anchor: candidates above 0.05,
    NMS 0.3 (continuous areas) over the best 5000, at most 750 kept, those above conf_th, nms_ at 0.1."""
    h, w = hw
    mean, loc, conf = [], [], []
    for level in range(6):
        c, r = outs[2 * level][0], outs[2 * level + 1][0]
        step = 4 * 2**level
        for i, j in itertools.product(range(c.shape[1]), range(c.shape[2])):
            mean.append([(j + 0.5) / (w / step), (i + 0.5) / (h / step), 4 * step / w, 4 * step / h])
            loc.append(r[:, i, j])
            conf.append(c[:, i, j])
    priors = torch.tensor(mean, dtype=torch.float32)
    loc, scores = torch.stack(loc), torch.softmax(torch.stack(conf), dim=1)[:, 1]
    centre = priors[:, :2] + loc[:, :2] * 0.1 * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[:, 2:] * 0.2)
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    keep = scores > 0.05
    boxes, scores = boxes[keep].numpy(), scores[keep].numpy()
    order = torch.sort(torch.from_numpy(scores), stable=True).indices[-5000:].flip(0).numpy()
    kept = greedy_nms(boxes, order, 0.3)[:750]
    dets = np.array([(*(boxes[i] * np.float32([w, h, w, h])), scores[i]) for i in kept if scores[i] > conf_th])
    dets = dets.astype(np.float64).reshape(-1, 5)
    return dets[greedy_nms(dets[:, :4], dets[:, 4].argsort()[::-1], 0.1)]


def greedy_nms(boxes: np.ndarray, order: np.ndarray, overlap: float) -> list[int]:
    """One box at a time, best first: drop the later boxes overlapping it by more than `overlap`."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = []
    while len(order):
        i, order = order[0], order[1:]
        kept.append(int(i))
        iw = np.maximum(0, np.minimum(boxes[i, 2], boxes[order, 2]) - np.maximum(boxes[i, 0], boxes[order, 0]))
        ih = np.maximum(0, np.minimum(boxes[i, 3], boxes[order, 3]) - np.maximum(boxes[i, 1], boxes[order, 1]))
        order = order[iw * ih / (area[i] + area[order] - iw * ih) <= overlap]
    return kept


def frames(n: int = 1, h: int = 100, w: int = 72) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


# --- network ------------------------------------------------------------------------------------------


def test_mapping_loads_strictly_into_our_net():
    mapped = sfd_face.from_syncnet_python(sfd_weights())
    assert set(mapped) == set(s3fd().state_dict())  # every key once, nothing left over
    net = sfd_face.build_net(sfd_weights())  # strict load_state_dict
    assert torch.equal(net.fc6.weight, sfd_weights()["vgg.31.weight"]) and net.fc6.dilation == (6, 6)
    assert torch.equal(net.conv3_3_norm.weight, sfd_weights()["L2Norm3_3.weight"])
    assert torch.equal(net.conv3_3_norm_mbox_conf.bias, sfd_weights()["conf.0.bias"])
    assert torch.equal(net.conv6_2.weight, sfd_weights()["extras.1.weight"])


def test_our_net_equals_syncnet_python_layout():
    ref = ReferenceS3FDNet()
    ref.load_state_dict(sfd_weights())  # the replica takes the layout as is: the table above is its layout
    x = frames(1, 100, 72).permute(0, 3, 1, 2).float() - 110
    with torch.no_grad():
        for a, b in zip(sfd_face.build_net(sfd_weights())(x), ref(x), strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def map_sizes(x_hw: tuple[int, int], **options) -> list[tuple[int, int]]:
    """The six head maps' sizes, computed on the meta device (shapes only, no weights)."""
    with torch.device("meta"):
        return [tuple(o.shape[-2:]) for o in s3fd(**options)(torch.zeros(1, 3, *x_hw))[0::2]]


def test_fc6_dilation_and_pool3_ceil_change_the_maps():
    wav2lip, sync = map_sizes((100, 128)), map_sizes((100, 128), **sfd_face.NET_OPTIONS)
    dilated = map_sizes((100, 128), fc6_padding=6, fc6_dilation=6)
    # conv4_3: 100 -> 50 -> 25 -> the pool after conv3_3 gives 12 rows (floor) or 13 (syncnet_python's ceil).
    assert wav2lip[1] == dilated[1] == (12, 16) and sync[1] == (13, 16)
    # fc7 reads conv5_3 pooled (3x4 here): Wav2Lip's undilated fc6 with padding 3 grows it by 4 cells,
    # syncnet_python's padding 6 with dilation 6 keeps it.
    assert wav2lip[3] == (3 + 4, 4 + 4) and dilated[3] == sync[3] == (3, 4)
    assert map_sizes((100, 128), fc6_padding=3, fc6_dilation=3)[3] == (3, 4)  # padding = dilation keeps it too


# --- detection ----------------------------------------------------------------------------------------


def test_several_faces_as_syncnet_python():
    weights = with_face_bias(1, 6.0)  # conv4_3's 117 anchors pass 0.9
    net, ref = sfd_face.build_net(weights), ReferenceS3FDNet()
    ref.load_state_dict(weights)
    batch = frames(2, 100, 72)
    x = batch.permute(0, 3, 1, 2).float() - torch.tensor(sfd_face.PIXEL_MEAN_RGB).view(1, 3, 1, 1)
    faces = sfd_face.detect_faces(net, batch)
    for k, found in enumerate(faces):
        with torch.no_grad():
            expected = reference_detect(ref(x[k : k + 1]), (100, 72))
        assert len(found) > 1 and (found[:, 4] > 0.9).all() and (np.diff(found[:, 4]) <= 0).all()
        assert found.shape == expected.shape
        np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-3)
        # Candidates are per image (Wav2Lip's are batch-wide): alone, a frame gives the same faces.
        np.testing.assert_allclose(sfd_face.detect_faces(net, batch[k : k + 1])[0], found, rtol=1e-5, atol=1e-4)


def test_no_face_below_threshold():
    faces = sfd_face.detect_faces(sfd_face.build_net(with_face_bias(1, -20.0)), frames(2), conf_th=0.999)
    assert [f.shape for f in faces] == [(0, 5), (0, 5)]


# --- wiring and errors --------------------------------------------------------------------------------


def test_load_detector_picks_syncnet_python_s3fd(tmp_path):
    torch.save(with_face_bias(1, 6.0), tmp_path / "sfd_face.pth")
    detector, name = tracking.load_detector(str(tmp_path / "sfd_face.pth"), "cpu")
    assert name.startswith("syncnet_python's S3FD")
    rgb = np.repeat(np.repeat(frames(2).numpy(), 4, axis=1), 4, axis=2)  # 400x288, found at 0.25: 100x72
    faces = tracking.detect_faces(rgb[..., ::-1].copy(), detector, 0.25, start=10)
    small = [cv2.resize(f, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_LINEAR) for f in rgb]
    expected = sfd_face.detect_faces(sfd_face.build_net(with_face_bias(1, 6.0)), torch.from_numpy(np.stack(small)))
    for k in range(2):
        assert len(faces[k]) == len(expected[k]) > 1 and all(f.frame == 10 + k for f in faces[k])
        np.testing.assert_allclose([f.bbox for f in faces[k]], expected[k][:, :4] * 4, rtol=1e-5, atol=1e-3)


def test_wrong_sfd_face_file_is_one_line(tmp_path):
    weights = dict(sfd_weights())
    weights["vgg.31.weight"] = weights["vgg.31.weight"][:, :, :1]
    torch.save(weights, tmp_path / "sfd_face.pth")
    with pytest.raises(UserError, match=r"sfd_face.pth: not syncnet_python's S3FD weights \(size mismatch"):
        tracking.load_detector(str(tmp_path / "sfd_face.pth"))


def test_script_missing_facedet_model_is_one_line(tmp_path, repo):
    missing = tmp_path / "sfd_face.pth"
    r = subprocess.run(
        [sys.executable, "-m", SCRIPT, "--videofile", str(DATA / "lse_video.mp4"), "--facedet_model", str(missing)],
        capture_output=True,
        text=True,
        cwd=repo,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {missing}: file not found") and sfd_face.URL in line and "download_model.sh" in line
