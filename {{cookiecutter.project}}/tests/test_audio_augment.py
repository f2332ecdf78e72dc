"""Augmentation: seeded, labels and inputs untouched, each part switchable, never on evaluation batches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from {{ cookiecutter.package }}.config.speech import SpeechAugmentConfig
from {{ cookiecutter.package }}.data.audio_augment import (
    SpeechAugment,
    coloured_noise,
    mix_at_snr,
    spec_masks,
    time_shift,
)
from {{ cookiecutter.package }}.data.batches import ExampleBatches, iter_batches
from {{ cookiecutter.package }}.data.speech import Clip, speech_collate

RATE, FRAMES, MELS = 8000, 101, 40


def _batch(b: int = 6) -> dict[str, torch.Tensor]:
    t = torch.arange(RATE) / RATE
    wave = torch.stack([torch.sin(2 * torch.pi * (200 + 50 * i) * t) * (t > 0.3) * (t < 0.7) for i in range(b)])
    return {"input_values": wave.float(), "labels": torch.arange(b) % 3}


def _augment(**changes) -> SpeechAugment:
    return SpeechAugment(dataclasses.replace(SpeechAugmentConfig(), **changes), RATE, FRAMES, MELS)


def test_same_seed_same_batch_other_seed_other_batch_labels_and_input_untouched():
    batch = _batch()
    before = {k: v.clone() for k, v in batch.items()}
    aug = _augment()
    a = aug(batch, torch.Generator().manual_seed(1))
    b = aug(batch, torch.Generator().manual_seed(1))
    c = aug(batch, torch.Generator().manual_seed(2))
    for k in before:
        assert torch.equal(batch[k], before[k])  # nothing modified in place
    assert torch.equal(a["labels"], before["labels"]) and a["labels"] is batch["labels"]
    assert torch.equal(a["input_values"], b["input_values"]) and torch.equal(a["feature_mask"], b["feature_mask"])
    assert not torch.equal(a["input_values"], c["input_values"])
    assert a["input_values"].shape == before["input_values"].shape
    assert a["feature_mask"].shape == (6, FRAMES, MELS) and a["feature_mask"].dtype == torch.bool


def test_every_part_off_is_the_identity():
    off = _augment(shift_ms=0.0, noise_prob=0.0, speed=(1.0, 1.0), time_masks=0, freq_masks=0)
    batch = _batch()
    out = off(batch, torch.Generator().manual_seed(0))
    assert torch.equal(out["input_values"], batch["input_values"]) and "feature_mask" not in out


def test_time_shift_moves_without_wrapping():
    x = torch.arange(1.0, 11.0).repeat(2, 1)
    out = time_shift(x, torch.tensor([3, -2]))
    assert out[0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert out[1].tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 0, 0]


def test_noise_is_mixed_at_the_requested_snr():
    g = torch.Generator().manual_seed(0)
    x = _batch(4)["input_values"]
    noise = coloured_noise(4, RATE, torch.tensor([0.0, 1.0, 2.0, 0.5]), g)
    torch.testing.assert_close(noise.pow(2).mean(dim=1), torch.ones(4))
    snr = torch.tensor([0.0, 5.0, 10.0, 20.0])
    added = mix_at_snr(x, noise, snr) - x
    measured = 10 * torch.log10(x.pow(2).mean(dim=1) / added.pow(2).mean(dim=1))
    torch.testing.assert_close(measured, snr, atol=1e-3, rtol=0)


def test_brown_noise_has_more_low_frequency_power_than_white():
    noise = coloured_noise(2, RATE, torch.tensor([0.0, 2.0]), torch.Generator().manual_seed(0))
    power = torch.fft.rfft(noise).abs().square()
    low, high = power[:, 1:100].mean(dim=1), power[:, -1000:].mean(dim=1)
    assert low[1] / high[1] > 100 * low[0] / high[0]


def test_spec_masks_respect_their_widths():
    cfg = dataclasses.replace(SpeechAugmentConfig(), time_masks=1, time_mask_frames=7, freq_masks=1, freq_mask_bins=3)
    mask = spec_masks(50, FRAMES, MELS, cfg, torch.Generator().manual_seed(0))
    full_rows = mask.all(dim=2).sum(dim=1)  # masked frames per clip
    full_cols = mask.all(dim=1).sum(dim=1)  # masked bands per clip
    assert full_rows.max() <= 7 and full_cols.max() <= 3 and full_rows.sum() > 0 and full_cols.sum() > 0


def test_recorded_background_noise_is_used_when_given():
    recording = np.full(3000, 0.5, dtype=np.float32)  # a constant "hum": only recorded noise has a DC level
    aug = SpeechAugment(
        dataclasses.replace(SpeechAugmentConfig(), noise_prob=1.0, shift_ms=0.0, speed=(1.0, 1.0)),
        RATE,
        1,
        1,
        [recording],
    )
    out = aug(_batch(32), torch.Generator().manual_seed(0))["input_values"]
    assert (out.mean(dim=1).abs() > 0.05).any()


def test_training_batches_are_augmented_evaluation_batches_never(speech_clips):
    collate = speech_collate(RATE)
    source = ExampleBatches(speech_clips, 4, collate, seed=0, shuffle=False, augment=_augment())
    first = source.next_batch()
    plain = collate(speech_clips[:4])
    assert torch.equal(first["labels"], plain["labels"]) and not torch.equal(
        first["input_values"], plain["input_values"]
    )
    evaluated = next(iter_batches(speech_clips, 4, collate))
    assert torch.equal(evaluated["input_values"], plain["input_values"]) and "feature_mask" not in evaluated
    resumed = ExampleBatches(speech_clips, 4, collate, seed=0, shuffle=False, augment=_augment())
    resumed.load_state_dict({"epoch": 0, "pos": 0})
    assert torch.equal(resumed.next_batch()["input_values"], first["input_values"])  # the position is the seed


@pytest.fixture
def speech_clips() -> list[Clip]:
    rng = np.random.default_rng(0)
    return [Clip(rng.standard_normal(4000).astype(np.float32) * 0.1, i % 3, f"clip{i}") for i in range(8)]
