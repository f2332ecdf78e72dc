"""AdamW parameter groups and kernels; warmup + cosine schedule and its saved state."""

from __future__ import annotations

import io
import math

import pytest
import torch

from {{ cookiecutter.package }}.config import OptimConfig
from {{ cookiecutter.package }}.train.optim import WarmupCosine, build_optimizer, build_scheduler, param_groups


def test_weight_decay_only_on_matrices(tiny_model):
    groups = param_groups(tiny_model, weight_decay=0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    norm_ids = {id(m.weight) for name, m in tiny_model.named_modules() if name.endswith("norm")}
    assert norm_ids and norm_ids <= {id(p) for p in no_decay["params"]}
    # Tied embedding / lm_head counted once; every trainable parameter is in exactly one group.
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(tiny_model.parameters()))


def test_frozen_parameters_are_left_out(tiny_model):
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    tiny_model.norm.weight.requires_grad_(True)
    groups = param_groups(tiny_model, 0.1)
    assert [p for g in groups for p in g["params"]] == [tiny_model.norm.weight]
    tiny_model.norm.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(tiny_model, 0.1)


def test_fused_by_default_on_cpu_with_config_values(tiny_model):
    opt = build_optimizer(tiny_model, OptimConfig(lr=1e-3, betas=(0.8, 0.9), eps=1e-7, weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert group["fused"] is True and not group["foreach"]
    assert getattr(opt, "_step_supports_amp_scaling", False)  # takes found_inf: train_step skips on the device
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.8, 0.9), 1e-7, 0.05)
    opt = build_optimizer(tiny_model, OptimConfig(fused="never"))
    assert opt.param_groups[0]["foreach"] is True and not opt.param_groups[0]["fused"]


def test_foreach_with_a_notice_where_torch_has_no_fused_kernel(tiny_model, monkeypatch, capsys):
    real = torch.optim.AdamW

    def no_fused(params, **kwargs):
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    opt = build_optimizer(tiny_model, OptimConfig())
    assert opt.param_groups[0]["foreach"] is True
    assert "no fused AdamW" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="fused=True"):
        build_optimizer(tiny_model, OptimConfig(fused="always"))  # asked for explicitly: no silent fallback


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_uses_fused(tiny_model):
    opt = build_optimizer(tiny_model.cuda(), OptimConfig())
    assert opt.param_groups[0]["fused"] is True


def test_warmup_then_cosine_to_min_lr():
    fn = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    warm = [fn(s) for s in range(11)]
    assert all(a < b for a, b in zip(warm, warm[1:10], strict=False))  # strictly rising during warmup
    assert fn(0) > 0 and fn(10) == pytest.approx(1.0)
    assert fn(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay: cosine at pi/2
    decay = [fn(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert fn(110) == pytest.approx(0.1) and fn(500) == pytest.approx(0.1)  # floor, flat after the end


def test_scheduler_drives_the_optimizer_lr(tiny_model):
    cfg = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2)
    opt = build_optimizer(tiny_model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[2] == pytest.approx(1e-2) and lrs[10] == pytest.approx(1e-3) and lrs[11] == pytest.approx(1e-3)
    assert all(g["lr"] == opt.param_groups[0]["lr"] for g in opt.param_groups)  # both groups follow the schedule


def test_scheduler_state_survives_weights_only_round_trip(tiny_model):
    cfg = OptimConfig(lr=1e-2, min_lr=0.0, warmup_steps=3)
    opt = build_optimizer(tiny_model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=20)
    for _ in range(5):
        opt.step()
        sched.step()
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    # A resumed run builds the scheduler with a different horizon by mistake: the saved one wins.
    opt2 = build_optimizer(tiny_model, cfg)
    sched2 = build_scheduler(opt2, cfg, total_steps=999)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    for _ in range(10):
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 12 / 17)))
