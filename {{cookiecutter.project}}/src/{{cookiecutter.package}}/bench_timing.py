"""How `bench` times training steps, so that two implementations compare fairly: the runners (our `train_step`, a
plain baseline loop), alternating timed rounds, and the per-model rows (tokens/s, step-time spread, peak memory).
"""

from __future__ import annotations

import abc
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .config import OptimConfig
from .train.optim import build_optimizer
from .train.step import train_step

OPTIM = OptimConfig(warmup_steps=0)  # both runners' optimizer settings: the project's defaults, no warm-up


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def significant(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits: an MFU of 0.00002 (fp32 on a GPU, a tiny model) stays above 0."""
    return float(f"{x:.{digits}g}")


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median and spread of per-step times, in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {
        "step_ms_median": round(statistics.median(ms), 3),
        "step_ms_min": round(ms[0], 3),
        "step_ms_max": round(ms[-1], 3),
        "step_ms_q1": round(q[0], 3),
        "step_ms_q3": round(q[2], 3),
        "timed_steps": len(ms),
    }


def time_alternating(
    runners: dict[str, Callable[[], None]], *, steps: int, warmup: int, repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Run every runner `warmup` times untimed, then `repeats` rounds of `steps` timed calls each, alternating
    runners round by round (A B A B ...). Returns the per-call seconds of each runner, and on CUDA the most memory
    (MiB) one call allocated on top of what was resident when it started (empty elsewhere)."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    step_mem: dict[str, float] = {}
    for _ in range(repeats):
        for name, run in runners.items():
            for _ in range(steps):
                _sync(device)
                if device.type == "cuda":
                    resident = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                run()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
                if device.type == "cuda":
                    added = (torch.cuda.max_memory_allocated(device) - resident) / 2**20
                    step_mem[name] = round(max(step_mem.get(name, 0.0), added), 1)
    return times, step_mem


def autocast_for(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """A reusable autocast context (train_step enters it every micro-batch); nullcontext for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    available = getattr(torch.amp, "is_autocast_available", lambda _: True)(device.type)
    if not available:
        print(f"bench: no autocast on {device.type}; running fp32", file=sys.stderr)
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def random_batches(vocab_size: int, batch_size: int, seq_len: int, n: int, device: torch.device, seed: int = 0):
    """`n` fixed batches of random tokens (labels = inputs, shifted inside the models), reused round-robin."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g).to(device)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def _cycle(items: list) -> Iterator:
    while True:
        yield from items


class _Runner(abc.ABC):
    """One model + its optimizer + a batch cycle; calling it runs one training step (`_train`) and counts it."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict], autocast):
        self.model, self.optimizer, self.autocast = model, optimizer, autocast
        self.batches: Iterator[dict] = _cycle(batches)
        self.step = 0
        self._loss = torch.tensor(float("nan"))

    @abc.abstractmethod
    def _train(self, batch: dict) -> torch.Tensor:
        """One optimizer step on `batch`; returns the loss, still on the device."""

    def __call__(self) -> None:
        self._loss = self._train(next(self.batches))
        self.step += 1

    @property
    def loss(self) -> float:
        return float(self._loss)  # read once at the end: a timed step itself never waits for the device


class Trainer(_Runner):
    """Our training step: `train_step` with the project's optimizer."""

    def __init__(self, model: nn.Module, batches: list[dict], autocast: contextlib.AbstractContextManager):
        super().__init__(model, build_optimizer(model, OPTIM), batches, autocast)

    def _train(self, batch: dict) -> torch.Tensor:
        result = train_step(
            self.model, [batch], self.optimizer, None, grad_clip=1.0, autocast=self.autocast, step=self.step
        )
        return result.loss


class PlainLoop(_Runner):
    """The baseline: forward, loss.backward(), optimizer.step(), zero_grad() -- nothing else (one AdamW group)."""

    def __init__(self, model: nn.Module, batches: list[dict], autocast: contextlib.AbstractContextManager):
        params = [p for p in model.parameters() if p.requires_grad]
        kwargs = {"lr": OPTIM.lr, "betas": OPTIM.betas, "eps": OPTIM.eps, "weight_decay": OPTIM.weight_decay}
        super().__init__(model, torch.optim.AdamW(params, **kwargs), batches, autocast)

    def _train(self, batch: dict) -> torch.Tensor:
        self.model.train()
        with self.autocast:
            loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def throughput_rows(
    runners: dict[str, _Runner],
    times: dict[str, list[float]],
    step_mem: dict[str, float],
    tokens_per_step: int,
    common: dict,
) -> list[dict]:
    """One row per runner (tokens/s at the median, fastest and slowest step; final loss; step-time spread; peak
    step memory where measured), then the ratio row comparing the first runner with the second."""
    rows = []
    for name, runner in runners.items():
        stats = summarize(times[name])
        rows.append(
            common
            | {"model": name, "tokens_per_s": round(tokens_per_step / (stats["step_ms_median"] / 1e3), 1)}
            | {"tokens_per_s_min": round(tokens_per_step / (stats["step_ms_max"] / 1e3), 1)}
            | {"tokens_per_s_max": round(tokens_per_step / (stats["step_ms_min"] / 1e3), 1)}
            | {"loss": round(runner.loss, 5), "steps_trained": runner.step}
            | ({"peak_step_mem_mib": step_mem[name]} if name in step_mem else {})
            | stats
        )
    ours, theirs = rows[0], rows[1]
    ratio = {"model": "ratio", "ours_over_transformers": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3)}
    ratio["loss_abs_diff"] = round(abs(ours["loss"] - theirs["loss"]), 6)
    return [*rows, common | ratio]
