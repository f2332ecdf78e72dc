"""Audio in and out with the standard library and numpy only: PCM WAV reading, mu-law, resampling.

No torchaudio/librosa/soundfile: they are not needed for 16-bit PCM WAV (what Speech Commands ships) and their wheels
must match the installed torch build. Every failure is a :class:`AudioError` whose message is one line naming the file.
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import BinaryIO

import numpy as np

MU = 255  # G.711 mu-law: 8 bits per sample, ~38 dB of dynamic range from the log companding


class AudioError(ValueError):
    """A file that cannot be used: unreadable, wrong format, or a sample rate we cannot convert from."""


def mulaw_encode(x: np.ndarray) -> np.ndarray:
    """float waveform in [-1, 1] -> uint8 codes (the closed-form mu-law curve, not the G.711 segment table)."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    y = np.sign(x) * np.log1p(MU * np.abs(x)) / np.log1p(MU)  # [-1, 1], logarithmic in |x|
    return np.round((y + 1.0) / 2.0 * MU).astype(np.uint8)


def mulaw_decode(codes: np.ndarray) -> np.ndarray:
    """uint8 codes -> float32 waveform in [-1, 1]: the exact inverse of the curve in :func:`mulaw_encode`."""
    y = np.asarray(codes, dtype=np.float64) / MU * 2.0 - 1.0
    return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(MU)) / MU).astype(np.float32)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling through the spectrum: keep the bins below the new Nyquist frequency (an ideal
    low-pass, so downsampling cannot alias), then invert at the new length. numpy only; exact for any rate pair."""
    x = np.asarray(x, dtype=np.float32)
    if rate_in == rate_out or len(x) == 0:
        return x
    n_out = max(1, round(len(x) * rate_out / rate_in))
    spec = np.fft.rfft(x)
    keep = n_out // 2 + 1
    spec = spec[:keep] if len(spec) >= keep else np.pad(spec, (0, keep - len(spec)))
    return (np.fft.irfft(spec, n_out) * (n_out / len(x))).astype(np.float32)


_PCM_SCALE = {1: 128.0, 2: 32768.0, 4: 2147483648.0}
_PCM_DTYPE = {1: np.uint8, 2: "<i2", 4: "<i4"}


def read_wav(path: str | Path | BinaryIO, rate: int) -> np.ndarray:
    """A PCM WAV file (a path, or a binary file object such as espeak-ng's output in ``io.BytesIO``) as float32 mono
    in [-1, 1] at ``rate`` Hz (channels averaged, downsampled when needed).

    A file recorded below ``rate`` is refused rather than upsampled: the missing high band cannot be made up, and a
    model would learn that silence there means something.
    """
    try:
        with wave.open(path if hasattr(path, "read") else str(path), "rb") as f:
            width, channels, file_rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
            raw = f.readframes(f.getnframes())
    except (OSError, EOFError, wave.Error) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise AudioError(f"{path}: not a readable PCM WAV file ({reason})") from err
    if width not in _PCM_DTYPE:
        raise AudioError(f"{path}: {8 * width}-bit samples; expected 8-, 16- or 32-bit PCM")
    if file_rate < rate:
        raise AudioError(f"{path}: sample rate {file_rate} Hz is below the project's {rate} Hz (data.sample_rate)")
    x = np.frombuffer(raw, dtype=_PCM_DTYPE[width]).astype(np.float32)
    x = (x - 128.0 if width == 1 else x) / _PCM_SCALE[width]  # 8-bit WAV is unsigned
    x = x[: len(x) // channels * channels].reshape(-1, channels).mean(axis=1)
    return resample(x, file_rate, rate)


def write_wav(path: str | Path, x: np.ndarray, rate: int) -> Path:
    """float waveform -> 16-bit mono PCM WAV (used by tests and to listen to a clip)."""
    pcm = (np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return Path(path)
