"""Training-time augmentation of a speech batch: ``SpeechAugment(...)(batch, generator) -> batch``.

It is the ``augment`` hook of :class:`.batches.ExampleBatches`: applied to training batches only (evaluation uses
``iter_batches``, which has no hook), with a generator seeded from the batch's position, so a run and its resume draw
the same augmentations. In order, each part its own switch in :class:`..config.speech.SpeechAugmentConfig`:

1. speed perturbation: resample each clip by a factor in ``speed`` (tempo and pitch move together, as Kaldi/sox
   ``speed`` do): a voice a little higher or lower and faster or slower than any in the data;
2. time shift by up to ``shift_ms`` (zero filled, never wrapped round): the word is not always in the middle;
3. background noise at an SNR drawn from ``snr_db``: coloured noise (white to brown, 1/f^a with a in [0, 2]) made on
   the spot, or a random stretch of Speech Commands' ``_background_noise_`` recordings when the data has them;
4. SpecAugment time and frequency masks: drawn here as ``feature_mask`` [B, T, n_mels] (True = masked) and applied by
   the model after its log-mel front end, where the features exist.

Labels are passed through untouched; the input tensors are never modified in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config.speech import SpeechAugmentConfig


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def speed_perturb(x: Tensor, factors: Tensor) -> Tensor:
    """Each row resampled by its factor (> 1 = faster and higher), centre-cropped or zero-padded back to length."""
    n = x.shape[-1]
    out = torch.zeros_like(x)
    for i, f in enumerate(factors.tolist()):
        m = max(2, round(n / f))
        y = F.interpolate(x[i].view(1, 1, n), size=m, mode="linear", align_corners=False).view(m)
        if m >= n:
            out[i] = y[(m - n) // 2 : (m - n) // 2 + n]
        else:
            out[i, (n - m) // 2 : (n - m) // 2 + m] = y
    return out


def time_shift(x: Tensor, shifts: Tensor) -> Tensor:
    """Row i moved right by shifts[i] samples (left when negative); what moves out is dropped, zeros move in."""
    n = x.shape[-1]
    src = torch.arange(n) - shifts.view(-1, 1)  # [B, N]: where each output sample comes from
    valid = (src >= 0) & (src < n)
    return torch.where(valid, x.gather(1, src.clamp(0, n - 1)), torch.zeros((), dtype=x.dtype))


def coloured_noise(n_rows: int, n: int, exponents: Tensor, g: torch.Generator) -> Tensor:
    """Gaussian noise with power spectrum 1/f^a per row (a = 0 white, 1 pink, 2 brown), unit RMS."""
    spec = torch.fft.rfft(torch.randn(n_rows, n, generator=g), dim=-1)
    f = torch.arange(spec.shape[-1], dtype=torch.float32).clamp(min=1.0)  # DC shaped like the lowest bin
    noise = torch.fft.irfft(spec * f.pow(-exponents.view(-1, 1) / 2), n=n, dim=-1)
    return noise / noise.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp(min=1e-8)


def recorded_noise(bank: list[Tensor], n_rows: int, n: int, g: torch.Generator) -> Tensor:
    """A random stretch of a random background recording per row (tiled when a recording is short), unit RMS."""
    rows = []
    for _ in range(n_rows):
        rec = bank[int(torch.randint(len(bank), (1,), generator=g))]
        rec = rec.repeat(-(-n // len(rec)) + 1)
        start = int(torch.randint(len(rec) - n + 1, (1,), generator=g))
        rows.append(rec[start : start + n])
    noise = torch.stack(rows)
    return noise / noise.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp(min=1e-8)


def mix_at_snr(x: Tensor, noise: Tensor, snr_db: Tensor) -> Tensor:
    """x + noise scaled so that power(x) / power(noise) = 10^(snr/10), power = mean square over the whole clip."""
    power = x.pow(2).mean(dim=-1, keepdim=True)
    scale = (power / 10 ** (snr_db.view(-1, 1) / 10)).sqrt()
    return x + scale * noise


def spec_masks(b: int, frames: int, bins: int, cfg: SpeechAugmentConfig, g: torch.Generator) -> Tensor:
    """SpecAugment's masks [B, frames, bins] (True = masked): time_masks bands of up to time_mask_frames frames
    and freq_masks bands of up to freq_mask_bins mel bands per clip, at uniform random places."""
    mask = torch.zeros(b, frames, bins, dtype=torch.bool)
    for i in range(b):
        for axis, count, widest, size in (
            (1, cfg.time_masks, cfg.time_mask_frames, frames),
            (2, cfg.freq_masks, cfg.freq_mask_bins, bins),
        ):
            for _ in range(count):
                width = int(torch.randint(widest + 1, (1,), generator=g))
                start = int(torch.randint(max(size - width, 0) + 1, (1,), generator=g))
                if axis == 1:
                    mask[i, start : start + width, :] = True
                else:
                    mask[i, :, start : start + width] = True
    return mask


class SpeechAugment:
    """The ``augment`` hook: {"input_values" [B, N], "labels"} -> the same keys plus "feature_mask" [B, T, M]."""

    def __init__(
        self, cfg: SpeechAugmentConfig, sample_rate: int, frames: int, n_mels: int, noise: Sequence[np.ndarray] = ()
    ):
        self.cfg, self.rate, self.frames, self.n_mels = cfg, sample_rate, frames, n_mels
        self.bank = [torch.from_numpy(np.asarray(r, dtype=np.float32)) for r in noise if len(r)]

    def __call__(self, batch: dict[str, Tensor], g: torch.Generator) -> dict[str, Tensor]:
        cfg, x = self.cfg, batch["input_values"]
        b, n = x.shape
        if cfg.speed != (1.0, 1.0):
            x = speed_perturb(x, _uniform(b, *cfg.speed, g))
        if cfg.shift_ms > 0:
            limit = round(cfg.shift_ms * self.rate / 1000)
            x = time_shift(x, torch.randint(-limit, limit + 1, (b,), generator=g))
        if cfg.noise_prob > 0:
            x = self._add_noise(x, g)
        out = {**batch, "input_values": x}
        if cfg.time_masks or cfg.freq_masks:
            out["feature_mask"] = spec_masks(b, self.frames, self.n_mels, cfg, g)
        return out

    def _add_noise(self, x: Tensor, g: torch.Generator) -> Tensor:
        b, n = x.shape
        noise = coloured_noise(b, n, _uniform(b, 0.0, 2.0, g), g)
        if self.bank:  # half the rows get a real recording instead
            real = recorded_noise(self.bank, b, n, g)
            noise = torch.where((torch.rand(b, generator=g) < 0.5).view(-1, 1), real, noise)
        snr = _uniform(b, *self.cfg.snr_db, g)
        keep = (torch.rand(b, generator=g) >= self.cfg.noise_prob).view(-1, 1)
        return torch.where(keep, x, mix_at_snr(x, noise, snr))
