"""The config system: YAML + command line -> validated dataclasses, one-line errors, debug profile, shipped configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from {{ cookiecutter.package }}.config import (
    DataConfig,
    DebugConfig,
    FinetuneConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    SampleConfig,
    TrainConfig,
    apply_debug_profile,
    config_to_dict,
    load_config,
    parse_config,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_without_arguments():
    cfg, dbg = parse_config(PretrainConfig, [])
    assert cfg == PretrainConfig()
    assert dbg == DebugConfig()


def test_yaml_then_command_line_precedence(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("name: from-yaml\ntrain:\n  max_steps: 7\n  batch_size: 3\noptim:\n  betas: [0.8, 0.9]\n")
    cfg, _ = parse_config(PretrainConfig, ["--config", str(yaml_file), "--train.max_steps", "20"])
    assert cfg.name == "from-yaml"
    assert cfg.train.max_steps == 20  # command line wins
    assert cfg.train.batch_size == 3  # from the file
    assert cfg.train.grad_accum == TrainConfig().grad_accum  # untouched default
    assert cfg.optim.betas == (0.8, 0.9)
    assert isinstance(cfg.train, TrainConfig) and isinstance(cfg.model, ModelConfig)


def test_debug_flags_are_top_level():
    argv = ["--debug", "--debugpy", "0.0.0.0:5678", "--wait-for-client", "--no-debugpy-all-ranks"]
    argv += ["--pycharm-debug", "localhost:9000", "--break-on-nonfinite"]
    cfg, dbg = parse_config(PretrainConfig, argv)
    assert dbg == DebugConfig(
        debug=True,
        debugpy="0.0.0.0:5678",
        wait_for_client=True,
        debugpy_all_ranks=False,
        pycharm_debug="localhost:9000",
        break_on_nonfinite=True,
    )
    assert cfg == PretrainConfig()  # debug flags do not leak into the run config


def _all_options(cls, prefix=""):
    for f in dataclasses.fields(cls):
        value = getattr(cls(), f.name)
        if dataclasses.is_dataclass(value):
            yield from _all_options(type(value), f"{prefix}{f.name}.")
        else:
            yield f"--{prefix}{f.name}", value


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(PretrainConfig, ["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for option, _default in _all_options(PretrainConfig):
        assert option in out, option
    for flag in ("--debug", "--debugpy", "--wait-for-client", "--debugpy-all-ranks", "--pycharm-debug"):
        assert flag in out
    assert "default: 1000" in out  # train.max_steps
    assert "default: 0.0003" in out  # optim.lr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--train.max_stepz", "3"], "unrecognized arguments: --train.max_stepz"),
        (["--train.max_steps", "many"], 'Parser key "train.max_steps"'),
        (["--train.precision", "fp16"], "train.precision"),
        (["--train.max_steps", "0"], "train.max_steps=0 is invalid"),
        (["--data.seq_len", "512", "--model.max_seq_len", "256"], "data.seq_len=512 exceeds model.max_seq_len=256"),
        (["--optim.min_lr", "1.0", "--optim.lr", "0.1"], "optim.min_lr"),
        (["--config", "does-not-exist.yaml"], "does-not-exist.yaml"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(PretrainConfig, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in err


def test_unknown_key_in_yaml_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_config(PretrainConfig, ["--config", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_stepz" in err


def test_save_and_load_round_trip(tmp_path):
    cfg = PretrainConfig(
        name="x",
        model=ModelConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128),
        data=DataConfig(path="corpus.txt", seq_len=64),
        optim=OptimConfig(lr=1e-3, betas=(0.8, 0.99)),
        train=TrainConfig(max_steps=5, resume="auto", precision="fp32"),
        sample=SampleConfig(prompts=["A\n", "B"], top_k=None),
    )
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(PretrainConfig, path) == cfg
    assert config_to_dict(cfg)["optim"]["betas"] == [0.8, 0.99]  # plain lists, loadable with weights_only


def test_debug_profile_is_a_small_deterministic_copy():
    cfg = PretrainConfig(train=TrainConfig(max_steps=5000, batch_size=64, grad_accum=8, compile=True))
    dbg = apply_debug_profile(cfg)
    assert cfg.train.max_steps == 5000 and cfg.name == "pretrain"  # original untouched
    assert dbg.name == "pretrain-debug"
    assert dbg.model.dim <= 64 and dbg.model.n_layers <= 2
    assert dbg.data.seq_len <= dbg.model.max_seq_len
    t = dbg.train
    assert (t.max_steps, t.grad_accum, t.eval_every, t.precision) == (20, 1, 1, "fp32")
    assert t.deterministic and t.detect_anomaly and not t.compile and t.overwrite
    assert not hasattr(dbg.data, "num_workers")  # pre-training reads a memmap in-process: no workers to turn off
    assert apply_debug_profile(dbg) == dbg  # idempotent


def test_debug_profile_applies_to_finetune_config():
    cfg = FinetuneConfig()
    dbg = apply_debug_profile(cfg)
    assert dbg.name == f"{cfg.name}-debug" and dbg.train.max_steps <= 20 and dbg.data.num_workers == 0
    assert dbg.base_model == cfg.base_model


@pytest.mark.parametrize("name", ["pretrain.yaml", "pretrain-debug.yaml"])
def test_shipped_pretrain_configs_parse(name):
    cfg, _ = parse_config(PretrainConfig, ["--config", str(CONFIGS / name)])
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    assert cfg.train.max_steps >= 1
    if name == "pretrain-debug.yaml":
        # small enough for the < 1 minute CPU budget
        assert cfg.model.dim <= 64 and cfg.train.max_steps <= 50 and cfg.model.vocab_size <= 1024
