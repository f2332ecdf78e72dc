"""Gradient health: each module's gradient and weight norms and its update/weight ratio on the steps it is due
(every log step, unless ``train.grad_stats`` is off), and a warning when gradients vanish or explode. It costs
nothing on the other steps and keeps no copy of the weights: the update is worked out from AdamW's state.
:func:`.loop.fit` drives it and :meth:`.logger.RunLogger.grad_health` writes what it measured.
"""

from __future__ import annotations

import statistics
from collections import deque

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


def _local(t: Tensor) -> Tensor:
    """This rank's shard of an FSDP (DTensor) parameter, gradient or optimizer state; other tensors as they are."""
    return t.to_local() if isinstance(t, DTensor) else t


class GradHealth:
    """Per-module gradient health, measured only on the steps it is due, read at the next log.

    On a due step ``train_step`` calls :meth:`capture_gradients` after backward and before clipping (the raw
    gradients) and ``fit`` calls :meth:`capture_update` after the optimizer step; both only queue device work, and
    other steps cost nothing (no hooks, no copies). :meth:`read` returns, per module (the parameters' owner, e.g.
    ``layers.3.mlp.down_proj``): ``grad_norm``, ``weight_norm`` and ``update_ratio`` = ||W_after - W_before|| / ||W||
    (healthy training sits around 1e-3; far below, the module barely learns; far above, it is thrashing; the update
    comes from the Adam/AdamW ``optimizer``'s moments, see :meth:`_update_norm`, not from a copy of the weights), plus
    warnings: **vanishing** when a module's gradient norm stays below ``vanish_below`` for ``vanish_logs`` reads in a
    row, **exploding** when it jumps above ``explode_factor`` times its median over the last ``history`` reads.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Adam,
        every: int,
        *,
        vanish_below: float = 1e-7,
        vanish_logs: int = 3,
        explode_factor: float = 10.0,
        history: int = 10,
    ) -> None:
        groups: dict[str, list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                groups.setdefault(name.rpartition(".")[0] or name, []).append(param)
        self.modules, self.params = list(groups), list(groups.values())
        # FSDP: each rank measures its shards; the squares of the norms add up over the ranks (_over_ranks)
        self.sharded = any(isinstance(p, DTensor) for params in self.params for p in params)
        if not isinstance(optimizer, torch.optim.Adam):  # AdamW is one
            raise TypeError(f"GradHealth reads the update off Adam/AdamW state, not {type(optimizer).__name__}'s")
        self.optimizer = optimizer
        self.group_of = {p: group for group in optimizer.param_groups for p in group["params"]}
        self._lr: dict[int, float] = {}  # id(group) -> the learning rate of this step's update
        self.every, self.vanish_below, self.vanish_logs = every, vanish_below, vanish_logs
        self.explode_factor = explode_factor
        self.history: dict[str, deque[float]] = {m: deque(maxlen=history) for m in self.modules}
        self.small: dict[str, int] = dict.fromkeys(self.modules, 0)
        self._grads: Tensor | None = None
        self._samples: list[Tensor] = []
        self.pending: tuple[int, Tensor, Tensor, Tensor, list[Tensor]] | None = None

    def due(self, step: int, last: bool) -> bool:
        return self.every > 0 and (step % self.every == 0 or last)

    def capture_gradients(self) -> None:
        """Norms of the raw gradients per module, a small sample of them for histograms, and the learning rates the
        update will use (the scheduler moves them on right after the optimizer step)."""
        norms, self._samples = [], []
        for params in self.params:
            grads = [_local(p.grad.detach()).float() for p in params if p.grad is not None]
            if not grads:
                norms.append(torch.zeros((), device=params[0].device))
                self._samples.append(torch.zeros(1, device=params[0].device))
                continue
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            # ~1k values per module reach the host: strided views of each gradient, never a copy of all of them
            per_tensor = max(1, 1024 // len(grads))
            self._samples.append(torch.cat([g.flatten()[:: max(1, g.numel() // per_tensor)] for g in grads]))
        self._grads = self._over_ranks(torch.stack(norms))
        self._lr = {id(group): group["lr"] for group in self.optimizer.param_groups}

    def capture_update(self, step: int) -> None:
        """After the optimizer step: the weights' norms and how far the update moved them."""
        if self._grads is None:
            return
        weights, updates = [], []
        for params in self.params:
            norms = [torch.linalg.vector_norm(_local(p.detach()).float()) for p in params]
            weights.append(torch.linalg.vector_norm(torch.stack(norms)))
            updates.append(torch.linalg.vector_norm(torch.stack([self._update_norm(p) for p in params])))
        weights, updates = self._over_ranks(torch.stack(weights)), self._over_ranks(torch.stack(updates))
        self.pending = (step, self._grads, weights, updates, self._samples)
        self._grads, self._samples = None, []

    def _over_ranks(self, norms: Tensor) -> Tensor:
        """Per-module norms of a sharded model's whole tensors from each rank's norms of its shards (one all-reduce)."""
        if not self.sharded:
            return norms
        squares = norms.square()
        dist.all_reduce(squares)
        return squares.sqrt()

    def _update_norm(self, param: nn.Parameter) -> Tensor:
        """||W_after - W_before|| of the Adam(W) update just made, from what that step left in the optimizer state.

        With u = m_hat / (sqrt(v_hat) + eps) (bias-corrected moments), AdamW's decoupled weight decay makes
        W_after = W_before (1 - lr wd) - lr u, so W_after - W_before = -(lr wd W_after + lr u) / (1 - lr wd); Adam's
        coupled decay is inside u already: -lr u. One parameter-sized temporary at a time, no copy of the weights."""
        group, state = self.group_of.get(param), self.optimizer.state.get(param)
        if group is None or not state:  # not optimized, or no update yet (no gradient)
            return torch.zeros((), device=param.device)
        lr, (beta1, beta2), t = self._lr[id(group)], group["betas"], state["step"]
        v = _local(state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"])
        u = (_local(state["exp_avg"]) / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
        if not group["decoupled_weight_decay"] or not group["weight_decay"]:
            return torch.linalg.vector_norm(lr * u.float())
        decay = lr * group["weight_decay"]
        return torch.linalg.vector_norm((decay * _local(param.detach()) + lr * u).float()) / (1 - decay)

    def read(self) -> tuple[int, dict[str, dict[str, float]], list[Tensor], list[str]] | None:
        """(step, per-module grad_norm / weight_norm / update_ratio, gradient samples, warnings) of the pending
        measurement (one device read), or None."""
        if self.pending is None:
            return None
        step, grads, weights, updates, samples = self.pending
        self.pending = None
        rows = torch.stack([grads, weights, updates]).tolist()
        stats = {
            m: {"grad_norm": g, "weight_norm": w, "update_ratio": u / w if w > 0 else 0.0}
            for m, g, w, u in zip(self.modules, *rows, strict=True)
        }
        return step, stats, [t.cpu() for t in samples], self._warnings(step, stats)

    def _warnings(self, step: int, stats: dict[str, dict[str, float]]) -> list[str]:
        vanishing, exploding = [], []
        for module, values in stats.items():
            norm, past = values["grad_norm"], self.history[module]
            self.small[module] = self.small[module] + 1 if norm < self.vanish_below else 0
            if self.small[module] == self.vanish_logs:  # once per episode, not on every later read
                vanishing.append(module)
            # A full window first: early in training gradients grow fast from their initial scale, and that is no
            # explosion.
            median = statistics.median(past) if len(past) == past.maxlen else None
            if median and norm > self.explode_factor * median:
                exploding.append(f"{module} {norm:.3g} ({norm / median:.0f}x its running median {median:.3g})")
            past.append(norm)
        lines = []
        if vanishing:
            lines.append(
                f"warning: vanishing gradients at step {step} (norm < {self.vanish_below:g} for {self.vanish_logs} "
                f"logs in a row): {', '.join(vanishing)}"
            )
        if exploding:
            lines.append(f"warning: exploding gradients at step {step}: {'; '.join(exploding)}")
        return lines
