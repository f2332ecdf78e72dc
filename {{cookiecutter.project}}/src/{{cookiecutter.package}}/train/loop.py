"""fit(): the one training loop, shared by every training entry point.

Every step it draws ``grad_accum`` micro-batches from a :class:`BatchSource` and calls :func:`.step.train_step`; the
numbers stay on the device. Then plain "if due" blocks: every ``log_every`` steps (and before an evaluation or a
checkpoint) it reads the steps' numbers in one go (:class:`.logger.StepLog`) and logs them (:class:`.logger.RunLogger`:
a line, TensorBoard, ``metrics.jsonl``), stopping at a non-finite step; when due, it evaluates and samples
(:func:`run_eval`), asks :class:`.stopping.Watch` whether to stop, and checkpoints (:func:`save_state`). Resuming is
:func:`restore`; with early stopping the run ends with the best checkpoint's weights (:func:`.stopping.restore_best`).

The entry point builds the model and the data and passes plain functions in (:class:`Job`: ``evaluate``, ``sample``,
``save_model``); what a job sets up once (seeds, precision, compilation, the resume point) is ``runtime.py``'s, which
hands fit the outcome (:class:`RunSetup`).
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..config import OptimConfig, TrainConfig, config_to_dict
from ..debug import NonFiniteGuard
from ..metrics import classification_metrics
from . import checkpoint as ckpt
from .distributed import (
    all_gather_object,
    all_reduce_mean,
    barrier,
    get_rank,
    get_world_size,
    is_compiled,
    is_sharded,
    notice,
    unwrap,
)
from .flops import peak_flops
from .health import GradHealth
from .logger import RunLogger, StepLog
from .optim import build_optimizer, build_scheduler
from .state import rng_state
from .step import train_step
from .stopping import Verdict, Watch, check_metric, restore_best, tell_listeners

# --------------------------------------------------------------------------------------------------------------------
# What fit() takes: the data, the run's set-up, the entry point's additions
# --------------------------------------------------------------------------------------------------------------------


class BatchSource(Protocol):
    """An endless supply of batches with a resumable position (the data module's TokenWindows implements it)."""

    def next_batch(self) -> dict[str, Tensor]: ...  # keys that model(**batch) accepts, incl. "labels"

    def state_dict(self) -> dict: ...  # data position, for exact resume (see _restore_position for world sizes)

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class RunSetup:
    """What ``runtime.py`` works out once per run and hands :func:`fit`; the defaults are a fresh fp32 run."""

    resume_from: Path | None = None  # the checkpoint to continue from, verified (runtime.resolve_start); None = fresh
    autocast: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)  # around each forward
    dtype: torch.dtype | None = None  # the autocast dtype (None = fp32), which sets the peak FLOPS of the MFU
    break_on_nonfinite: bool = False  # NonFiniteGuard hooks name the first module with a NaN/Inf output or gradient


@dataclass
class Job:
    """What an entry point adds to the plain loop: its evaluation and samples, what each checkpoint stores besides
    the training state, and what throughput counts. Every field is optional."""

    # evaluate(model) -> {"loss": ..., ...}: every cfg.eval_every steps and at the end, on every rank (averaged), with
    # the unwrapped model in eval mode under no_grad and autocast; logged as eval/<key> (see evaluate_loss)
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    # the same on the whole validation set (not cfg.eval_batches): every evaluation's when early stopping is on
    validate: Callable[[nn.Module], dict[str, float]] | None = None
    metrics: tuple[str, ...] = ()  # the keys evaluate reports, checked against cfg.early_stopping.metric up front
    sample: Callable[[nn.Module], str | list[str]] | None = None  # with evaluate, rank 0: text(s) printed and logged
    config: Any = None  # the run's full config (dataclass or dict): stored in every checkpoint, sent to W&B
    extra_state: dict | Callable[[], dict] | None = None  # plain data (or a function returning it), kept as "extra"
    save_model: Callable[[nn.Module, Path], None] | None = None  # (model, dir): more files, e.g. a peft adapter
    # training FLOPs per counted item for MFU; for language batches our LlamaLM's own count, or 6N, when omitted
    flops_per_item: float | None = None
    unit: str = "tok"  # what throughput counts: tokens, or "ex" for examples (images, audio)

    @property
    def evaluates(self) -> bool:
        return self.evaluate is not None or self.sample is not None


# --------------------------------------------------------------------------------------------------------------------
# Evaluation helper
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, batches: Iterable[dict[str, Tensor]], device: torch.device, max_batches: int | None = None
) -> dict[str, float]:
    """Mean loss and perplexity over ``batches`` (e.g. ``EvalWindows`` or a DataLoader); fit() adds eval mode,
    ``no_grad`` and autocast around it. Token-weighted would differ only with padding; the mean of batch losses is
    what nanoGPT and HF Trainer report too."""
    losses = []
    for batch in batches:
        if max_batches is not None and len(losses) >= max_batches:
            break
        losses.append(model(**to_device(batch, device)).loss.float())
    if not losses:
        raise ValueError("evaluate_loss got no batches")
    loss = float(torch.stack(losses).mean())  # one read of the device for the whole evaluation
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    labels: list[str],
    device: torch.device,
    max_batches: int | None = None,
) -> dict:
    """Example-weighted mean loss plus :func:`..metrics.classification_metrics` (accuracy, macro and per-class
    precision/recall/F1, confusion matrix) of a classifier whose ``model(**batch)`` returns ``.logits`` [B, K] and
    ``.loss``: text, images and audio alike."""
    preds, golds, losses = [], [], []
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch = to_device(batch, device)
        out = model(**batch)
        losses.append(out.loss.float() * len(batch["labels"]))
        preds.append(out.logits.argmax(dim=-1))
        golds.append(batch["labels"])
    if not golds:
        raise ValueError("evaluate_classifier got no batches")
    gold = torch.cat(golds)
    metrics = classification_metrics(gold, torch.cat(preds), labels)  # one read of the device for the predictions
    metrics["loss"] = float(torch.stack(losses).sum()) / len(gold)
    return metrics


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------------------------------


def _flops_per_token(model: nn.Module, batch: dict[str, Tensor]) -> float | None:
    """Training FLOPs per token of a language batch, for MFU (None for other batches: they count examples). Our
    LlamaLM knows its own; otherwise 6 x trainable + 4 x frozen parameters (frozen weights need the forward and the
    input-gradient matmuls, but no weight gradient)."""
    if "input_ids" not in batch:
        return None
    if hasattr(model, "flops_per_token"):
        return float(model.flops_per_token(batch["input_ids"].shape[-1]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return 6.0 * trainable + 4.0 * frozen


def _due(step: int, every: int, last: bool) -> bool:
    return last or (every > 0 and step % every == 0)


def restore(
    resume_from: Path | None, run_dir: Path, cfg: TrainConfig, model: nn.Module, optimizer, scheduler, source, watch
) -> int:
    """Resume set-up: load the checkpoint ``resume_from`` (resolved and verified before fit, see
    ``runtime.resolve_start``) into the model, optimizer, scheduler, RNG, data source and early-stopping
    :class:`.stopping.Watch` and return its step; or,
    for a fresh run, clear the run directory's old TensorBoard logs (and its checkpoints with ``cfg.overwrite``;
    rank 0: a fresh run owns its directory) and return 0."""
    if resume_from is None:
        if get_rank() == 0:
            # Old logs of the same name would interleave with the new curve. Checkpoints go only when asked to
            # (overwrite): after "auto" found none intact, the damaged ones stay to be inspected.
            for stale in (run_dir / "checkpoints", run_dir / "tb") if cfg.overwrite else (run_dir / "tb",):
                if stale.exists():
                    notice(f"fresh run: removing {stale}")
                    shutil.rmtree(stale)
        barrier()
        return 0
    rank, world = get_rank(), get_world_size()
    state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, rank=rank, verified=True)
    _restore_position(source, state.get("data"), rank, world)
    watch.load_state_dict(state.get("stopping"))
    step = int(state["step"])
    notice(f"resumed from {resume_from} at step {step}")
    if step >= cfg.max_steps or watch.stopped:
        notice(f"already at step {step} of train.max_steps={cfg.max_steps} or stopped early: nothing to train")
    return step


def _restore_position(source: BatchSource, data: Any, rank: int, world: int) -> None:
    """Hand ``source`` its saved position: this rank's of a per-rank list, or rank ``rank % saved ranks``'s when the
    world size changed. A position that records the ``world_size`` it was drawn under is global (TokenWindows): the
    source itself adapts it and says how; any other is reused as it is, with a notice."""
    if isinstance(data, list):  # one position per rank
        if len(data) != world and not (isinstance(data[0], dict) and "world_size" in data[0]):
            notice(f"notice: checkpoint has data positions for {len(data)} ranks, running {world}: reusing")
        data = data[rank % len(data)]
    if data is not None:
        source.load_state_dict(data)


def save_state(
    run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, source: BatchSource, cfg: TrainConfig, job: Job,
    watch: Watch,
) -> Path | None:  # fmt: skip
    """Checkpoint after ``step``: every rank contributes its data position and RNG state, rank 0 writes (atomically;
    ``checkpoints/best`` names it when it is the best; under ``--train.parallel fsdp`` every rank writes its shards
    of the weights and optimizer) and returns the path; the others return None. The weights are
    finite: :func:`fit` has read every step's ``finite`` flag before it saves, and a non-finite step never updated
    them."""
    world = get_world_size()
    per_rank = all_gather_object({"data": source.state_dict(), "rng": rng_state()})
    path, sharded = None, cfg.parallel == "fsdp"
    if sharded or get_rank() == 0:
        path = ckpt.save_checkpoint(
            run_dir / "checkpoints",
            step,
            model,
            optimizer,
            scheduler,
            data_state=[r["data"] for r in per_rank] if world > 1 else per_rank[0]["data"],
            rng=[r["rng"] for r in per_rank] if world > 1 else per_rank[0]["rng"],
            config=config_to_dict(job.config),
            extra=job.extra_state() if callable(job.extra_state) else job.extra_state,
            stopping=watch.state_dict(),
            save_model=job.save_model,
            sharded=sharded,
            keep=cfg.keep_checkpoints,
        )
    if get_rank() == 0:
        if watch.enabled and watch.best_step == step:
            ckpt.write_pointer(path.parent, ckpt.BEST_FILE, path.name)
        notice(f"checkpoint {path}" + (" (the best so far)" if watch.enabled and watch.best_step == step else ""))
    barrier()
    return path if get_rank() == 0 else None


def run_eval(
    model: nn.Module,
    autocast: contextlib.AbstractContextManager,
    evaluate: Callable[[nn.Module], dict[str, float]] | None,
    sample: Callable[[nn.Module], str | list[str]] | None,
) -> tuple[dict[str, float], str | list[str] | None]:
    """``evaluate`` (averaged over ranks, keys prefixed ``eval_``) and ``sample`` (rank 0) with the model in eval
    mode, under ``no_grad`` and autocast; the model's mode is restored afterwards. A sharded model samples on every
    rank (each forward all-gathers the weights): the same seed and weights give every rank the same tokens, so they
    run the same number of forwards; rank 0's texts are kept."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast:
            evals = {f"eval_{k}": all_reduce_mean(v, device) for k, v in (evaluate(model) if evaluate else {}).items()}
            texts = sample(model) if (sample is not None and (get_rank() == 0 or is_sharded(model))) else None
            texts = texts if get_rank() == 0 else None
    finally:
        model.train(was_training)
    return evals, texts


def evaluation(
    step: int, records: list[dict], model: nn.Module, setup: RunSetup, job: Job, evaluate, watch: Watch, logger
) -> Verdict:
    """The evaluation after ``step``: evaluate and sample (:func:`run_eval`), the watch's verdict (the same on every
    rank), the lines and series (``eval/*``, ``eval/train_gap``), the overfitting warning, then the listeners."""
    evals, texts = run_eval(model, setup.autocast, evaluate, job.sample)
    verdict = watch.evaluated(step, evals) if evals else Verdict()
    records[-1].update(evals)
    if verdict.gap is not None:
        records[-1]["eval_train_gap"] = verdict.gap
    logger.eval_lines(step, records[-1], texts)
    if verdict.warning:
        notice(verdict.warning)
    tell_listeners(step, evals, watch)
    return verdict


def fit(
    model: nn.Module,
    train_source: BatchSource,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    optim: OptimConfig | None = None,
    setup: RunSetup | None = None,
    job: Job | None = None,
) -> list[dict]:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps (fewer when it stops early); return one metrics dict per
    step taken (with early stopping the last one's ``weights_step`` is the step of the weights the model ends with).

    ``model`` is on its device, maybe DDP-wrapped and/or compiled, and returns ``.loss``; only trainable parameters
    are optimized and checkpointed, into ``run_dir`` (with ``tb/`` and ``metrics.jsonl``). ``setup``: what runtime.py
    set up (:class:`RunSetup`; default a fresh fp32 run), ``job``: the entry point's additions (:class:`Job`). A
    NaN/Inf loss or gradient skips its update and raises :class:`.step.NonFiniteError` at the next read of the
    device, before any checkpoint.
    """
    optim, setup, job = optim or OptimConfig(), setup or RunSetup(), job or Job()
    run_dir, raw, watch = Path(run_dir), unwrap(model), Watch(cfg.early_stopping)
    evaluate = job.validate if watch.enabled and job.validate else job.evaluate
    check_metric(cfg.early_stopping, job.metrics, cfg.eval_every if evaluate else 0)
    device = next(raw.parameters()).device
    optimizer = build_optimizer(raw, optim)
    scheduler = build_scheduler(optimizer, optim, cfg.max_steps)
    start = restore(setup.resume_from, run_dir, cfg, raw, optimizer, scheduler, train_source, watch)
    steps = StepLog(job.flops_per_item, peak_flops(device, setup.dtype, cfg.peak_tflops)[0] * get_world_size())
    logger = RunLogger(
        run_dir, cfg, start, main=get_rank() == 0, progress=True, config=config_to_dict(job.config), unit=job.unit
    )
    health = GradHealth(raw, optimizer, cfg.log_every if cfg.grad_stats else 0)
    compiling = is_compiled(model)  # its first step compiles the model: logged as such, not as throughput
    anomaly = torch.autograd.detect_anomaly(check_nan=True) if cfg.detect_anomaly else contextlib.nullcontext()
    history: list[dict] = []
    with contextlib.closing(logger), NonFiniteGuard(raw, enabled=setup.break_on_nonfinite) as guard, anomaly:
        for step in range(start + 1, start if watch.stopped else cfg.max_steps + 1):  # 1-based: step-000001 = 1 update
            guard.step, last = step, step == cfg.max_steps
            batches = [to_device(train_source.next_batch(), device) for _ in range(cfg.grad_accum)]
            steps.fpt = steps.fpt or _flops_per_token(raw, batches[0])
            on_gradients = health.capture_gradients if health.due(step, last) else None
            result = train_step(
                model, batches, optimizer, scheduler, grad_clip=cfg.grad_clip, autocast=setup.autocast, step=step,
                check_loss=guard.check_loss, on_gradients=on_gradients,
            )  # fmt: skip
            health.capture_update(step)  # a no-op unless this step's gradients were captured
            steps.add(step, result)
            logger.advance()
            log_due = compiling or _due(step, cfg.log_every, last)
            eval_due = evaluate is not None or job.sample is not None
            eval_due = eval_due and _due(step, cfg.eval_every, last)
            save_due = _due(step, cfg.save_every, last)
            if not (log_due or eval_due or save_due or health.pending):
                continue  # nothing to show yet: the device keeps running ahead
            records = steps.read(compiling=compiling)  # up to a skipped (non-finite) step, if any
            finite, verdict = steps.failed is None, Verdict()
            watch.add_training(records)
            if finite and log_due:
                logger.train_line(records[-1])
            if finite and health.pending:
                logger.grad_health(*health.read())
            if finite and eval_due:
                verdict = evaluation(step, records, raw, setup, job, evaluate, watch, logger)
            logger.append_metrics(records)
            history.extend(records)
            steps.raise_if_failed()  # before any checkpoint: the skipped step ends the run
            if save_due or verdict.stop or (verdict.improved and watch.enabled):
                save_state(run_dir, step, raw, optimizer, scheduler, train_source, cfg, job, watch)
            if verdict.stop:
                notice(verdict.stop)
                break
            compiling = False
            steps.restart()  # evaluation and checkpoint time is not training time
    weights = restore_best(run_dir / "checkpoints", raw, watch, history[-1]["step"] if history else start)
    if weights is not None and history:
        history[-1]["weights_step"] = weights
    return history
