"""LSE-D / LSE-C against the golden run of Wav2Lip's SyncNetInstance_calc_scores.evaluate, and bad input."""

import json
import subprocess
import sys
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
import torch

from common.errors import UserError
from evaluation import lse, media
from evaluation.syncnet import S, copy_parameters
from tests.media import write_mpeg4
from tools.detweights import DATA, assert_stats, det_state_dict, load_golden

VIDEO = DATA / "lse_video.mp4"
GOLDEN = load_golden("lse")
LRS_SCRIPT = "evaluation.scores_LSE.calculate_scores_LRS"


@pytest.fixture(scope="module")
def model():
    m = S()
    copy_parameters(m, det_state_dict("syncnet_python_S"))
    return m.eval()


@pytest.fixture(scope="module")
def audio():
    return media.read_audio(VIDEO)


def check_result(r: lse.LSEResult, g: dict, rtol: float) -> tuple[float, float]:
    assert r.offset == g["offset"]
    np.testing.assert_allclose(r.lse_d, g["LSE_D_min_dist"], rtol=rtol)
    np.testing.assert_allclose(r.lse_c, g["LSE_C_confidence"], rtol=rtol)
    np.testing.assert_allclose(r.mean_dists, g["mean_dist_per_shift"], rtol=rtol)
    return abs(r.lse_d / g["LSE_D_min_dist"] - 1), abs(r.lse_c / g["LSE_C_confidence"] - 1)


def test_audio_and_mfcc(audio):
    g = GOLDEN["result"]
    assert audio.dtype == np.int16 and len(audio) == g["n_audio_samples"]
    from scipy.io import wavfile

    np.testing.assert_array_equal(audio, wavfile.read(DATA / "speech_16k.wav")[1])
    assert_stats(lse.mfcc(audio).T, g["mfcc"], rtol=1e-9, atol=1e-9)
    assert lse.num_windows(g["n_video_frames"], len(audio)) == g["n_windows"]


def test_lossless_mode_matches_png_golden(model, audio):
    g = GOLDEN["result_lossless_frames"]
    frames = media.read_frames(VIDEO, lossless=True)
    assert frames.mean() == pytest.approx(g["frames_bgr"]["mean"], abs=1e-9)
    assert frames[0, 0, 0].tolist() == g["frames_bgr"]["frame0_pixel_00_bgr"]
    im, cc = lse.sync_features(model, frames, lse.mfcc(audio), g["n_windows"])
    assert_stats(cc, g["cc_feat"], rtol=1e-4, atol=1e-3)
    assert_stats(im, g["im_feat"], rtol=1e-4, atol=1e-3)
    dev = check_result(lse.score_features(im, cc), g, rtol=1e-4)
    print(f"lossless: relative deviation LSE-D {dev[0]:.2g}, LSE-C {dev[1]:.2g}")


def test_jpeg_mode_matches_golden(model):
    """The JPEG round trip: frames match the golden's first eight exactly; FFmpeg 8's mjpeg rate control
    picks qscale 12 instead of 5.1's 13 for one frame (32) of 101, which moves LSE-C by 7e-4."""
    g = GOLDEN["result"]
    frames = media.read_frames(VIDEO)
    per_frame = frames.reshape(len(frames), -1).mean(1)[:8]
    np.testing.assert_allclose(per_frame, g["frames_bgr"]["per_frame_mean_first8"], rtol=0, atol=1e-9)
    assert frames[0, 0, 0].tolist() == g["frames_bgr"]["frame0_pixel_00_bgr"]
    r = lse.evaluate_video(model, VIDEO)
    np.testing.assert_allclose(r.lse_d, g["LSE_D_min_dist"], rtol=1e-4)
    dev = check_result(r, g, rtol=1e-3)
    print(f"jpeg: relative deviation LSE-D {dev[0]:.2g}, LSE-C {dev[1]:.2g}")


def test_jpeg_mode_with_ffmpeg51_qscale_is_exact(model, audio):
    """Pin the one rate-control decision that differs (frame 32 at qscale 13, as FFmpeg 5.1 chose):
    every decoded pixel statistic and both scores then match the golden within 1e-4."""
    g = GOLDEN["result"]
    frames = media.read_frames(VIDEO)
    with av.open(str(VIDEO)) as c:
        frame32 = media.to_full_range(list(c.decode(video=0))[32])
    enc = av.CodecContext.create("mjpeg", "w")
    enc.width, enc.height, enc.pix_fmt, enc.time_base = 224, 224, "yuvj420p", Fraction(1, 25)
    enc.options = {"qmin": "13", "qmax": "13"}
    frame32.pts = 0
    frames[32] = cv2.imdecode(np.frombuffer(bytes(enc.encode(frame32)[0]), np.uint8), cv2.IMREAD_COLOR)
    assert frames.mean() == pytest.approx(g["frames_bgr"]["mean"], abs=1e-9)
    np.testing.assert_allclose(frames.reshape(-1, 3).mean(0), g["frames_bgr"]["per_channel_mean_bgr"], atol=1e-9)
    im, cc = lse.sync_features(model, frames, lse.mfcc(audio), g["n_windows"])
    assert_stats(im, g["im_feat"], rtol=1e-4, atol=1e-3)
    dev = check_result(lse.score_features(im, cc), g, rtol=1e-4)
    print(f"jpeg, qscale pinned: relative deviation LSE-D {dev[0]:.2g}, LSE-C {dev[1]:.2g}")


def test_score_features_by_hand():
    """Shifted copies: audio embeddings 2 windows behind give offset -2; only the 2 windows facing the zero
    padding add distance."""
    torch.manual_seed(0)
    feats = torch.randn(40, 8)
    r = lse.score_features(feats[2:32], feats[:30], vshift=5)
    assert r.offset == -2 and r.lse_d < 0.25 and len(r.mean_dists) == 11
    assert r.lse_c == pytest.approx(float(torch.tensor(r.mean_dists).median()) - r.lse_d)


# ---------------------------------------------------------------- bad input


def test_video_without_audio(tmp_path, model):
    path = write_mpeg4(tmp_path / "silent.mp4", np.zeros((10, 64, 64, 3), np.uint8))
    with pytest.raises(UserError, match="silent.mp4: no audio stream"):
        lse.evaluate_video(model, path)


def test_video_shorter_than_six_frames(tmp_path, model):
    path = write_mpeg4(tmp_path / "short.mp4", np.zeros((5, 64, 64, 3), np.uint8), audio=np.zeros(16000, np.int16))
    with pytest.raises(UserError, match="short.mp4: too short for LSE.*at least 6 frames"):
        lse.evaluate_video(model, path)


def test_folder_without_videos(tmp_path):
    with pytest.raises(UserError, match="no .mp4 videos"):
        lse.list_videos(tmp_path)


def run_script(repo, *args):
    """The LRS script as documented: a module run from the repository root."""
    return subprocess.run([sys.executable, "-m", LRS_SCRIPT, *map(str, args)], capture_output=True, text=True, cwd=repo)


def test_script_errors_are_one_line(tmp_path, repo):
    r = run_script(repo, "--data_root", tmp_path, "--initial_model", tmp_path / "syncnet_v2.model")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {tmp_path}: no .mp4 videos in it; pass the folder holding the generated videos"
    ]
    (tmp_path / "a.mp4").write_bytes(VIDEO.read_bytes())
    r = run_script(repo, "--data_root", tmp_path, "--initial_model", tmp_path / "syncnet_v2.model")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "download_model.sh" in r.stderr
    # a result file that could not be written is refused before any scoring, not after it
    r = run_script(repo, "--data_root", tmp_path, "--out", tmp_path / "scores.txt")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'scores.txt'}: unknown result format; name the file *.json or *.csv"
    ]


def test_script_writes_results(tmp_path, repo):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(VIDEO.read_bytes())
    torch.save(det_state_dict("syncnet_python_S"), tmp_path / "s.model")
    out = tmp_path / "results.json"
    r = run_script(
        repo, "--data_root", tmp_path / "videos", "--initial_model", tmp_path / "s.model", "--lossless", "--out", out
    )
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())["a.mp4"]
    g = GOLDEN["result_lossless_frames"]
    assert row["offset"] == g["offset"] and row["lse_d"] == pytest.approx(g["LSE_D_min_dist"], rel=1e-4)
    assert f"Average Confidence: {row['lse_c']}" in r.stdout
    assert f"Average Minimum Distance: {row['lse_d']}" in r.stdout


def test_results_as_csv_and_json(tmp_path):
    rows = {"a.mp4": {"offset": 1, "lse_d": 7.5, "lse_c": 2.0}, "b.mp4": {"offset": None, "note": "no track"}}
    lse.write_results(rows, tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines == ["name,offset,lse_d,lse_c,note", "a.mp4,1,7.5,2.0,", "b.mp4,,,,no track"]
    lse.write_results(rows, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json"]  # no temporary file left
