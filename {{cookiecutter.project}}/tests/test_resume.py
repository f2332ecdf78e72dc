"""Resume is exact: 2N steps straight == N steps, a kill, a resume and N more steps (same losses, on CPU), also when
the newest checkpoint is damaged and an older intact one is taken; metrics.jsonl then reads like one straight run."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from {{ cookiecutter.package }} import pretrain
from {{ cookiecutter.package }}.config import ConfigError, OptimConfig
from {{ cookiecutter.package }}.config.finetune import FinetuneConfig
from {{ cookiecutter.package }}.data.corpus import EvalWindows, TokenWindows
from {{ cookiecutter.package }}.model.lm import LlamaLM
from {{ cookiecutter.package }}.runtime import check_resume_labels, resolve_start
from {{ cookiecutter.package }}.train.loop import Job, RunSetup, evaluate_loss, fit


class StopAfter:
    """A BatchSource that dies like a killed process after `n` batches (the checkpoint before it is published)."""

    def __init__(self, source, n: int):
        self.source, self.left = source, n

    def next_batch(self):
        if self.left == 0:
            raise KeyboardInterrupt("simulated kill")
        self.left -= 1
        return self.source.next_batch()

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


_WALL_CLOCK = ("tokens_per_s", "mfu", "compile_s")


def _logged(run_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl in order, without the wall-clock fields: a duplicated or left-over line shows."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in _WALL_CLOCK} for line in lines]


def _fit(run_dir, model_cfg, cfg, tokens, *, stop_after=None, seed=0):
    torch.manual_seed(seed)
    model = LlamaLM(model_cfg)
    source = TokenWindows(tokens, cfg.batch_size, 16, seed=0)
    if stop_after is not None:
        source = StopAfter(source, stop_after)
    val = EvalWindows(tokens, 2, 16, num_batches=2)
    resume_from = resolve_start(run_dir, dataclasses.replace(cfg, resume="auto"))  # once, before fit, as runtime does
    return fit(
        model,
        source,
        cfg,
        run_dir,
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        setup=RunSetup(resume_from=resume_from),
        job=Job(evaluate=lambda m: evaluate_loss(m, val, torch.device("cpu"))),
    )


def test_resume_in_process_is_exact(tmp_path, tiny_model_config, tiny_train_config, pattern_tokens):
    # Dropout on, so the restored torch RNG matters; accumulation and evaluation on, so their state does too.
    model_cfg = dataclasses.replace(tiny_model_config, dropout=0.1)
    cfg = dataclasses.replace(tiny_train_config, max_steps=8, grad_accum=2, save_every=4, eval_every=4)
    killed = tmp_path / "killed"

    straight = _fit(tmp_path / "straight", model_cfg, cfg, pattern_tokens)
    with pytest.raises(KeyboardInterrupt):
        _fit(killed, model_cfg, cfg, pattern_tokens, stop_after=6 * cfg.grad_accum)  # dies drawing step 7's batches
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert [r["step"] for r in _logged(killed)] == [1, 2, 3, 4, 5, 6]  # logged past the checkpoint: must be dropped
    resumed = _fit(killed, model_cfg, cfg, pattern_tokens, seed=123)  # other init: weights come from the checkpoint

    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[4:]]
    assert resumed[-1]["eval_loss"] == straight[-1]["eval_loss"]
    assert straight[-1]["loss"] < straight[0]["loss"]
    assert _logged(killed) == _logged(tmp_path / "straight")  # line for line, as one uninterrupted run


def test_resume_auto_skips_a_damaged_checkpoint_and_continues_exactly(
    tmp_path, tiny_model_config, tiny_train_config, pattern_tokens, damage, capsys
):
    model_cfg = dataclasses.replace(tiny_model_config, dropout=0.1)
    cfg = dataclasses.replace(tiny_train_config, max_steps=8, save_every=2, eval_every=4, keep_checkpoints=0)
    killed, ckpts = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    straight = _fit(tmp_path / "straight", model_cfg, cfg, pattern_tokens)
    with pytest.raises(KeyboardInterrupt):
        _fit(killed, model_cfg, cfg, pattern_tokens, stop_after=6)  # checkpoints 2, 4, 6, then a kill
    problem = damage(ckpts / "step-000006" / "model.safetensors")
    damaged_bytes = (ckpts / "step-000006" / "model.safetensors").read_bytes()
    capsys.readouterr()

    resumed = _fit(killed, model_cfg, cfg, pattern_tokens, seed=123)
    err = capsys.readouterr().err.splitlines()
    (skipped,) = [line for line in err if "damaged" in line]
    assert re.fullmatch(rf"skipping damaged checkpoint {re.escape(str(ckpts / 'step-000006'))}: {problem}", skipped)
    assert f"resumed from {ckpts / 'step-000004'} at step 4" in err
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[4:]]
    assert _logged(killed) == _logged(tmp_path / "straight")
    (aside,) = ckpts.glob("step-000006.damaged-*")  # step 6 was saved again; the damaged one was kept, not deleted
    assert (aside / "model.safetensors").read_bytes() == damaged_bytes


def test_resume_auto_without_an_intact_checkpoint_starts_fresh_and_keeps_the_damaged_ones(
    tmp_path, tiny_model_config, tiny_train_config, pattern_tokens, capsys
):
    cfg = dataclasses.replace(tiny_train_config, max_steps=4, save_every=2)
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    straight = _fit(run_dir, tiny_model_config, cfg, pattern_tokens)
    for step in (2, 4):
        (ckpts / f"step-{step:06d}" / "trainer.pt").write_bytes(b"")
    capsys.readouterr()

    again = _fit(run_dir, tiny_model_config, cfg, pattern_tokens)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err if "damaged" in line] == [
        f"skipping damaged checkpoint {ckpts / 'step-000004'}",
        f"skipping damaged checkpoint {ckpts / 'step-000002'}",
    ]
    assert f"no intact checkpoint in {ckpts}: starting from step 0" in err
    assert [r["loss"] for r in again] == [r["loss"] for r in straight]
    assert len(list(ckpts.glob("step-00000[24].damaged-*"))) == 2
    assert [r["step"] for r in _logged(run_dir)] == [1, 2, 3, 4]


def test_pretrain_refuses_a_named_damaged_checkpoint_and_auto_falls_back(tmp_path, pretrain_args, damage, capsys):
    pretrain.main(pretrain_args)  # 8 steps, checkpoints at 4 and 8
    run_dir = tmp_path / "runs" / "tiny"
    newest, older = run_dir / "checkpoints" / "step-000008", run_dir / "checkpoints" / "step-000004"
    straight = _logged(run_dir)
    problem = damage(newest / "model.safetensors")
    capsys.readouterr()

    with pytest.raises(SystemExit) as refused:
        pretrain.main([*pretrain_args, "--train.resume_from", str(newest)])
    err = capsys.readouterr().err.splitlines()
    assert refused.value.code == 2 and len(err) == 1
    assert re.fullmatch(rf"error: damaged checkpoint {re.escape(str(newest))}: {problem} \(.+\)", err[0])

    pretrain.main([*pretrain_args, "--train.resume", "auto"])
    err = capsys.readouterr().err.splitlines()
    (skipped,) = [line for line in err if "damaged" in line]  # once: the run resolves its resume point once
    assert re.fullmatch(rf"skipping damaged checkpoint {re.escape(str(newest))}: {problem}", skipped)
    assert f"resumed from {older} at step 4" in err
    assert _logged(run_dir) == straight


def test_a_resumed_run_hashes_its_checkpoint_once(tmp_path, pretrain_args, monkeypatch):
    from {{ cookiecutter.package }}.train import manifest

    pretrain.main([*pretrain_args, "--train.max_steps", "4"])  # checkpoint at step 4
    hashed = []
    original = manifest._sha256
    monkeypatch.setattr(manifest, "_sha256", lambda path: hashed.append(path) or original(path))
    pretrain.main([*pretrain_args, "--train.resume", "auto"])  # resolves step 4 (hashing it), then loads it
    resumed = tmp_path / "runs" / "tiny" / "checkpoints" / "step-000004"
    assert sorted(p.name for p in hashed if p.parent == resumed) == ["model.safetensors", "trainer.pt"]


@pytest.mark.slow
def test_pretrain_cli_exits_2_on_a_named_damaged_checkpoint(tmp_path, pretrain_args, subprocess_env, package_name):
    pretrain.main(pretrain_args)
    newest = tmp_path / "runs" / "tiny" / "checkpoints" / "step-000008"
    size = (newest / "model.safetensors").stat().st_size
    (newest / "model.safetensors").write_bytes(b"")
    cmd = [sys.executable, "-m", f"{package_name}.pretrain", *pretrain_args, "--train.resume_from", str(newest)]
    proc = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: damaged checkpoint {newest}: model.safetensors is 0 bytes, manifest says {size} (resume from another "
        "checkpoint; --train.resume auto takes the newest intact one of the run)"
    ]
    assert (newest / "model.safetensors").stat().st_size == 0  # left as it was


def test_finetune_label_check_refuses_a_named_damaged_checkpoint(tmp_path, tiny_model):
    from {{ cookiecutter.package }}.train import checkpoint as ckpt

    run_dir = tmp_path / "runs" / "ft"
    path = ckpt.save_checkpoint(run_dir / "checkpoints", 3, tiny_model, extra={"labels": ["neg", "pos"]})
    cfg = FinetuneConfig(task="classify", name="ft", out_dir=str(tmp_path / "runs"))
    cfg.train.resume_from = str(path)
    check_resume_labels(resolve_start(run_dir, cfg.train), ["neg", "pos"])  # intact, same labels: accepted
    with pytest.raises(ConfigError, match=r"checkpoint labels \['neg', 'pos'\] differ from the data's labels"):
        check_resume_labels(resolve_start(run_dir, cfg.train), ["pos", "neg"])
    (path / ckpt.TRAINER_FILE).write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"^damaged checkpoint {re.escape(str(path))}: trainer.pt is 0 bytes"):
        check_resume_labels(resolve_start(run_dir, cfg.train), ["neg", "pos"])


@pytest.mark.slow
def test_resume_after_sigkill_subprocess(tmp_path, pretrain_args, subprocess_env, package_name, capsys):
    """A real process, SIGKILLed right after its first checkpoint, then `--train.resume auto`.

    The straight and the resumed run are in-process (one thread, like the child) to keep the test short."""
    steps = 40
    args = [*pretrain_args, "--train.max_steps", str(steps), "--train.save_every", "5", "--train.eval_every", "0"]
    args += ["--sample.max_new_tokens", "1", "--train.keep_checkpoints", "0"]
    cmd = [sys.executable, "-m", f"{package_name}.pretrain", *args]
    runs = tmp_path / "runs"

    pretrain.main([*args, "--name", "straight"])  # in-process: same code, same single thread, one import less

    proc = subprocess.Popen(
        [*cmd, "--name", "killed"], env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    latest = runs / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = int(latest.read_text().strip().split("-")[1])
    assert 5 <= killed_at < steps

    capsys.readouterr()
    pretrain.main([*args, "--name", "killed", "--train.resume", "auto"])  # resume in-process (one import less)
    assert f"resumed from {runs / 'killed' / 'checkpoints' / f'step-{killed_at:06d}'}" in capsys.readouterr().err

    expected, got = _logged(runs / "straight"), _logged(runs / "killed")
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # no line of the killed run left over or doubled
    assert got == expected  # bit-identical on CPU
