"""Log-mel features written out: ``torch.stft`` power spectrum times a triangular mel filterbank, then a log.

Mel scale: the HTK formula ``mel(f) = 2595 * log10(1 + f / 700)``; the filters are triangles with peak 1 whose
centres are equally spaced in mel (no Slaney area normalisation: adjacent triangles then sum to 1 between the first
and the last centre, which tests/test_audio_features.py checks). ``librosa.filters.mel(htk=True, norm=None)`` and
``torchaudio.functional.melscale_fbanks(mel_scale="htk", norm=None)`` build the same matrix.

:class:`LogMel` is an ``nn.Module`` so the model computes its features on its own device (the STFT is the costliest
preprocessing step and the batches travel as raw waveforms); its buffers are derived, never saved.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LOG_FLOOR = 1e-6  # added before the log: silence (zero padding) maps to a finite -13.8 instead of -inf


def hz_to_mel(f: Tensor | float) -> Tensor:
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: Tensor | float) -> Tensor:
    return 700.0 * (10.0 ** (torch.as_tensor(m, dtype=torch.float64) / 2595.0) - 1.0)


def mel_centers(n_mels: int, f_min: float, f_max: float) -> Tensor:
    """The n_mels + 2 band edges in Hz: equally spaced in mel from f_min to f_max (filter m peaks at edge m + 1)."""
    return mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2, dtype=torch.float64))


def mel_filterbank(n_fft: int, sample_rate: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None) -> Tensor:
    """[n_fft // 2 + 1, n_mels] float32: power spectrum @ filterbank = mel energies."""
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # the STFT bins' frequencies
    edges = mel_centers(n_mels, f_min, f_max)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]  # [M] each
    rising = (freqs[:, None] - lower) / (center - lower)  # [F, M]
    falling = (upper - freqs[:, None]) / (upper - center)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


class LogMel(nn.Module):
    """Waveform [B, N] -> log-mel [B, T, n_mels], T = N // hop_length + 1 (frames centred, zero padded)."""

    def __init__(
        self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None
    ):
        super().__init__()
        self.n_fft, self.hop_length, self.n_mels = n_fft, hop_length, n_mels
        # periodic Hann: the window's DFT has exactly three non-zero bins, which the closed-form test relies on
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)
        self.register_buffer("fbank", mel_filterbank(n_fft, sample_rate, n_mels, f_min, f_max), persistent=False)

    def frames(self, n_samples: int) -> int:
        return n_samples // self.hop_length + 1

    def power(self, wave: Tensor) -> Tensor:
        """|STFT|^2 [B, T, n_fft // 2 + 1] in fp32 (autocast would lose the small energies)."""
        spec = torch.stft(
            wave.float(),
            self.n_fft,
            self.hop_length,
            window=self.window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )  # [B, F, T]
        return spec.abs().square().transpose(1, 2)

    def forward(self, wave: Tensor) -> Tensor:
        with torch.autocast(wave.device.type, enabled=False):
            return torch.log(self.power(wave) @ self.fbank + LOG_FLOOR)


def hop_for(sample_rate: int, hop_ms: float) -> int:
    return max(1, round(sample_rate * hop_ms / 1000))


def n_fft_for(sample_rate: int, window_ms: float) -> int:
    """The power of two nearest the window length (the STFT frame: window_ms of audio)."""
    return 2 ** round(math.log2(sample_rate * window_ms / 1000))
