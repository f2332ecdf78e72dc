"""predict on the speech project's Conformer: the held-out test voices written as WAV files score the run's own test
accuracy with the probabilities of the training's evaluation batches, a file recorded at a higher rate is resampled,
and a file below the model's sample rate or not a WAV ends in one line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from {{ cookiecutter.package }} import speech
from {{ cookiecutter.package }}.classifiers import load_classifier
from {{ cookiecutter.package }}.config import parse_config
from {{ cookiecutter.package }}.config.speech import SpeechConfig
from {{ cookiecutter.package }}.data.speech import speech_collate, write_clips
from {{ cookiecutter.package }}.data.wav import resample, write_wav


@pytest.fixture(scope="module")
def speech_run(tmp_path_factory):
    """The --debug Conformer, its config and the clips it was tested on."""
    out = tmp_path_factory.mktemp("predict-speech")
    argv = ["--debug", "--out_dir", str(out), "--train.device", "cpu", "--train.logger", "none"]
    cfg, dbg = parse_config(SpeechConfig, argv)
    speech.run(cfg, dbg)
    return out / cfg.name, cfg, speech.read_data(cfg)


def test_held_out_wavs_score_the_runs_test_accuracy(speech_run, tmp_path, predict_json):
    run_dir, cfg, data = speech_run
    write_clips(data.test, data.labels, tmp_path / "test", cfg.data.sample_rate)
    rows = predict_json(run_dir, tmp_path / "test", "--batch_size", "48", "--device", "cpu")  # 160 = 3 x 48 + 16
    assert len(rows) == len(data.test)
    accuracy = sum(r["label"] == r["gold"] for r in rows.values()) / len(rows)
    assert accuracy == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["eval"]["accuracy"])
    model = load_classifier(run_dir, torch.device("cpu")).model  # the evaluation batches of training, in memory
    with torch.no_grad():
        batch = speech_collate(cfg.data.clip_samples)(data.test)
        expected = model(input_values=batch["input_values"]).logits.softmax(-1)
    files = sorted(rows, key=lambda f: Path(f).name)  # write_clips names a file by its index in the split
    got = torch.tensor([list(rows[f]["probabilities"].values()) for f in files])
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)  # 16-bit WAV samples


def test_a_recording_at_a_higher_rate_is_resampled(speech_run, tmp_path, predict_json):
    run_dir, cfg, data = speech_run
    rate = cfg.data.sample_rate
    clip = data.test[0]
    write_wav(tmp_path / "same.wav", clip.audio, rate)
    write_wav(tmp_path / "double.wav", resample(clip.audio, rate, 2 * rate), 2 * rate)
    rows = predict_json(run_dir, tmp_path / "same.wav", tmp_path / "double.wav")
    same, double = (list(rows[str(tmp_path / n)]["probabilities"].values()) for n in ("same.wav", "double.wav"))
    assert double == pytest.approx(same, abs=2e-3)


def test_a_wrong_sample_rate_or_a_non_wav_file_exits_2_with_one_line(speech_run, tmp_path, predict_cli):
    run_dir, cfg, _ = speech_run
    low = cfg.data.sample_rate // 2
    write_wav(tmp_path / "low.wav", np.zeros(low // 2, dtype=np.float32), low)
    (tmp_path / "text.wav").write_text("not audio")
    for name, message in (("low.wav", f"sample rate {low} Hz is below"), ("text.wav", "not a readable PCM WAV")):
        code, out, err = predict_cli(run_dir, tmp_path / name)
        assert code == 2 and not out and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: {tmp_path / name}: ") and message in err
