"""Resume is exact: 2N steps straight == N steps, a kill, a resume and N more steps (same losses, on CPU)."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from {{ cookiecutter.package }} import pretrain
from {{ cookiecutter.package }}.config import OptimConfig
from {{ cookiecutter.package }}.data.corpus import EvalWindows, TokenWindows
from {{ cookiecutter.package }}.model.lm import LlamaLM
from {{ cookiecutter.package }}.train.loop import evaluate_loss, fit


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


def test_resume_in_process_is_exact(tmp_path, tiny_model_config, tiny_train_config, pattern_tokens):
    # Dropout on, so the restored torch RNG matters; accumulation and evaluation on, so their state does too.
    model_cfg = dataclasses.replace(tiny_model_config, dropout=0.1)
    cfg = dataclasses.replace(tiny_train_config, max_steps=8, grad_accum=2, save_every=4, eval_every=4)
    optim = OptimConfig(lr=3e-3, warmup_steps=2)
    val = EvalWindows(pattern_tokens, 2, 16, num_batches=2)

    def run(run_dir, stop_after=None, seed=0):
        torch.manual_seed(seed)
        model = LlamaLM(model_cfg)
        source = TokenWindows(pattern_tokens, cfg.batch_size, 16, seed=0)
        if stop_after is not None:
            source = StopAfter(source, stop_after)
        return fit(
            model,
            source,
            cfg,
            run_dir,
            optim=optim,
            evaluate=lambda m: evaluate_loss(m, val, torch.device("cpu")),
            resume="auto",
            progress=False,
        )

    straight = run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", stop_after=4 * cfg.grad_accum)  # dies while drawing step 5's batches
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step-000004"
    resumed = run(tmp_path / "killed", seed=123)  # different init: the weights must come from the checkpoint

    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[4:]]
    assert resumed[-1]["eval_loss"] == straight[-1]["eval_loss"]
    assert straight[-1]["loss"] < straight[0]["loss"]
    # metrics.jsonl of the resumed run reads like one uninterrupted run
    logged = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 9))
    assert [r["loss"] for r in logged] == [r["loss"] for r in straight]


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


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

    expected, got = _losses(runs / "straight"), _losses(runs / "killed")
    assert sorted(got) == list(range(1, steps + 1))
    assert got == expected  # bit-identical on CPU
