"""The real-video pipeline on synthetic videos: shots, tracks, crop placement, short clips.

A fake detector stands in for S3FD (no face weights here): it reports the drawn box it is told about.
"""

import numpy as np
import pytest

from evaluation import tracking
from tests.media import write_mpeg4

H, W = 240, 320


def moving_box(t: int) -> tuple[int, int, int, int]:
    x1, y1 = 60 + t // 2, 50
    return x1, y1, x1 + 120, y1 + 120


def draw(n: int, scene_cut: int | None = None) -> np.ndarray:
    """A dark face-like box moving right over a light background; after `scene_cut` the colours flip."""
    frames = np.full((n, H, W, 3), 200, np.uint8)
    for t in range(n):
        if scene_cut is not None and t >= scene_cut:
            frames[t] = (40, 120, 220)
        x1, y1, x2, y2 = moving_box(t)
        frames[t, y1:y2, x1:x2] = (60, 60, 160)
    return frames


class FakeDetector:
    """Finds the drawn box in each frame it is given (any scale); records the scales seen."""

    def __init__(self, missing=()):
        self.missing, self.sizes, self.frame = set(missing), [], 0

    def __call__(self, frames):
        out = []
        for f in frames:
            self.sizes.append(f.shape[:2])
            mask = (np.abs(f.astype(int) - (60, 60, 160)).sum(-1) < 40).astype(np.uint8)
            ys, xs = np.nonzero(mask)
            found = self.frame not in self.missing and len(xs) > 0
            out.append([(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)] if found else [])
            self.frame += 1
        return out


def test_track_found_and_crop_centred(tmp_path):
    n = 130
    path = write_mpeg4(tmp_path / "v.mp4", draw(n), audio=np.zeros(n * 640, np.int16))
    det = FakeDetector(missing=range(40, 50))  # ten missed detections are bridged
    tracks, count = tracking.find_tracks(path, det)
    assert count == n and det.sizes[0] == (H // 4, W // 4)  # detection at --facedet_scale 0.25
    (track,) = tracks
    assert track.frames[0] == 0 and track.frames[-1] == n - 1 and len(track.frames) == n
    np.testing.assert_allclose(track.bboxes[45], moving_box(45), atol=6)  # interpolated over the gap
    (clip,) = tracking.crop_tracks(path, tracks, np.zeros(n * 640, np.int16))
    assert clip.crops.shape == (n, 224, 224, 3) and len(clip.audio) == n * 640
    # The box is 120 px: s = 60, the crop spans 2.8 s wide and 2.8 s tall starting s above the centre,
    # so the face fills the middle 120/168 of the width and rows 1/2.8 .. 3/2.8 of the height.
    c = clip.crops[60].astype(int)
    face = np.abs(c - (60, 60, 160)).sum(-1) < 60
    ys, xs = np.nonzero(face)
    assert abs(xs.mean() - 112) < 4
    assert abs(ys.min() - 0) < 4 and abs(ys.max() - 224 * 120 / 168) < 5


def test_scene_cut_splits_tracks(tmp_path):
    n = 240
    path = write_mpeg4(tmp_path / "cut.mp4", draw(n, scene_cut=120), audio=np.zeros(n * 640, np.int16))
    tracks, _ = tracking.find_tracks(path, FakeDetector())
    assert [(t.frames[0], t.frames[-1]) for t in tracks] == [(0, 119), (120, 239)]


def test_too_short_gives_no_track(tmp_path):
    path = write_mpeg4(tmp_path / "short.mp4", draw(60), audio=np.zeros(60 * 640, np.int16))
    assert tracking.score_real_video(None, path, FakeDetector()) == []


def test_small_faces_and_crossing_faces_are_dropped():
    faces = [[tracking.Face(t, (0.0, 0.0, 50.0, 50.0))] for t in range(150)]
    assert tracking.track_shot(faces) == []  # mean size 50 < --min_face_size 100
    jumpy = [[tracking.Face(t, (200.0 * (t % 2), 0.0, 200.0 * (t % 2) + 150, 150.0))] for t in range(150)]
    assert tracking.track_shot(jumpy) == []  # IoU 0 between consecutive boxes: no track grows


def test_content_detector_threshold():
    a = np.zeros((32, 32, 3), np.uint8)
    b = np.full((32, 32, 3), 255, np.uint8)
    det = tracking.ContentDetector()
    for i, f in enumerate([a] * 20 + [b] * 5 + [a] * 20):
        det(i, f)
    assert det.cuts == [20]  # the cut back at 25 comes sooner than 15 frames after the last
    assert tracking.scenes_from_cuts(det.cuts, 45) == [(0, 20), (20, 45)]


def test_crop_outside_frame_is_grey():
    img = np.zeros((100, 100, 3), np.uint8)
    crop = tracking.crop_face(img, s=40, x=5, y=5)
    assert crop.shape == (224, 224, 3) and crop[0, 0].tolist() == [110, 110, 110]


def test_syncnet_python_detector_file_is_refused(tmp_path):
    import torch

    from common.errors import UserError

    torch.save({"vgg.0.weight": torch.zeros(1)}, tmp_path / "sfd_face.pth")
    with pytest.raises(UserError, match="sfd_face.pth: this is syncnet_python's own S3FD"):
        tracking.check_detector_file(str(tmp_path / "sfd_face.pth"))


def test_phone_rotation_is_applied_as_ffmpeg_autorotates(tmp_path):
    """syncnet_python's ffmpeg calls autorotate; a phone clip's faces must come out upright here too."""
    from evaluation import media
    from tests.media import face_frame
    from tests.media import write_video as write_h264

    path = write_h264(tmp_path / "phone.mp4", 3, rotation=90)
    upright = np.rot90(face_frame(0))
    for frame in (media.read_frames(path, size=None)[0], next(tracking.retimed_frames(path))):
        assert frame.shape == upright.shape and np.abs(frame.astype(int) - upright).mean() < 4.0
