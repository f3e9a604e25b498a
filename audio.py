"""Speech in: any file FFmpeg reads → mono float32 → the 80-band mel spectrogram Wav2Lip was trained on.

The spectrogram reproduces the original (librosa 0.7) to float32 round-off on today's libraries. Three
facts keep it so: the STFT pads with `reflect` (librosa ≥ 0.10 pads with zeros and changes the first and
last two columns), it is stored as complex64, and the dB conversion runs in float32 (numpy 2 would promote
it to float64). The mel filterbank is Slaney-normalised, as it always was.

The STFT and the filterbank are librosa's computations written in NumPy (the tests hold them to librosa
bit for bit): importing librosa and scipy.signal and JIT-compiling librosa's numba helpers cost about 3 s
per run, longer than the mel of a minute of speech.

One known difference: input that is not already at 16 kHz is resampled with today's resampler (soxr_hq),
not resampy's `kaiser_best` of librosa 0.7; the mel then differs by ~0.005 on average (max 0.6).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import av
import numpy as np
import soxr

from common import media_urls, video
from common.errors import UserError
from common.time_ranges import AUDIO_SLACK_S, TimeRange, audio_planes
from hparams import HParams, hparams

ABSURD_PEAK = 1000.0  # 60 dB above full scale: no recording holds such a sample, only damaged data
MEL_STEP_SIZE = 16  # mel columns per generator/expert window: 16 × 12.5 ms = 0.2 s = 5 frames at 25 fps
MEL_COLUMNS_PER_SECOND = 80  # sample_rate / hop_size = 16000 / 200
SLANEY_HZ_PER_MEL = 200.0 / 3  # the linear part of Slaney's mel scale
SLANEY_LOG_HZ = 1000.0  # where it turns logarithmic
SLANEY_LOGSTEP = np.log(6.4) / 27.0
SILENCE_FLOOR_DB = -200.0  # the level of digital silence, instead of -inf


def decode_audio(path: str | os.PathLike, span: TimeRange | None = None) -> tuple[np.ndarray, int]:
    """The first audio stream of any container or URL (judged by content): (channels × samples float32, its
    rate); only the samples in `span` (`time_ranges.audio_planes`: seeking, not decoding from the start)."""
    path, span = os.fspath(path), span or TimeRange()
    if not media_urls.is_url(path) and not os.path.isfile(path):
        raise UserError(f"{path}: audio file not found")
    try:
        with media_urls.open_input(path, "audio") as container:
            if not container.streams.audio:
                raise UserError(f"{path}: has no audio stream")
            stream = container.streams.audio[0]
            native_rate = stream.codec_context.sample_rate or stream.rate
            duration = _duration(container, stream)
            span.check(path, duration, native_rate, AUDIO_SLACK_S)
            planes = list(audio_planes(container, stream, span, native_rate))
    except UserError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as e:
        if media_urls.is_url(path):
            raise media_urls.url_error(path, e) from None
        raise UserError(f"{path}: cannot be decoded as audio ({e})") from None
    if not planes or sum(p.shape[1] for p in planes) == 0:
        if span.is_set:
            raise span.empty_error(path, duration, "samples")
        raise UserError(f"{path}: the audio stream is empty (zero samples)")
    return np.concatenate(planes, axis=1).astype(np.float32, copy=False), native_rate


def media_duration(path: str | os.PathLike) -> float | None:
    """The duration in seconds of the first audio stream of a file or URL, as its container states it."""
    try:
        with media_urls.open_input(path, "audio") as container:
            if not container.streams.audio:
                raise UserError(f"{path}: has no audio stream")
            return _duration(container, container.streams.audio[0])
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise UserError(f"{path}: cannot be decoded as audio ({e})") from None


def _duration(container: av.container.InputContainer, stream: av.audio.stream.AudioStream) -> float | None:
    """The stream's duration in seconds as the container states it (None when it states none)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration else None


def to_mono(planes: np.ndarray, native_rate: int, sr: int) -> np.ndarray:
    """Channels averaged and resampled to `sr`: samples scaled as libsndfile does (int16 / 32768), as
    librosa.load did."""
    wav = planes.mean(axis=0)
    if native_rate != sr:
        wav = resample(wav, native_rate, sr)
    return np.ascontiguousarray(wav, dtype=np.float32)


def load_wav(path: str | os.PathLike, sr: int) -> np.ndarray:
    """Decode any audio (or video) file to mono float32 at `sr`."""
    return to_mono(*decode_audio(path), sr)


def speech_gain(planes: np.ndarray, rate: int, path: str | os.PathLike) -> float:
    """The gain that brings the samples within full scale: 1 for ordinary audio.

    A sample that is not a number, or absurdly loud, would turn the mel into NaN or make the AAC encoder
    refuse the audio after the whole video was generated; say so now, naming its time. Audio merely above
    full scale (a float WAV peaking at 1.3) is normalised, with a warning, as FFmpeg's users expect.
    """
    finite = np.isfinite(planes)
    if not finite.all():
        index = int(np.argmin(finite.all(axis=0)))
        raise UserError(f"{path}: sample {index} ({index / rate:.3f} s) is not a number (NaN or infinite); "
                        "the audio is damaged: export it again")  # fmt: skip
    peak = float(np.abs(planes).max())
    if peak > ABSURD_PEAK:
        index = int(np.argmax(np.abs(planes).max(axis=0) > ABSURD_PEAK))
        raise UserError(f"{path}: sample {index} ({index / rate:.3f} s) is {peak:.3g}, far beyond full scale (1.0); "
                        "the audio is damaged: export it again")  # fmt: skip
    if peak <= 1.0:
        return 1.0
    print(f"warning: {path}: peaks at {peak:.2f}, above full scale; normalised by {-20 * np.log10(peak):.1f} dB",
          file=sys.stderr)  # fmt: skip
    return 1.0 / peak


def resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """soxr's HQ resampler, cut or zero-padded to ceil(n · ratio) samples: librosa.resample's soxr_hq."""
    n_out = int(np.ceil(len(wav) * float(target_sr) / orig_sr))
    out = soxr.resample(wav, orig_sr, target_sr, quality="soxr_hq")[:n_out]
    return np.pad(out, (0, n_out - len(out)))


def save_wav(wav: np.ndarray, path: str | os.PathLike, sr: int) -> None:
    """Write mono 16-bit PCM, clipping (not rescaling) samples outside [-1, 1]."""
    from scipy.io import wavfile

    pcm = np.clip(np.round(wav * 32767.0), -32768, 32767).astype(np.int16)
    wavfile.write(os.fspath(path), sr, pcm)


def preemphasis(wav: np.ndarray, k: float) -> np.ndarray:
    """y[n] = x[n] - k·x[n-1] in float64: scipy's lfilter([1, -k], [1], x)."""
    x = np.asarray(wav, dtype=np.float64)
    y = x.copy()
    y[1:] -= k * x[:-1]
    return y


def stft(y: np.ndarray, n_fft: int, hop: int, win: int) -> np.ndarray:
    """librosa.stft(center=True, pad_mode="reflect", window="hann", dtype=complex64): (1 + n_fft//2, frames)."""
    return stft_of_padded(np.pad(y, n_fft // 2, mode="reflect"), n_fft, hop, win)


def stft_of_padded(padded: np.ndarray, n_fft: int, hop: int, win: int) -> np.ndarray:
    """`stft`'s columns of a signal already padded: one every `hop` samples from its start, while `n_fft` fit."""
    window = np.zeros(n_fft)
    offset = (n_fft - win) // 2
    window[offset : offset + win] = hann(win)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    return np.fft.rfft(frames * window, axis=-1).astype(np.complex64).T


def hann(n: int) -> np.ndarray:
    """The periodic Hann window as scipy.signal.get_window("hann", n) computes it."""
    return (0.5 + 0.5 * np.cos(np.linspace(-np.pi, np.pi, n + 1)))[:n]


def hz_to_mel(hz: float) -> float:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    if hz < SLANEY_LOG_HZ:
        return hz / SLANEY_HZ_PER_MEL
    return SLANEY_LOG_HZ / SLANEY_HZ_PER_MEL + np.log(hz / SLANEY_LOG_HZ) / SLANEY_LOGSTEP


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = SLANEY_HZ_PER_MEL * mel
    min_log_mel = SLANEY_LOG_HZ / SLANEY_HZ_PER_MEL
    log = mel >= min_log_mel
    hz[log] = SLANEY_LOG_HZ * np.exp(SLANEY_LOGSTEP * (mel[log] - min_log_mel))
    return hz


@functools.lru_cache(maxsize=4)
def mel_basis(sample_rate: int, n_fft: int, num_mels: int, fmin: int, fmax: int) -> np.ndarray:
    """(num_mels, 1 + n_fft//2) float32 triangles, Slaney-normalised: librosa.filters.mel."""
    assert fmax <= sample_rate // 2
    fft_hz = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), num_mels + 2))
    widths = np.diff(edges)
    ramps = np.subtract.outer(edges, fft_hz)
    weights = np.zeros((num_mels, len(fft_hz)), dtype=np.float32)
    for i in range(num_mels):
        weights[i] = np.maximum(0, np.minimum(-ramps[i] / widths[i], ramps[i + 2] / widths[i + 1]))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]  # equal area per band
    return weights


def melspectrogram(wav: np.ndarray, hp: HParams = hparams) -> np.ndarray:
    """(n_samples,) float → (num_mels, 1 + n_samples // hop) float32, normalised to [-4, 4]."""
    y = preemphasis(wav, hp.preemphasis) if hp.preemphasize else wav
    return mel_of_magnitudes(np.abs(stft(y, hp.n_fft, hp.hop_length(), hp.win_size)), hp)


def mel_of_magnitudes(magnitudes: np.ndarray, hp: HParams = hparams) -> np.ndarray:
    """(1 + n_fft//2, columns) STFT magnitudes → normalised mel columns, each computed on its own."""
    mel = np.dot(mel_basis(hp.sample_rate, hp.n_fft, hp.num_mels, hp.fmin, hp.fmax), magnitudes)
    db = _amp_to_db(mel, hp) - hp.ref_level_db
    return _normalize(db, hp) if hp.signal_normalization else db


def _amp_to_db(x: np.ndarray, hp: HParams) -> np.ndarray:
    min_level = np.asarray(np.exp(hp.min_level_db / 20 * np.log(10)), dtype=x.dtype)
    return 20 * np.log10(np.maximum(min_level, x))


def _normalize(S: np.ndarray, hp: HParams) -> np.ndarray:
    scaled = (2 * hp.max_abs_value) * ((S - hp.min_level_db) / (-hp.min_level_db))
    if hp.symmetric_mels:
        scaled = scaled - hp.max_abs_value
        low = -hp.max_abs_value
    else:
        scaled = scaled / 2
        low = 0
    return np.clip(scaled, low, hp.max_abs_value) if hp.allow_clipping_in_normalization else scaled


def mel_chunk_starts(n_columns: int, fps: float) -> list[int]:
    """Start column of each video frame's 16-column window, as inference.py computed them.

    Frame i starts at int(i * 80 / fps); once a window would run past the end, one last window is taken
    flush with the end and the list stops, so it sets how many frames the output has.
    """
    if n_columns < MEL_STEP_SIZE:
        raise UserError(f"the audio is too short: {n_columns} mel columns, at least {MEL_STEP_SIZE} (0.2 s) are needed")
    step = MEL_COLUMNS_PER_SECOND / fps
    starts = []
    i = 0
    while (start := int(i * step)) + MEL_STEP_SIZE <= n_columns:
        starts.append(start)
        i += 1
    starts.append(n_columns - MEL_STEP_SIZE)
    return starts


def frame_mel_starts(n_columns: int, fps: float, n_frames: int) -> list[int]:
    """Start column of each of `n_frames` output frames: the original's rule (`mel_chunk_starts`), continued
    with its last window (flush with the end of the mel) up to `n_frames`, so the video covers the audio."""
    starts = mel_chunk_starts(n_columns, fps)
    return starts + [starts[-1]] * (n_frames - len(starts))


def window_samples(start: int, hp: HParams = hparams) -> tuple[int, int]:
    """The samples [lo, hi) that the mel window from column `start` is computed from: its 16 columns' STFT
    frames, each n_fft wide around its centre (clipped at the signal's start). Silence is judged on these,
    offline and live alike, so a frame is silent exactly when the generator would hear silence."""
    hop, pad = hp.hop_length(), hp.n_fft // 2
    return max(0, start * hop - pad), (start + MEL_STEP_SIZE - 1) * hop + pad


def level_db(samples: np.ndarray) -> float:
    """RMS level of `samples` in dB full scale (`SILENCE_FLOOR_DB` for digital silence or none at all): what
    `--silence_db` is compared with, in inference.py (`--idle keep`) and in the live avatar."""
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0
    return 20 * float(np.log10(rms)) if rms > 0 else SILENCE_FLOOR_DB


def mel_windows(mel: np.ndarray, starts: Sequence[int]) -> np.ndarray:
    """(n, 1, num_mels, 16) float32 windows starting at `starts`: the networks' audio input."""
    return np.stack([mel[:, s : s + MEL_STEP_SIZE] for s in starts])[:, None]


@dataclass(frozen=True)
class Speech:
    """The mel windows stage's input: a whole mel spectrogram and the window each output frame takes."""

    mel: np.ndarray  # (num_mels, columns) float32
    starts: list[int]  # first mel column of each output frame's window
    gain: float = 1.0  # applied to the samples (1 unless they exceeded full scale); the encoder applies it too
    levels_db: np.ndarray | None = None  # per output frame: `level_db` of the samples its window covers

    @property
    def n_frames(self) -> int:
        return len(self.starts)


def load_speech_wav(
    path: str | os.PathLike, hp: HParams = hparams, span: TimeRange | None = None
) -> tuple[np.ndarray, float]:
    """The samples of any audio (or video) file, checked and brought within full scale, and the gain that did
    it; only those in `span` (`--audio_start/--audio_end`) when given."""
    planes, rate = decode_audio(path, span)
    gain = speech_gain(planes, rate, path)
    return to_mono(planes * gain if gain != 1.0 else planes, rate, hp.sample_rate), gain


def load_speech(path: str | os.PathLike, fps: float, hp: HParams = hparams, span: TimeRange | None = None) -> Speech:
    """The speech of any audio (or video) file (its `span` when given), checked before any work is done, as
    mel windows for enough frames at `fps` to cover it, and the level of each window."""
    wav, gain = load_speech_wav(path, hp, span)
    mel = melspectrogram(wav, hp)
    n_frames = video.frames_to_cover(len(wav) / hp.sample_rate, fps)
    starts = frame_mel_starts(mel.shape[1], fps, n_frames)
    return Speech(mel, starts, gain, np.array([level_db(wav[slice(*window_samples(s, hp))]) for s in starts]))


GEMM_MIN_COLUMNS = 16  # OpenBLAS multiplies fewer columns by another kernel, whose round-off differs


class MelStream:
    """`melspectrogram` of a signal that arrives a little at a time: the same columns, bit for bit.

    Accepts any chunking. Column j covers samples [j·hop − n_fft/2, j·hop + n_fft/2), reflected at both
    ends of the signal, so it is final once the sample j·hop + n_fft/2 − 1 arrived: the stream sees
    n_fft/2 samples (25 ms) ahead of each column's centre. `push` returns the columns that became final
    (none until the first `GEMM_MIN_COLUMNS` are, which no frame's window can do without anyway);
    `flush` ends the signal and returns the rest, those the end's reflection reaches included.

    Kept between pushes: the padded, pre-emphasised signal from the next column's start (under
    n_fft + hop samples), the last raw sample (pre-emphasis is x[n] − k·x[n−1]) and the last magnitude
    columns (each product takes at least `GEMM_MIN_COLUMNS` columns, as the whole signal's one does).
    """

    def __init__(self, hp: HParams = hparams) -> None:
        self.hp = hp
        self.n_fft, self.hop, self.pad = hp.n_fft, hp.hop_length(), hp.n_fft // 2
        self.n_samples = 0  # pushed so far
        self.n_columns = 0  # returned so far
        self._last: np.ndarray | None = None  # the last raw sample
        self._padded = np.zeros(0)  # the padded signal from padded index `_start` (its head unpadded until
        self._start = 0  # more than n_fft/2 samples arrived: the start's reflection needs them)
        self._history = np.zeros((0, self.n_fft // 2 + 1), np.float32)  # magnitude rows of the last columns

    def push(self, samples: np.ndarray) -> np.ndarray:
        """(num_mels, k) float32: the columns that `samples` made final (often none)."""
        x = np.asarray(samples).ravel()
        if not len(x):
            return self._empty()
        y = self._emphasised(x)
        was_short = self.n_samples <= self.pad
        self.n_samples += len(x)
        self._padded = np.concatenate([self._padded, y])
        if self.n_samples <= self.pad:
            return self._empty()
        if was_short:  # the start's reflection: samples pad, pad-1, …, 1
            self._padded = np.concatenate([self._padded[self.pad : 0 : -1], self._padded])
        final = (self.n_samples - self.pad) // self.hop + 1
        if self.n_columns == 0 and final < GEMM_MIN_COLUMNS:
            return self._empty()
        return self._columns(self._padded, final)

    def flush(self) -> np.ndarray:
        """(num_mels, k) float32: the last columns, the signal reflected at its end; the stream is then over."""
        if self.n_samples == 0:
            return self._empty()
        if self.n_samples <= self.pad:  # too short to have had its start padded: pad it all, as offline
            padded = np.pad(self._padded, self.pad, mode="reflect")
        else:
            padded = np.pad(self._padded, (0, self.pad), mode="reflect")
        return self._columns(padded, 1 + self.n_samples // self.hop)

    def _emphasised(self, x: np.ndarray) -> np.ndarray:
        if not self.hp.preemphasize:
            y = x.astype(np.float64)
        elif self._last is None:
            y = preemphasis(x, self.hp.preemphasis)
        else:
            y = preemphasis(np.concatenate([self._last, x]), self.hp.preemphasis)[1:]
        self._last = x[-1:]
        return y

    def _columns(self, padded: np.ndarray, end: int) -> np.ndarray:
        """Columns n_columns..end-1 of `padded` (which starts at padded index `_start`); drops what is used."""
        first = self.n_columns
        if end <= first:
            return self._empty()
        lo = first * self.hop - self._start
        spec = stft_of_padded(padded[lo : lo + (end - 1 - first) * self.hop + self.n_fft], self.n_fft, self.hop,
                              self.hp.win_size)  # fmt: skip
        rows = np.concatenate([self._history, np.abs(spec).T])  # rows.T is laid out as the offline magnitudes
        mel = mel_of_magnitudes(rows.T, self.hp)[:, len(self._history) :]
        self._history = rows[-(GEMM_MIN_COLUMNS - 1) :]
        self.n_columns = end
        self._padded = padded[end * self.hop - self._start :]
        self._start = end * self.hop
        return np.ascontiguousarray(mel)

    def _empty(self) -> np.ndarray:
        return np.zeros((self.hp.num_mels, 0), np.float32)
