"""The mel spectrogram must be the original's (librosa 0.7) to float32 round-off, from any container."""

import subprocess
import sys

import av
import numpy as np
import pytest

import audio
from common.errors import UserError
from tools.detweights import DATA, assert_stats, load_golden

GOLDEN = load_golden("audio")
FILES = {
    "speech_16k": "speech_16k.wav",
    "formula_2s_16k": "formula_2s_16k.wav",
    "speech_44k_stereo": "speech_44k_stereo.wav",
}


def formula_signal() -> np.ndarray:
    t = np.arange(32000, dtype=np.float64) / 16000
    return (
        0.3 * np.sin(2 * np.pi * 220 * t)
        + 0.2 * np.sin(2 * np.pi * 1250 * t + 0.5)
        + 0.1 * np.sin(2 * np.pi * (100 * t + 1475 * t**2))
    )


def check_mel(mel: np.ndarray, want: dict, atol: float = 1e-5) -> float:
    assert mel.dtype == np.float32
    dev = assert_stats(mel, want, rtol=0, atol=atol)
    for j, col in enumerate(want["cols_0_3"]):
        np.testing.assert_allclose(mel[:, j], col, atol=atol, err_msg=f"column {j}")
    for row in (0, 40, 79):
        np.testing.assert_allclose(mel[row, 100:110], want[f"row{row}_cols_100_110"], atol=atol)
    np.testing.assert_allclose(mel[:, -1], want["last_col"], atol=atol)
    return dev


@pytest.mark.parametrize("name", ["speech_16k", "formula_2s_16k"])
def test_mel_golden_16k_files(name):
    g = GOLDEN["inputs"][name]
    wav = audio.load_wav(DATA / FILES[name], 16000)
    assert_stats(wav, g["wav"], rtol=0, atol=0)  # decoding at the native rate is exact
    dev = check_mel(audio.melspectrogram(wav), g["mel"])
    print(f"{name}: mel max |dev| {dev:.2e}")


def test_mel_golden_direct_signal():
    mel = audio.melspectrogram(formula_signal().astype(np.float32))
    check_mel(mel, GOLDEN["inputs"]["formula_direct"]["mel"])


def test_stereo_44k_is_mixed_and_resampled_with_soxr_hq():
    g = GOLDEN["inputs"]["speech_44k_stereo"]
    wav = audio.load_wav(DATA / FILES["speech_44k_stereo"], 16000)
    assert_stats(wav, g["wav"], rtol=0, atol=1e-6)
    check_mel(audio.melspectrogram(wav), g["mel"], atol=2e-5)


def test_reflect_padding_is_what_makes_the_edges_right():
    """Guard the pad-mode trap: zero padding (librosa >= 0.10's default) would move column 0 by 0.34."""
    g = GOLDEN["pad_mode_trap"]["speech_16k"]
    mel = audio.melspectrogram(audio.load_wav(DATA / "speech_16k.wav", 16000))
    assert np.abs(mel[:, 0] - np.asarray(g["col0_constant"])).max() > 0.1


def test_mel_basis_is_slaney_and_float32():
    basis = audio.mel_basis(16000, 800, 80, 55, 7600)
    assert basis.dtype == np.float32
    assert_stats(basis, GOLDEN["mel_basis"]["stats"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["speech_16k", "formula_2s_16k", "speech_44k_stereo"])
def test_mel_chunk_starts(name):
    g = GOLDEN["inputs"][name]
    starts = audio.mel_chunk_starts(g["mel"]["shape"][1], 25)
    want = g["mel_chunks_fps25"]
    assert len(starts) == want["count"]
    assert starts[: len(want["first_starts"])] == want["first_starts"]
    assert starts[-1] == want["last_start"]


FRAME_SIZES = {"mp3": 1152, "aac": 1024, "flac": 1024}


def encode(path, codec: str, rate: int, wav: np.ndarray, container_format: str | None = None) -> None:
    """Mono float audio → a file, fed in the codec's frame size (AAC garbles larger frames)."""
    size = FRAME_SIZES[codec]
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        fmt = stream.codec_context.codec.audio_formats[0].name
        resampler = av.AudioResampler(format=fmt, layout="mono", rate=rate)
        for i in range(0, len(wav), size):
            frame = av.AudioFrame.from_ndarray(wav[None, i : i + size].astype(np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, i
            for f in resampler.resample(frame):
                out.mux(stream.encode(f))
        out.mux(stream.encode(None))


@pytest.mark.parametrize(
    ("codec", "fmt", "name"), [("mp3", "mp3", "speech.wav"), ("aac", "mp4", "voice.m4a"), ("flac", "flac", "v.flac")]
)
def test_any_container_judged_by_content(tmp_path, codec, fmt, name):
    """An MP3 named .wav still loads: the container is probed, the extension ignored."""
    ref = audio.load_wav(DATA / "speech_16k.wav", 16000)
    path = tmp_path / name
    rate = 44100 if codec == "aac" else 16000
    encode(path, codec, rate, audio.resample(ref, 16000, rate), fmt)
    wav = audio.load_wav(path, 16000)
    assert abs(len(wav) - len(ref)) < 0.1 * len(ref)
    n = min(len(wav), len(ref))
    # lossy codecs colour the signal and may delay it a little; the waveform must still line up
    best = max(np.dot(wav[k:n], ref[: n - k]) for k in range(0, 1200, 4))
    assert best / np.dot(ref[:n], ref[:n]) > 0.9


def test_bad_audio_inputs(tmp_path):
    with pytest.raises(UserError, match="not found"):
        audio.load_wav(tmp_path / "missing.wav", 16000)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not media at all" * 10)
    with pytest.raises(UserError, match="junk.wav"):
        audio.load_wav(junk, 16000)
    with pytest.raises(UserError, match="too short"):
        audio.mel_chunk_starts(10, 25)


def test_zero_length_audio(tmp_path):
    from scipy.io import wavfile

    empty = tmp_path / "empty.wav"
    wavfile.write(empty, 16000, np.zeros(0, dtype=np.int16))
    with pytest.raises(UserError, match="empty"):
        audio.load_wav(empty, 16000)


def test_audio_module_imports_without_side_effects(repo):
    code = (
        "import sys, audio, hparams; print(sorted(m for m in ('librosa', 'numba', 'scipy.signal') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert out.returncode == 0 and out.stdout == "[]\n"  # the slow imports stay out of every run


@pytest.mark.parametrize("n", [801, 5000, 48037])
def test_numpy_steps_are_librosa_and_scipy_bit_for_bit(n):
    """preemphasis, STFT, filterbank and resampling in NumPy/soxr equal what librosa 0.11 and scipy compute."""
    import librosa  # a dev requirement, never imported by the project itself
    from scipy import signal

    wav = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.3
    y = audio.preemphasis(wav, 0.97)
    assert np.array_equal(y, signal.lfilter([1, -0.97], [1], wav))
    want = librosa.stft(y=y, n_fft=800, hop_length=200, win_length=800, pad_mode="reflect", dtype=np.complex64)
    assert np.array_equal(audio.stft(y, 800, 200, 800), want)
    want = librosa.stft(y=y, n_fft=800, hop_length=200, win_length=600, pad_mode="reflect", dtype=np.complex64)
    assert np.array_equal(audio.stft(y, 800, 200, 600), want)
    want = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    assert np.array_equal(audio.mel_basis(16000, 800, 80, 55, 7600), want)
    for rate in (8000, 22050, 44100):
        want = librosa.resample(wav, orig_sr=rate, target_sr=16000, res_type="soxr_hq")
        assert np.array_equal(audio.resample(wav, rate, 16000), want)
