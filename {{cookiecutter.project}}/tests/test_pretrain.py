"""The pretrain entry point end to end: outputs, TensorBoard, HF export, --debug, and every bad-input path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from {{ cookiecutter.package }} import pretrain
from {{ cookiecutter.package }}.config import load_config
from {{ cookiecutter.package }}.config.pretrain import PretrainConfig
from {{ cookiecutter.package }}.debug import INJECT_NAN_ENV
from {{ cookiecutter.package }}.model.lm import LlamaLM
from {{ cookiecutter.package }}.train import checkpoint as ckpt

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(argv)
    return exit_info.value.code


def test_tiny_run_writes_everything(tmp_path, pretrain_args, capsys):
    pretrain.main([*pretrain_args, "--export_hf", "true", "--train.logger", "tensorboard"])
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "tiny"

    # The resolved config is printed and saved, and reproduces the run.
    assert "max_steps: 8" in out
    cfg = load_config(PretrainConfig, run_dir / "config.yaml")
    assert cfg.train.max_steps == 8 and cfg.model.dim == 32 and cfg.export_hf

    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu"} <= metrics[0].keys()
    assert all(m["mfu"] > 0 for m in metrics)
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evals] == [4, 8]
    assert evals[-1]["eval_perplexity"] == pytest.approx(torch.tensor(evals[-1]["eval_loss"]).exp().item(), rel=1e-4)
    assert "--- sample 0 (step 8) ---" in out

    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step-000004", "step-000008"]
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu"} <= tags
    assert {"eval/loss", "eval/perplexity"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))

    # The transformers export computes what the final checkpoint computes.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    ours = LlamaLM(cfg.model)
    ckpt.load_checkpoint(run_dir / "checkpoints" / "step-000008", ours, restore_rng=False)
    ids = torch.randint(0, cfg.model.vocab_size, (1, 12))
    torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)


def _without_options(argv: list[str], *options: str) -> list[str]:
    pairs = zip(argv[::2], argv[1::2], strict=True)  # pretrain_args: every option takes one value
    return [token for pair in pairs if pair[0] not in options for token in pair]


@pytest.mark.parametrize("debug_first", [False, True])
def test_debug_profile(tmp_path, pretrain_args, debug_first):
    # The profile sets evaluation, logging and checkpoints; the explicit --train.max_steps 8 beats its 20 steps.
    args = _without_options(pretrain_args, "--train.eval_every", "--train.save_every", "--train.log_every")
    argv = ["--debug", *args] if debug_first else [*args, "--debug"]
    try:
        pretrain.main(argv)
        assert torch.are_deterministic_algorithms_enabled()
        pretrain.main(argv)  # re-running the debug profile replaces it instead of refusing
    finally:
        torch.use_deterministic_algorithms(False)
    run_dir = tmp_path / "runs" / "tiny-debug"  # never the real run's directory
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 9)) and all("eval_loss" in m for m in metrics)
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step-000008"]  # at the end only
    t = load_config(PretrainConfig, run_dir / "config.yaml").train
    assert (t.max_steps, t.precision, t.deterministic, t.detect_anomaly, t.compile) == (8, "fp32", True, True, "never")
    assert not (tmp_path / "runs" / "tiny").exists()


def test_missing_data_source(tmp_path, pretrain_args, capsys):
    assert _exit_code([*pretrain_args, "--data.source", str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data: ") and "nope.txt" in err and err.count("\n") == 0
    assert not (tmp_path / "runs" / "tiny" / "config.yaml").exists()


def test_prepare_only_fills_the_cache_that_training_reuses(tmp_path, pretrain_args, capsys):
    args = [*pretrain_args, "--data.cache_dir", str(tmp_path / "cache")]
    pretrain.main([*args, "--data.prepare_only", "true"])
    out = capsys.readouterr().out
    assert "cached in" in out and not (tmp_path / "runs").exists()  # no run directory, no model
    assert len(list((tmp_path / "cache").glob("tokens-*/meta.json"))) == 1
    pretrain.main(args)
    assert "reused from" in capsys.readouterr().out


def test_vocab_size_too_small_for_the_tokenizer(tmp_path, pretrain_args, capsys):
    assert _exit_code([*pretrain_args, "--data.vocab_size", "320", "--model.vocab_size", "300"]) == 2
    err = capsys.readouterr().err
    assert "model.vocab_size=300 is smaller than the tokenizer's vocabulary" in err and "Traceback" not in err


def test_refuses_to_overwrite_an_existing_run(tmp_path, pretrain_args, capsys):
    pretrain.main([*pretrain_args, "--train.max_steps", "4"])
    latest = ckpt.latest_checkpoint(tmp_path / "runs" / "tiny" / "checkpoints")
    before = (latest / ckpt.MODEL_FILE).read_bytes()
    capsys.readouterr()
    assert _exit_code([*pretrain_args, "--train.max_steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "already has checkpoints" in err and "--train.resume auto" in err
    assert (latest / ckpt.MODEL_FILE).read_bytes() == before
    # resuming a finished run trains nothing and keeps the checkpoint
    pretrain.main([*pretrain_args, "--train.max_steps", "4", "--train.resume", "auto", "--export_hf", "false"])
    assert (latest / ckpt.MODEL_FILE).read_bytes() == before


def test_bad_resume_path(tmp_path, pretrain_args, capsys):
    assert _exit_code([*pretrain_args, "--train.resume_from", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "train.resume_from=" in err and "no complete checkpoint" in err
    assert _exit_code([*pretrain_args, "--train.resume_from", "auto"]) == 2  # a directory named auto, not the keyword
    assert "no complete checkpoint" in capsys.readouterr().err


def test_non_finite_loss_stops_before_any_bad_checkpoint(tmp_path, pretrain_args, monkeypatch, capsys):
    monkeypatch.setenv(INJECT_NAN_ENV, "layers.0.mlp:6")  # a NaN in the forward of step 6 (1-based, as logged)
    assert _exit_code([*pretrain_args, "--train.save_every", "2", "--train.eval_every", "0"]) == 1
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "non-finite loss (nan) at step 6" in error_lines[0] and "Traceback" not in err
    root = tmp_path / "runs" / "tiny" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000002", "step-000004"]
    model = LlamaLM(load_config(PretrainConfig, tmp_path / "runs" / "tiny" / "config.yaml").model)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(root), model, restore_rng=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cli_errors_are_one_line_without_traceback(pretrain_args, subprocess_env, package_name):
    cmd = [sys.executable, "-m", f"{package_name}.pretrain", *pretrain_args, "--train.max_stepz", "3"]
    proc = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unrecognized arguments: --train.max_stepz 3"]
    assert proc.stdout == ""


@pytest.mark.slow
def test_shipped_config_under_debug_runs_on_the_embedded_corpus(tmp_path, data_cache_dir, capsys):
    argv = ["--config", str(CONFIGS / "pretrain.yaml"), "--debug", "--out_dir", str(tmp_path / "runs")]
    try:
        pretrain.main([*argv, "--data.cache_dir", str(data_cache_dir), "--train.max_steps", "10"])
    finally:
        torch.use_deterministic_algorithms(False)
    assert "built-in Shakespeare corpus" in capsys.readouterr().out
    run_dir = tmp_path / "runs" / "pretrain-debug"
    assert (run_dir / "hf" / "config.json").is_file()
    metrics = _metrics(run_dir)
    assert len(metrics) == 10 and metrics[-1]["loss"] < metrics[0]["loss"]


def test_written_out_attention_trains_like_sdpa(tmp_path, pretrain_args):
    """`--model.attention written_out` through the whole pipeline (config, training, evaluation, sampling, the
    checkpoint): every logged loss equals the SDPA run's, so a learner stepping through the formula sees the run
    they would have had anyway."""
    losses = {}
    for attention in ("sdpa", "written_out"):
        name = f"tiny-{attention}"
        pretrain.main([*pretrain_args, "--name", name, "--model.attention", attention])
        run_dir = tmp_path / "runs" / name
        assert load_config(PretrainConfig, run_dir / "config.yaml").model.attention == attention
        losses[attention] = [m[key] for m in _metrics(run_dir) for key in ("loss", "eval_loss") if key in m]
    assert len(losses["sdpa"]) == 8 + 2  # every step, and the evaluations at steps 4 and 8
    assert losses["written_out"] == pytest.approx(losses["sdpa"], rel=1e-4)
