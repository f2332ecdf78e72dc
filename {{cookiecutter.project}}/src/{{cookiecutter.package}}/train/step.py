"""One optimizer step: the single place where every training entry point computes a loss and updates weights.

Put a breakpoint here. The line in train_step whose comment announces the computed loss runs once per micro-batch
with ``batch``, ``out`` (logits, loss) and ``loss`` in scope; the IDE run configurations and their tests stop on it
(they find it by that comment, so keep the comment text unique in this file).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN/Inf; raised before the optimizer touches the weights."""


@dataclass
class StepResult:
    loss: float  # mean loss over the micro-batches (and over ranks under DDP)
    grad_norm: float  # global L2 norm of the gradients before clipping
    lr: float  # learning rate used for this update (first parameter group)
    tokens: int  # input tokens processed in this step, summed over micro-batches and ranks


def count_tokens(batch: dict[str, Tensor]) -> int:
    """Non-padding input tokens of a batch (``attention_mask`` ones when there is a 2-D mask, else all of them)."""
    mask = batch.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        return int(mask.sum().item())
    return int(batch["input_ids"].numel())


def train_step(
    model: nn.Module,
    micro_batches: list[dict[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    grad_clip: float,
    autocast: contextlib.AbstractContextManager,
    step: int,
    check_loss: Callable[[Tensor], None] | None = None,
) -> StepResult:
    """Forward + backward over ``micro_batches`` (gradient accumulation), clip, optimizer and scheduler step.

    Put a breakpoint here (or on the line below whose comment marks the computed loss) to inspect a batch, the
    logits and the loss of any entry point: pre-training, SFT and classification all call this function.

    Args:
        model: anything whose ``forward(**batch)`` returns an object with ``.loss`` (our ``LlamaLM``, a transformers
            model, a peft-wrapped model), optionally wrapped in DDP and/or ``torch.compile``.
        micro_batches: the step's batches, already on the model's device. Each loss is scaled by ``1/len`` so the
            accumulated gradient is the mean over micro-batches. Under DDP gradients are all-reduced only once,
            on the last micro-batch (``no_sync`` for the others).
        optimizer, scheduler: stepped once; the scheduler may be ``None``.
        grad_clip: max global grad norm; ``0`` disables clipping (the norm is still measured and returned).
        autocast: a *reusable* context manager entered around every forward, e.g. ``torch.autocast("cuda",
            dtype=torch.bfloat16)`` or ``contextlib.nullcontext()``.
        step: the number of this update as the logs show it (1-based: the first update is step 1); only used in
            error messages.
        check_loss: called with every micro-batch loss before backward (``NonFiniteGuard.check_loss``).

    Raises:
        NonFiniteLossError: the mean loss or the gradient norm is NaN/Inf. Raised on every rank (the values are
            reduced first) and before ``optimizer.step()``, so the weights stay finite and no checkpoint of a broken
            model is ever written.
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    model.train()
    n = len(micro_batches)
    device = micro_batches[0]["input_ids"].device
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    tokens = 0
    no_sync = getattr(model, "no_sync", None)  # DistributedDataParallel only
    for i, batch in enumerate(micro_batches):
        last = i == n - 1
        sync_ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with sync_ctx:
            with autocast:
                out = model(**batch)
            loss = getattr(out, "loss", None)
            if loss is None:
                raise ValueError("model(**batch) returned no .loss: the batch needs a 'labels' tensor")
            loss_sum += loss.detach().float()  # breakpoint: loss is computed
            if check_loss is not None:
                check_loss(loss)
            (loss / n).backward()
        tokens += count_tokens(batch)

    # One reduction for both numbers: every rank sees the same loss, so a NaN stops all of them together.
    totals = torch.stack([loss_sum, torch.tensor(float(tokens), device=device)])
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        world = dist.get_world_size()
    mean_loss = totals[0].item() / (n * world)
    total_tokens = int(totals[1].item())
    if not math.isfinite(mean_loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            f"non-finite loss ({mean_loss}) at step {step}: training stopped before the update, no checkpoint was "
            "written (lower optim.lr, check the data, or rerun with --break-on-nonfinite to find the first bad module)"
        )

    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = grad_clip if grad_clip > 0 else float("inf")  # inf: measure the norm without clipping
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            f"non-finite gradient norm ({grad_norm}) at step {step} (loss {mean_loss:.4f}): training stopped before "
            "the update, no checkpoint was written (lower optim.lr or rerun with --break-on-nonfinite)"
        )

    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)  # frees gradient memory until the next backward
    return StepResult(loss=mean_loss, grad_norm=grad_norm, lr=lr, tokens=total_tokens)
