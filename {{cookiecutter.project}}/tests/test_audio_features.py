"""The log-mel front end against closed forms: the HTK mel formula, the filterbank's triangles, and a pure tone whose
mel energies follow exactly from the periodic Hann window's three-bin spectrum. (librosa and torchaudio are not
dependencies; the closed forms below pin the same numbers down.)"""

from __future__ import annotations

import math

import pytest
import torch

from {{ cookiecutter.package }}.data.audio_features import (
    LOG_FLOOR,
    LogMel,
    hz_to_mel,
    mel_centers,
    mel_filterbank,
    mel_to_hz,
)

RATE, N_FFT, HOP, N_MELS = 8000, 256, 80, 40


def test_htk_mel_scale_and_its_inverse():
    assert float(hz_to_mel(700.0)) == pytest.approx(2595 * math.log10(2))
    assert float(hz_to_mel(1000.0)) == pytest.approx(1000.0, abs=0.1)  # the scale's anchor: 1 kHz ~ 1000 mel
    f = torch.tensor([0.0, 100.0, 1234.5, 4000.0], dtype=torch.float64)
    torch.testing.assert_close(mel_to_hz(hz_to_mel(f)), f)


def test_filterbank_triangles_peak_at_their_centres_and_sum_to_one_between_first_and_last():
    fb = mel_filterbank(N_FFT, RATE, N_MELS, f_min=20.0).double()  # [F, M]
    assert fb.shape == (N_FFT // 2 + 1, N_MELS)
    assert fb.min() >= 0 and fb.max() <= 1 + 1e-6
    freqs = torch.linspace(0, RATE / 2, N_FFT // 2 + 1, dtype=torch.float64)
    edges = mel_centers(N_MELS, 20.0, RATE / 2)
    inside = (freqs >= edges[1]) & (freqs <= edges[-2])
    torch.testing.assert_close(fb[inside].sum(dim=1), torch.ones(int(inside.sum()), dtype=torch.float64))
    assert (fb[freqs < edges[0]] == 0).all()  # below f_min nothing counts
    # each filter is zero outside (its lower edge, its upper edge) and peaks on a bin next to its centre
    for m in range(N_MELS):
        outside = (freqs <= edges[m]) | (freqs >= edges[m + 2])
        assert (fb[outside, m] == 0).all()
        assert abs(freqs[fb[:, m].argmax()] - edges[m + 1]) < RATE / N_FFT


@pytest.mark.parametrize("k0", [10, 37, 90])
def test_pure_tone_mel_energies_match_the_closed_form(k0):
    """A tone of amplitude A on STFT bin k0, under a periodic Hann window of N samples, has |X_k0| = A N / 4 and
    |X_k0+-1| = A N / 8 and nothing elsewhere, so mel band m holds fb[k0, m] (A N/4)^2 + fb[k0+-1, m] (A N/8)^2."""
    amp, n = 0.5, RATE
    t = torch.arange(n, dtype=torch.float64)
    wave = (amp * torch.cos(2 * math.pi * k0 * t / N_FFT)).float().unsqueeze(0)
    feats = LogMel(RATE, N_FFT, HOP, N_MELS, f_min=20.0)(wave)[0]  # [T, M]
    assert feats.shape == (n // HOP + 1, N_MELS)
    fb = mel_filterbank(N_FFT, RATE, N_MELS, f_min=20.0).double()
    main, side = (amp * N_FFT / 4) ** 2, (amp * N_FFT / 8) ** 2
    expected = fb[k0] * main + (fb[k0 - 1] + fb[k0 + 1]) * side
    middle = feats[10:-10].double()  # frames away from the zero-padded ends
    torch.testing.assert_close(middle, torch.log(expected + LOG_FLOOR).expand_as(middle), rtol=1e-3, atol=1e-3)
    freqs_of_bands = mel_centers(N_MELS, 20.0, RATE / 2)[1:-1]
    tone = k0 * RATE / N_FFT
    best = int(middle[0].argmax())
    nearest = (freqs_of_bands - tone).abs().min()
    assert abs(freqs_of_bands[best] - tone) <= nearest + RATE / N_FFT  # the band at the tone, or its neighbour


def test_silence_is_the_log_floor_and_frames_follow_the_hop():
    log_mel = LogMel(RATE, N_FFT, HOP, N_MELS)
    feats = log_mel(torch.zeros(2, 4000))
    assert feats.shape == (2, log_mel.frames(4000), N_MELS) == (2, 51, N_MELS)
    torch.testing.assert_close(feats, torch.full_like(feats, math.log(LOG_FLOOR)))
