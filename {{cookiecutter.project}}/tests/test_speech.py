"""The speech project: the builtin set and the Speech Commands v2 loader (on a fixture in its real layout), the
Conformer's shapes and parameter count, and the entry point (--debug in seconds, one-line errors, exact resume)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from {{ cookiecutter.package }}.config.speech import AudioFeatureConfig, ConformerConfig, SpeechConfig
from {{ cookiecutter.package }}.data.speech import BUILTIN_SPEECH, WORDS, load_speech, read_manifest, speech_collate
from {{ cookiecutter.package }}.data.wav import mulaw_decode, mulaw_encode, read_wav, write_wav
from {{ cookiecutter.package }}.model.conformer import ConformerClassifier, ConvSubsampling
from {{ cookiecutter.package }}.speech import main

FAST = ["--train.device", "cpu", "--train.logger", "none", "--train.eval_every", "0"]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ---- data -----------------------------------------------------------------------------------------------------------
def test_builtin_set_is_small_and_holds_out_whole_voices():
    assert BUILTIN_SPEECH.stat().st_size <= 3_000_000
    z = read_manifest()
    assert list(z["words"]) == list(WORDS) and int(z["sample_rate"]) == 8000
    assert len(z["offsets"]) == len(z["word"]) + 1 and z["offsets"][-1] == len(z["audio"])
    voices_of = [set(z["voice"][z["split"] == s].tolist()) for s in range(3)]
    assert all(voices_of) and sum(len(v) for v in voices_of) == len(set.union(*voices_of))  # disjoint
    data = load_speech(None, 8000, 1.0)
    assert len(data.train) + len(data.val) + len(data.test) == len(z["word"])  # nothing lost
    assert {c.label for c in data.test} == set(range(10)) and all(len(c.audio) <= 8000 for c in data.train)


def test_mulaw_round_trip_is_within_half_a_step():
    x = np.linspace(-1, 1, 10001)
    y = mulaw_decode(mulaw_encode(x))
    step = np.gradient(mulaw_decode(np.arange(256)))  # the code spacing near each value
    assert np.all(np.abs(y - x) <= np.interp(x, mulaw_decode(np.arange(256)), step) * 0.51 + 1e-6)
    assert mulaw_encode(np.array([0.0]))[0] in (127, 128) and np.abs(mulaw_decode(mulaw_encode(np.zeros(1)))) < 1e-2


def _tone(rate: int, seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture
def speech_commands(tmp_path):
    """Google Speech Commands v2's layout: <word>/<speaker>_nohash_<n>.wav at 16 kHz, the two split lists, an extra
    word folder and _background_noise_/."""
    root = tmp_path / "speech_commands_v0.02"
    for w, word in enumerate(["yes", "no", "wow"]):
        (root / word).mkdir(parents=True)
        for s, speaker in enumerate(["0a7c2a8d", "0b09edd3", "0c40e715", "0d2bcf9d"]):
            write_wav(root / word / f"{speaker}_nohash_0.wav", _tone(16000, 0.6 + 0.1 * s, 300 + 200 * w), 16000)
    (root / "validation_list.txt").write_text("yes/0c40e715_nohash_0.wav\nno/0c40e715_nohash_0.wav\n")
    (root / "testing_list.txt").write_text(
        "yes/0d2bcf9d_nohash_0.wav\nno/0d2bcf9d_nohash_0.wav\nwow/0d2bcf9d_nohash_0.wav\n"
    )
    (root / "_background_noise_").mkdir()
    write_wav(
        root / "_background_noise_" / "white_noise.wav", np.random.default_rng(0).uniform(-0.1, 0.1, 32000), 16000
    )
    return root


def test_speech_commands_layout_is_read_split_by_its_lists_and_resampled(speech_commands, capsys):
    data = load_speech(str(speech_commands), 8000, 1.0, ["yes", "no"])
    assert (len(data.train), len(data.val), len(data.test)) == (4, 2, 2)
    assert {c.source for c in data.test} == {"yes/0d2bcf9d_nohash_0.wav", "no/0d2bcf9d_nohash_0.wav"}
    assert data.labels == ["yes", "no"] and len(data.noise) == 1 and len(data.noise[0]) == 16000
    assert len(data.train[0].audio) == 4800  # 0.6 s at 16 kHz -> 8 kHz
    assert "1 word folders not in data.words skipped: wow" in capsys.readouterr().out
    batch = speech_collate(8000)(data.train)
    assert batch["input_values"].shape == (4, 8000) and batch["labels"].tolist() == [0, 0, 1, 1]


def test_read_wav_downmixes_and_rejects_a_rate_below_the_projects(tmp_path):
    path = write_wav(tmp_path / "a.wav", _tone(16000, 0.5, 440), 16000)
    assert read_wav(path, 16000).shape == (8000,) and read_wav(path, 8000).shape == (4000,)
    with pytest.raises(ValueError, match="16000 Hz is below the project's 22050 Hz"):
        read_wav(path, 22050)


def _one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_audio_is_one_line_naming_the_file(tmp_path, speech_commands, capsys):
    base = ["--data.path", str(speech_commands), "--data.words", '["yes", "no"]', "--out_dir", str(tmp_path / "runs")]
    (speech_commands / "no" / "0e0e0e0e_nohash_0.wav").write_bytes(b"RIFF not really a wave file")
    assert "no/0e0e0e0e_nohash_0.wav: not a readable PCM WAV file" in _one_line_error(capsys, base)
    write_wav(speech_commands / "no" / "0e0e0e0e_nohash_0.wav", _tone(4000, 0.5, 300), 4000)
    assert "sample rate 4000 Hz is below the project's 8000 Hz" in _one_line_error(capsys, base)
    (speech_commands / "no" / "0e0e0e0e_nohash_0.wav").unlink()
    assert "no folder for label(s) left" in _one_line_error(capsys, [*base, "--data.words", '["yes", "left"]'])
    (speech_commands / "testing_list.txt").write_text("yes/gone_nohash_0.wav\n")
    assert "1 listed files do not exist, e.g. yes/gone_nohash_0.wav" in _one_line_error(capsys, base)
    assert not (tmp_path / "runs").exists()  # refused before anything was written


# ---- model ----------------------------------------------------------------------------------------------------------
def _expected_params(cfg: ConformerConfig, n_mels: int, num_labels: int) -> int:
    d, c, k = cfg.dim, cfg.subsample_channels, cfg.conv_kernel
    ff = 2 * d + (d * cfg.ff_mult * d + cfg.ff_mult * d) + (cfg.ff_mult * d * d + d)  # norm, up, down
    attn = 2 * d + 4 * d * d  # norm, q k v o without bias
    conv = 2 * d + (d * 2 * d + 2 * d) + (d * k + d) + 2 * d + (d * d + d)  # norm, pointwise, depthwise, BN, pointwise
    block = 2 * ff + attn + conv + 2 * d
    front = (9 * c + c) + (9 * c * c + c) + (c * ConvSubsampling.out_size(n_mels) * d + d)
    return front + cfg.n_layers * block + d * num_labels + num_labels


def test_conformer_shapes_parameter_count_and_both_inputs():
    cfg, feats = ConformerConfig(dim=32, n_layers=2, n_heads=4, subsample_channels=8), AudioFeatureConfig()
    torch.manual_seed(0)
    model = ConformerClassifier(cfg, feats, 8000, num_labels=10).eval()
    assert model.num_params() == _expected_params(cfg, feats.n_mels, 10)
    wave = torch.randn(3, 8000) * 0.1
    labels = torch.tensor([0, 4, 9])
    out = model(input_values=wave, labels=labels)
    assert out.logits.shape == (3, 10) and out.loss.shape == () and torch.isfinite(out.loss)
    features = model.log_mel(wave)
    assert features.shape == (3, 101, feats.n_mels)
    torch.testing.assert_close(model(input_features=features).logits, out.logits)
    assert model.subsample(features).shape == (3, ConvSubsampling.out_size(101), 32) == (3, 24, 32)
    masked = model(input_values=wave, feature_mask=torch.ones(3, 101, feats.n_mels, dtype=torch.bool)).logits
    assert not torch.allclose(masked, out.logits)  # SpecAugment's mask reaches the features
    with pytest.raises(ValueError, match="exactly one"):
        model(input_values=wave, input_features=features)
    out.loss.backward()  # every parameter takes part
    assert all(p.grad is not None for p in model.parameters())


def test_shipped_config_builds_a_model_of_the_documented_size():
    cfg = SpeechConfig()
    model = ConformerClassifier(cfg.model, cfg.features, cfg.data.sample_rate, 10)
    assert model.num_params() == _expected_params(cfg.model, cfg.features.n_mels, 10)


# ---- entry point ----------------------------------------------------------------------------------------------------
def test_debug_profile_trains_evaluates_and_writes_metrics_in_seconds(tmp_path, capsys):
    main(["--debug", "--out_dir", str(tmp_path), "--train.device", "cpu", "--train.logger", "none"])
    run_dir = tmp_path / "speech-debug"
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["steps"] == 20 and result["augment"] is True
    assert result["eval_noisy"]["snr_db"] == 10.0
    for split in ("eval", "val", "eval_noisy"):  # eval = the held-out test voices
        assert set(result[split]) >= {"accuracy", "macro_f1", "per_class", "confusion_matrix", "loss"}
    assert result["eval"]["num_examples"] == result["data"]["test"]
    assert json.loads((run_dir / "label_map.json").read_text())["labels"] == list(WORDS)
    assert (run_dir / "config.yaml").is_file() and "ex/s" in capsys.readouterr().out


def _losses(run_dir) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_resume_continues_exactly_augmentation_included(tmp_path):
    """Losing the last checkpoint and resuming from step 3 retraces steps 4-6 exactly: weights, optimizer, data
    position and the augmentation drawn for each batch all come back."""
    args = ["--debug", *FAST, "--train.max_steps", "6", "--train.save_every", "3", "--train.keep_checkpoints", "0"]
    main([*args, "--out_dir", str(tmp_path)])
    run_dir = tmp_path / "speech-debug"
    whole = _losses(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-000006")
    main([*args, "--out_dir", str(tmp_path), "--train.resume", "auto"])
    retraced = _losses(run_dir)[-3:]
    assert [s for s, _ in retraced] == [4, 5, 6]
    assert [loss for _, loss in retraced] == pytest.approx([loss for _, loss in whole[3:]], rel=1e-6)


@pytest.mark.slow
def test_shipped_recipe_hears_new_voices(tmp_path):
    """The quality bar on the builtin set, shortened to 400 steps (~1 min on one core): held-out voices >= 0.85,
    clean and in noise at 10 dB SNR (the full 600-step recipe reaches 0.988 and 0.944)."""
    recipe = str(CONFIGS / "speech.yaml")
    main(["--config", recipe, "--out_dir", str(tmp_path), "--train.max_steps", "400", *FAST[:4]])
    result = json.loads((tmp_path / "speech" / "metrics.json").read_text())
    assert result["eval"]["accuracy"] >= 0.85 and result["eval_noisy"]["accuracy"] >= 0.85


def test_early_stopping_ends_with_the_best_checkpoint_and_scores_it(tmp_path):
    """The first evaluation is the best and no later one beats it by 1e9: the run stops at the second, and the final
    validation score is the first evaluation's (the whole validation set both times, the same weights)."""
    stop = ["--train.early_stopping.enabled", "true", "--train.early_stopping.patience", "1",
            "--train.early_stopping.min_delta", "1e9", "--train.eval_every", "3"]  # fmt: skip
    main(["--debug", *FAST, *stop, "--out_dir", str(tmp_path)])
    run_dir = tmp_path / "speech-debug"
    result = json.loads((run_dir / "metrics.json").read_text())
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and result["steps"] == 6
    assert result["weights"] == "of the best checkpoint, step 3 (early stopping)"
    assert result["val"]["accuracy"] == evals[0]["eval_accuracy"]
    assert result["val"]["loss"] == pytest.approx(evals[0]["eval_loss"], abs=1e-6)
    assert (run_dir / "checkpoints" / "best").read_text().strip() == "step-000003"
