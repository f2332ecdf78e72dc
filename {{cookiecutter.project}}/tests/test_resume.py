"""Resume is exact: 2N steps straight == N steps, a kill, a resume and N more steps (same losses, on CPU), also when
the newest checkpoint is damaged and an older intact one is taken; metrics.jsonl then reads like one straight run."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from {{ cookiecutter.package }} import pretrain
from {{ cookiecutter.package }}.config import ConfigError, OptimConfig
from {{ cookiecutter.package }}.config.finetune import FinetuneConfig
from {{ cookiecutter.package }}.data.corpus import EvalWindows, TokenWindows
from {{ cookiecutter.package }}.model.lm import LlamaLM
from {{ cookiecutter.package }}.runtime import check_resume_labels, resolve_start
from {{ cookiecutter.package }}.train.distributed import get_rank, get_world_size
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


class Recorded:
    """A BatchSource that notes the window starts of every batch it hands out, in order."""

    def __init__(self, source: TokenWindows, starts: list[list[int]]):
        self.source, self.starts = source, starts

    def next_batch(self):
        self.starts.append(self.source.window_starts())
        return self.source.next_batch()

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


def _fit(run_dir, model_cfg, cfg, tokens, *, stop_after=None, seed=0, mode="random", record=None):
    """fit() on this process's rank of the process group (or alone), from the run's newest checkpoint if any."""
    torch.manual_seed(seed)
    model = LlamaLM(model_cfg)
    ranks = {"rank": get_rank(), "world_size": get_world_size()}
    source = TokenWindows(tokens, cfg.batch_size, 16, seed=0, mode=mode, **ranks)
    if record is not None:
        source = Recorded(source, record)
    if stop_after is not None:
        source = StopAfter(source, stop_after)
    val = EvalWindows(tokens, 2, 16, num_batches=2, **ranks)
    resume_from = resolve_start(run_dir, dataclasses.replace(cfg, resume="auto"))  # once, before fit, as runtime does
    return fit(
        DistributedDataParallel(model) if ranks["world_size"] > 1 else model,
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


def test_pretrain_refuses_to_resume_a_data_position_of_another_seq_len(tmp_path, pretrain_args, capsys):
    pretrain.main([*pretrain_args, "--train.max_steps", "4"])  # checkpoint at step 4, seq_len 32
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        pretrain.main([*pretrain_args, "--data.seq_len", "16", "--train.resume", "auto"])
    err = capsys.readouterr().err.splitlines()
    assert refused.value.code == 2
    assert re.fullmatch(
        r"error: the checkpoint's data position is for data.sampling='random', train.seed=(\d+), data.seq_len=32, "
        r"but this run has 'random', \1, 16: resume with the checkpoint's settings",
        err[-1],
    )
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000004"]  # nothing written


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


# ----------------------------------------------------------------------------------------------------------------------
# Sequential sampling across world sizes: 2 ranks -> 1 and 1 -> 2 with the same global batch


def _fit_on_rank(rank: int, world: int, store: str, args: tuple, kwargs: dict, out: Path) -> None:
    """_fit on gloo rank ``rank`` of ``world`` (a process of its own); its window starts and losses go to a file."""
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=120)  # a rank that never arrives fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timeout)
    starts: list[list[int]] = []
    try:
        losses = [r["loss"] for r in _fit(*args, **kwargs, record=starts)]
    except KeyboardInterrupt:  # the simulated kill
        losses = []
    (out / f"rank{rank}.json").write_text(json.dumps({"starts": starts, "losses": losses}))
    os._exit(0)  # no teardown: freeing a gloo group can deadlock (see test_distributed)


def _on_two_ranks(tmp_path: Path, name: str, *args, **kwargs) -> list[dict]:
    out = tmp_path / f"{name}-out"
    out.mkdir()
    mp.spawn(_fit_on_rank, args=(2, str(tmp_path / f"{name}-store"), args, kwargs, out), nprocs=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _by_step(calls_by_rank: list[list[list[int]]], accum: int, first: int) -> dict[int, list[int]]:
    """Optimizer step -> the sorted window starts it trained on, over every rank and micro-batch."""
    steps: dict[int, list[int]] = {}
    for calls in calls_by_rank:
        for i, starts in enumerate(calls):
            steps.setdefault(first + i // accum, []).extend(starts)
    return {step: sorted(starts) for step, starts in steps.items()}


@pytest.mark.slow  # two processes of their own: 10-30 s on 2 CPU cores
@pytest.mark.parametrize("worlds", [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_sequential_resume_on_another_world_size_reads_every_window_once(
    tmp_path, tiny_model_config, tiny_train_config, pattern_tokens, worlds, capsys
):
    """Killed while drawing step 5 (checkpoint at 3), resumed on the other world size with grad_accum doubled or
    halved (global batch 4): the windows of steps 1-6 are the uninterrupted run's, step by step, none twice, and the
    losses follow the uninterrupted run's (the same mean gradient, up to float reduction order)."""
    before, after = worlds
    cfg = dataclasses.replace(tiny_train_config, batch_size=2, max_steps=6, save_every=3)
    accum = {1: 2, 2: 1}  # per world size: 2 x 2 x 1 == 2 x 1 x 2 windows a step
    straight: list[list[int]] = []
    expected = _fit(tmp_path / "straight", tiny_model_config, dataclasses.replace(cfg, grad_accum=2), pattern_tokens,
                    mode="sequential", record=straight)  # fmt: skip
    run, cfgs = tmp_path / "run", {w: dataclasses.replace(cfg, grad_accum=accum[w]) for w in (1, 2)}
    stop = {"stop_after": 4 * accum[before], "mode": "sequential"}
    if before == 2:
        killed = [r["starts"] for r in _on_two_ranks(tmp_path, "killed", run, tiny_model_config, cfgs[2],
                                                     pattern_tokens, **stop)]  # fmt: skip
        capsys.readouterr()
        resumed = [[]]
        losses = [r["loss"] for r in _fit(run, tiny_model_config, cfgs[1], pattern_tokens, mode="sequential",
                                          record=resumed[0])]  # fmt: skip
        assert "sequential sampling continues the global order at window 12" in capsys.readouterr().err
    else:
        killed = [[]]
        with pytest.raises(KeyboardInterrupt):
            _fit(run, tiny_model_config, cfgs[1], pattern_tokens, **stop, record=killed[0])
        ranks = _on_two_ranks(tmp_path, "resumed", run, tiny_model_config, cfgs[2], pattern_tokens, mode="sequential")
        resumed, losses = [r["starts"] for r in ranks], ranks[0]["losses"]

    assert len(losses) == 3  # resumed from the checkpoint of step 3: steps 4, 5, 6
    got = {s: w for s, w in _by_step(killed, accum[before], 1).items() if s <= 3} | _by_step(resumed, accum[after], 4)
    assert got == _by_step([straight], 2, 1)  # step by step, the windows of the uninterrupted run
    consumed = [w for step in got.values() for w in step]
    assert len(consumed) == len(set(consumed)) == 24  # 24 windows, none twice, none skipped
    assert losses == pytest.approx([r["loss"] for r in expected[3:]], rel=1e-4)
