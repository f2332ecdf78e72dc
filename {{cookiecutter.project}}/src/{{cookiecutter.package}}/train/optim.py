"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine learning-rate schedule.

Both are built from :class:`~..config.OptimConfig` and are the same for pre-training and fine-tuning: only parameters
with ``requires_grad`` are optimized, so a peft-wrapped model gets an optimizer over its adapter weights alone.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (>= 2-D: linear and embedding weights) decay, vectors (norms, biases) do not.

    Decaying a norm's gain or a bias only pulls it towards zero without regularising anything (nanoGPT, GPT-3).
    Frozen parameters (``requires_grad=False``, e.g. a LoRA base model) are left out entirely. Tied weights appear
    once because ``named_parameters`` de-duplicates shared tensors.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model``; call after ``model.to(device)`` (before or after DDP).

    The fused kernel by default (``cfg.fused`` auto): one kernel updates every parameter, on CUDA and on CPU (torch
    >= 2.4; 4-5x faster than ``foreach`` on a CPU), and it accepts ``found_inf``, which is how ``train_step`` skips a
    non-finite update without waiting for the device. Where torch has no fused kernel for the parameters' device or
    dtype, ``foreach`` is used with a one-line notice (``always``: the error instead; ``never``: ``foreach``).
    """
    groups = param_groups(model, cfg.weight_decay)
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.fused == "never":
        return torch.optim.AdamW(groups, foreach=True, **kwargs)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except RuntimeError as err:  # "`fused=True` requires all the params to be ... of supported devices"
        if cfg.fused == "always":
            raise
        device = groups[0]["params"][0].device
        print(f"notice: no fused AdamW for these parameters on {device} ({err}): using foreach", file=sys.stderr)
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


class WarmupCosine:
    """LR multiplier: linear warmup from ~0 to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at
    ``total_steps`` (and flat after).

    A small class instead of a lambda so that ``LambdaLR.state_dict()`` stores its fields (plain numbers) and a
    resumed run continues on exactly the same curve.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = max(int(total_steps), 1)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        # `step` = number of optimizer steps taken so far; the first update uses step 0.
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
        return self.min_ratio + (1.0 - self.min_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """Warmup + cosine to ``cfg.min_lr`` over ``total_steps`` optimizer steps; step it once per optimizer step."""
    return LambdaLR(optimizer, WarmupCosine(cfg.warmup_steps, total_steps, cfg.min_lr / cfg.lr))
