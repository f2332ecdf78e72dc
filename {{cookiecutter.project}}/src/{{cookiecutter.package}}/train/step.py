"""One optimizer step: the single place where every training entry point computes a loss and updates weights.

Put a breakpoint here. The line in train_step whose comment announces the computed loss runs once per micro-batch
with ``batch``, ``out`` (the model output) and ``loss`` in scope; the IDE run configurations and their tests stop on it
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

from .distributed import gradient_sync


class NonFiniteError(FloatingPointError):
    """The one error for NaN/Inf in training: a step's loss or gradient norm (that update was skipped, so the weights
    are still finite), or under ``--break-on-nonfinite`` the first non-finite activation, loss or gradient
    (:class:`..debug.NonFiniteGuard`). Entry points turn it into one line on stderr and exit code 1."""


@dataclass
class StepResult:
    """What one update produced. The tensors stay on the device: reading one (``float(r.loss)``, ``.item()``,
    ``.tolist()``) waits for the GPU to finish the step, so :func:`..loop.fit` reads them once per ``log_every``."""

    loss: Tensor  # mean loss over the step's targets (all micro-batches and ranks: see train_step), fp32 scalar
    grad_norm: Tensor  # global L2 norm of the gradients before clipping, fp32 scalar
    lr: float  # learning rate used for this update (first parameter group; a host number, no sync)
    tokens: Tensor  # tokens (examples for non-text batches) of this step, summed over micro-batches and ranks, fp32
    finite: Tensor  # bool scalar: False = loss or grad norm was NaN/Inf and the update was skipped

    def check_finite(self, step: int) -> None:
        """Raise :class:`NonFiniteError` if this update was skipped (reads the device: call at log time)."""
        if bool(self.finite):
            return
        loss, grad_norm = float(self.loss), float(self.grad_norm)
        what = f"loss ({loss})" if not math.isfinite(loss) else f"gradient norm ({grad_norm}) (loss {loss:.4f})"
        raise NonFiniteError(
            f"non-finite {what} at step {step}: that update was skipped and training stopped, the weights and every "
            "checkpoint are from finite steps (lower optim.lr, check the data, or rerun with --break-on-nonfinite "
            "to find the first bad module)"
        )


def count_tokens(batch: dict[str, Tensor]) -> Tensor | int:
    """What a step's throughput counts: the non-padding input tokens of a language batch (``attention_mask`` ones, a
    device tensor, when there is a 2-D mask, else the ``input_ids`` element count), or the examples of a batch
    without ``input_ids`` (images, audio: the length of ``labels``), as a plain int. The loss is weighted by
    :func:`count_targets` instead: padding and prompt tokens are inputs, not targets."""
    mask = batch.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        return mask.sum()
    if "input_ids" in batch:
        return batch["input_ids"].numel()
    return len(batch["labels"])


def count_targets(batch: dict[str, Tensor]) -> Tensor:
    """The predictions a model's mean loss averages over, as a device tensor: labels other than -100, of token labels
    [B, T] after the causal shift (position t is scored on label t + 1, so a row's first label is never a target:
    LlamaLM and transformers' causal LMs shift alike), of per-example labels [B] (classification) all of them."""
    labels = batch.get("labels")
    if not isinstance(labels, Tensor):
        raise ValueError("train_step needs a 'labels' tensor in every batch (-100 marks a position without target)")
    return (labels[..., 1:] if labels.dim() > 1 else labels).ne(-100).sum()


def batch_device(batch: dict[str, Tensor]) -> torch.device:
    """The device of the batch's first tensor (``input_ids``, ``pixel_values``, ``input_features``, ...)."""
    return next(v for v in batch.values() if isinstance(v, Tensor)).device


def skips_nonfinite_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers that take ``found_inf`` (the fused AdamW :func:`.optim.build_optimizer` makes): they skip
    an update on the device, the way ``torch.amp.GradScaler`` uses them."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


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
    on_gradients: Callable[[], None] | None = None,
) -> StepResult:
    """Forward + backward over ``micro_batches`` (gradient accumulation), clip, optimizer and scheduler step.

    Put a breakpoint here (or on the line below whose comment marks the computed loss) to inspect a batch, the
    model output and the loss of any entry point: pre-training, SFT and classification all call this function.

    The loss of the step is the mean over all its targets (:func:`count_targets`: labelled tokens, or examples), of
    all micro-batches on all ranks, so how a batch is split does not change the gradient: two micro-batches, or two
    ranks, with 1 and 15 targets give what one batch of both gives, not the mean of their two means (transformers'
    ``num_items_in_batch`` fix). The models return their own mean loss; each is weighted by its share of the
    step's targets, counted before the first forward with one all-reduce.

    Nothing here waits for the device: the loss, gradient norm and token count come back as device tensors
    (:class:`StepResult`), so a GPU runs ahead of Python instead of idling at every step.

    Non-finite values: the check is folded into the optimizer step. ``finite`` (loss and gradient norm both finite)
    is computed on the device and handed to the fused AdamW as ``found_inf``, which then leaves the weights and its
    state untouched for that step, as under ``torch.amp.GradScaler``. The caller learns of it when it reads the
    result (:meth:`StepResult.check_finite`, which ``fit`` calls every ``log_every`` steps and before every
    checkpoint), so a non-finite step never reaches the weights or a checkpoint. An optimizer without ``found_inf``
    support (any other ``torch.optim`` class) is checked on the host instead, one sync per step, and raises here.

    Args:
        model: anything whose ``forward(**batch)`` returns an object with ``.loss``, the mean over the batch's
            targets as :func:`count_targets` counts them (our ``LlamaLM`` and classifiers, a transformers causal LM,
            a peft-wrapped model), optionally wrapped in DDP or sharded by FSDP2, and/or ``torch.compile``.
        micro_batches: the step's batches, already on the model's device, each with ``labels``. Under DDP and
            FSDP gradients are reduced over the ranks only once, on the last micro-batch
            (:func:`.distributed.gradient_sync`).
        optimizer, scheduler: stepped once; the scheduler may be ``None``.
        grad_clip: max global grad norm; ``0`` disables clipping (the norm is still measured and returned).
        autocast: a *reusable* context manager entered around every forward, e.g. ``torch.autocast("cuda",
            dtype=torch.bfloat16)`` or ``contextlib.nullcontext()``.
        step: the number of this update as the logs show it (1-based: the first update is step 1); only used in
            error messages.
        check_loss: called with every micro-batch loss before backward (``NonFiniteGuard.check_loss``).
        on_gradients: called once the gradients are complete (accumulated and all-reduced), before clipping, e.g.
            ``GradHealth.capture_gradients`` on the steps whose gradients are inspected.

    Raises:
        NonFiniteError: only for optimizers without ``found_inf`` support (see above), before their update.
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    model.train()
    n = len(micro_batches)
    device = batch_device(micro_batches[0])
    targets = torch.stack([count_targets(batch) for batch in micro_batches]).float()  # [n]
    tokens = sum(count_tokens(batch) for batch in micro_batches)
    # Counted before any forward, in one reduction: every weight below needs the whole step's number of targets.
    totals = torch.stack([targets.sum(), torch.as_tensor(tokens, device=device, dtype=torch.float32)])
    world = _sum_over_ranks(totals)
    # A micro-batch's mean loss times its share of the step's targets is its part of the step's mean loss. DDP and
    # FSDP divide the summed gradients by the world size, so each rank's part is multiplied by it to cancel that.
    weights = targets * world / totals[0]
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    for i, batch in enumerate(micro_batches):
        with gradient_sync(model, i == n - 1):  # one all-reduce / reduce-scatter per step, on the last micro-batch
            with autocast:
                out = model(**batch)
            loss = getattr(out, "loss", None)
            if loss is None:
                raise ValueError("model(**batch) returned no .loss: the batch needs a 'labels' tensor")
            # where, not a product: a micro-batch without targets has the mean 0 / 0 = nan and adds nothing
            part = torch.where(targets[i] > 0, loss.float() * weights[i], 0.0)  # breakpoint: loss is computed
            if check_loss is not None:
                check_loss(loss)
            part.backward()
        loss_sum += part.detach()
    # One reduction: every rank sees the same loss, so a NaN skips the update on all of them.
    _sum_over_ranks(loss_sum)
    mean_loss = loss_sum / world

    if on_gradients is not None:
        on_gradients()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = grad_clip if grad_clip > 0 else float("inf")  # inf: measure the norm without clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # a device scalar: no sync
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor, the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    grad_norm = grad_norm.float()
    finite = torch.isfinite(mean_loss) & torch.isfinite(grad_norm)
    result = StepResult(
        loss=mean_loss, grad_norm=grad_norm, lr=float(optimizer.param_groups[0]["lr"]), tokens=totals[1], finite=finite
    )

    if skips_nonfinite_on_device(optimizer):
        optimizer.found_inf = (~finite).float().to(params[0].device)  # 1.0 = skip this update (GradScaler's contract)
    elif not bool(finite):
        optimizer.zero_grad(set_to_none=True)
        result.check_finite(step)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)  # frees gradient memory until the next backward
    return result


def _sum_over_ranks(tensor: Tensor) -> int:
    """Sum ``tensor`` over the ranks in place (nothing to do without a process group); return the world size."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return dist.get_world_size()
