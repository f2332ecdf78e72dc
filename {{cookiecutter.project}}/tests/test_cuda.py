"""On a CUDA GPU (skipped elsewhere; ``make gpu-check`` runs them): bf16 tracks fp32, compiled pre-training runs again
and again without a crash, QLoRA trains, and the benchmark records memory."""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys

import pytest
import torch

from {{ cookiecutter.package }} import bench, finetune
from {{ cookiecutter.package }}.config import LoraSettings, ModelConfig, OptimConfig, TrainConfig
from {{ cookiecutter.package }}.config.finetune import FinetuneConfig, FinetuneDataConfig
from {{ cookiecutter.package }}.data.corpus import TokenWindows
from {{ cookiecutter.package }}.model.lm import LlamaLM
from {{ cookiecutter.package }}.train.optim import build_optimizer
from {{ cookiecutter.package }}.train.step import train_step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_loss_within_one_percent_of_fp32_after_50_steps(pattern_tokens):
    torch.manual_seed(0)
    fp32 = LlamaLM(ModelConfig(vocab_size=96, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)).cuda()
    models = {"fp32": fp32, "bf16": copy.deepcopy(fp32)}
    autocasts = {"fp32": contextlib.nullcontext(), "bf16": torch.autocast("cuda", dtype=torch.bfloat16)}
    final = {}
    for name, model in models.items():
        source = TokenWindows(pattern_tokens, 16, 64, seed=0)
        opt = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=5))
        losses = []
        for step in range(50):
            batch = {k: v.cuda() for k, v in source.next_batch().items()}
            result = train_step(model, [batch], opt, None, grad_clip=1.0, autocast=autocasts[name], step=step)
            losses.append(result.loss)
        final[name] = torch.stack(losses[-5:]).mean().item()
    assert final["fp32"] < 3.0  # it learned the pattern (log 96 = 4.56 at the start)
    assert abs(final["bf16"] - final["fp32"]) <= 0.01 * final["fp32"], final


@pytest.mark.slow
def test_five_compiled_pretrain_runs_in_a_row(pretrain_args, subprocess_env, package_name):
    # The crashes this guards against (a segfault, aot_autograd "invalid shape dimension") came and went between runs.
    for i in range(5):
        args = [*pretrain_args, "--name", f"compiled-{i}", "--train.device", "cuda", "--train.compile", "always"]
        args += ["--train.precision", "bf16"]
        proc = subprocess.run(
            [sys.executable, "-m", f"{package_name}.pretrain", *args],
            env=subprocess_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"run {i}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert "compile: on" in proc.stdout and "compiling:" in proc.stdout


def test_qlora_trains(tmp_path, ft_hf_dir):
    pytest.importorskip("bitsandbytes", reason='QLoRA needs pip install -e ".[qlora]"')
    data = tmp_path / "sft.jsonl"
    pairs = [("Colour of the sky?", "blue"), ("Colour of grass?", "green"), ("Colour of snow?", "white")] * 8
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    cfg = FinetuneConfig(
        task="sft",
        base_model=str(ft_hf_dir),
        name="qlora",
        out_dir=str(tmp_path / "runs"),
        lora=LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["all-linear"], qlora=True),
        data=FinetuneDataConfig(path=str(data), val_fraction=0.2, max_seq_len=64),
        optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0, weight_decay=0.0),
        train=TrainConfig(max_steps=12, batch_size=4, log_every=1, eval_every=0, save_every=0, device="cuda"),
    )
    finetune.run(cfg)
    metrics = (tmp_path / "runs" / "qlora" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in metrics]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < losses[0] - 0.5


def test_bench_records_peak_step_memory(capsys):
    tiny = ["--layers", "1", "--dim", "64", "--heads", "4", "--kv-heads", "2", "--seq-len", "32"]
    bench.main(["pretrain", *tiny, "--batch-size", "4", "--vocab-size", "256", "--device", "cuda", "--steps", "2"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    for row in rows[:2]:
        assert row["device"].startswith("cuda") and row["peak_step_mem_mib"] > 0 and row["mfu"] > 0
