"""What a run shows and writes while it trains: the progress bar, log lines, TensorBoard and ``metrics.jsonl``.

Two pieces, both used by :func:`.loop.fit` (with :class:`.health.GradHealth`, whose numbers it also writes):

- :class:`StepLog` holds the steps since the device was last read and the clock of that window: ``train_step``
  leaves its numbers on the device, and reading them once per ``log_every`` is what keeps a GPU busy;
- :class:`RunLogger` turns the records into output, on rank 0 only (every method is a no-op elsewhere): TensorBoard
  and/or Weights & Biases (``train.logger``), the progress bar, log lines and ``metrics.jsonl``.

W&B is optional (``pip install -e ".[wandb]"``). ``WANDB_MODE=offline`` logs to ``<run_dir>/wandb/`` with no account
and no network (``wandb sync`` uploads it later); the run id is kept in ``<run_dir>/wandb-run-id`` so a resumed run
continues the same W&B run; ``WANDB_PROJECT`` picks the project (default: this package's name).
"""

from __future__ import annotations

import html
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError, TrainConfig
from ..metrics import format_confusion_matrix, scalar_metrics, summary_line
from .step import StepResult

WANDB_ID_FILE = "wandb-run-id"


def require_logger(logger: str) -> None:
    """Fail in one line, before any work, when ``train.logger`` needs a package that is not installed."""
    if logger not in ("wandb", "both"):
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(
            f'train.logger={logger} needs wandb: pip install -e ".[wandb]" (or pip install wandb)'
        ) from None


class StepLog:
    """The steps since the last read of the device, and the clock of that window.

    ``add`` keeps each step's :class:`StepResult`; ``read`` turns them into metrics records with a single device read
    and measures throughput over the window: tokens / wall time from the window's start to that read. The caller
    calls ``restart`` after evaluation and checkpoints so their time is not counted; a compiled model's first step is
    its own window, reported as ``compile_s`` instead of a throughput.
    """

    def __init__(self, flops_per_token: float | None, peak_flops: float) -> None:
        self.fpt, self.peak = flops_per_token, peak_flops
        self.pending: list[tuple[int, StepResult]] = []
        self.failed: tuple[int, StepResult] | None = None
        self.restart()

    def restart(self) -> None:
        self.t0 = time.perf_counter()

    def add(self, step: int, result: StepResult) -> None:
        self.pending.append((step, result))

    def read(self, *, compiling: bool = False) -> list[dict]:
        """Records of the pending steps, up to and including the first skipped (non-finite) one, which
        :meth:`raise_if_failed` then reports."""
        rows = torch.stack(
            [torch.stack([r.loss, r.grad_norm, r.tokens, r.finite.float()]) for _, r in self.pending]
        ).tolist()  # the one device read
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        records = []
        for (step, result), (loss, grad_norm, tokens, finite) in zip(self.pending, rows, strict=True):
            records.append({"step": step, "loss": loss, "lr": result.lr, "grad_norm": grad_norm, "tokens": tokens})
            if not finite:
                self.failed = (step, result)
                break
        tokens_per_s = sum(row[2] for row in rows) / elapsed
        for record in records:
            if compiling:
                record["compile_s"] = elapsed
            else:  # the window's average: steps are not timed one by one (that would wait for the device)
                record["tokens_per_s"] = tokens_per_s
                if self.fpt:  # FLOPs per counted item known (a language model, or given by the entry point)
                    record["mfu"] = tokens_per_s * self.fpt / self.peak
        self.pending.clear()
        return records

    def raise_if_failed(self) -> None:
        """Raise NonFiniteError for the skipped step :meth:`read` found, if any."""
        if self.failed is not None:
            step, result = self.failed
            result.check_finite(step)


class RunLogger:
    """Progress bar, log lines, TensorBoard / W&B and ``metrics.jsonl`` of one run (rank 0 writes).

    A resumed run first drops the ``metrics.jsonl`` lines of steps after its checkpoint (a killed run may have
    written a few more) and tells TensorBoard to purge them, so both read like one uninterrupted run.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: TrainConfig,
        start_step: int,
        *,
        main: bool,
        progress: bool,
        config: dict | None = None,
        unit: str = "tok",
    ) -> None:
        self.main, self.max_steps, self.unit = main, cfg.max_steps, unit
        self.metrics_path = run_dir / "metrics.jsonl"
        self.bar: Any = None
        self.writer: Any = None
        self.wandb: Any = None
        if not main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.metrics_path, start_step)
        if cfg.logger in ("tensorboard", "both"):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        if cfg.logger in ("wandb", "both"):
            self.wandb = start_wandb(run_dir, start_step, config)
        if progress:
            from tqdm.auto import tqdm

            # disable=None: no bar when stderr is not a terminal (CI, log files); the log lines still appear.
            self.bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True, disable=None)

    def write(self, text: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)  # no numbers: they would wait for the device

    def train_line(self, record: dict) -> None:
        """One persistent line (the bar shows only the latest numbers), the bar's numbers, TensorBoard scalars."""
        if not self.main:
            return
        head = f"step {record['step']}/{self.max_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}"
        head += f"  grad_norm {record['grad_norm']:.3f}"
        if "compile_s" in record:
            self.write(f"{head}  compiling: {record['compile_s']:.1f} s (throughput is logged from the next step on)")
            self._scalars({"train/loss": record["loss"], "train/compile_s": record["compile_s"]}, record["step"])
            return
        mfu = f"  mfu {100 * record['mfu']:.1f}%" if "mfu" in record else ""
        self.write(f"{head}  {self.unit}/s {record['tokens_per_s']:,.0f}{mfu}")
        if self.bar is not None:
            rate = {f"{self.unit}_s": f"{record['tokens_per_s']:,.0f}"}
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", **rate, refresh=False)
        keys = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")
        scalars = {f"train/{key}": record[key] for key in keys if key in record}
        self._scalars(scalars, record["step"])

    def eval_lines(self, step: int, record: dict, texts: str | list[str] | None) -> None:
        """The evaluation numbers (``eval_*`` keys of ``record``) and the samples, as lines and in TensorBoard."""
        if not self.main:
            return
        evals = {k[5:]: v for k, v in record.items() if k.startswith("eval_")}
        if evals:
            self.write(f"eval step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in evals.items()))
        self._scalars({f"eval/{k}": v for k, v in evals.items()}, step)
        texts = [texts] if isinstance(texts, str) else list(texts or [])
        for i, text in enumerate(texts):
            self.write(f"--- sample {i} (step {step}) ---\n{text}\n---")
        if texts and self.writer is not None:
            self.writer.add_text("samples", "\n\n".join(f"    {t}".replace("\n", "\n    ") for t in texts), step)
        if texts and self.wandb is not None:
            import wandb

            pre = "".join(f"<pre>{html.escape(t)}</pre>" for t in texts)
            self.wandb.log({"samples": wandb.Html(pre)}, step=step)

    def grad_health(self, step: int, stats: dict[str, dict[str, float]], samples: list[Tensor], warnings: list[str]):
        """Per-module scalars and gradient histograms in TensorBoard; warnings as lines on stderr."""
        if not self.main:
            return
        for line in warnings:
            print(line, file=sys.stderr, flush=True)
        self._scalars({f"{key}/{m}": value for m, values in stats.items() for key, value in values.items()}, step)
        for module, sample in zip(stats, samples, strict=True):
            if self.writer is not None:
                self.writer.add_histogram(f"grad/{module}", sample, step)
            if self.wandb is not None:
                import wandb

                self.wandb.log({f"grad/{module}": wandb.Histogram(sample.float().numpy())}, step=step)

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None and scalars:
            self.wandb.log(scalars, step=step)

    def append_metrics(self, records: list[dict]) -> None:
        if self.main and records:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(record) + "\n" for record in records)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(run_dir: Path, start_step: int, config: dict | None) -> Any:
    """A W&B run for ``run_dir``: the same run id again when resuming (kept in ``run_dir/wandb-run-id``), a new one
    for a fresh start. Files go to ``run_dir/wandb``; WANDB_MODE / WANDB_PROJECT / WANDB_ENTITY apply as usual."""
    import uuid

    import wandb

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text(encoding="utf-8").strip() if start_step and id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n", encoding="utf-8")
    project = os.environ.get("WANDB_PROJECT") or __name__.split(".")[0]
    return wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir), config=config)


def truncate_metrics(path: Path, after_step: int) -> None:
    """On resume: drop records of steps after the checkpoint (a killed run may have logged a few more), and a last
    line cut short by the kill."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # half a line: the process died while writing it
        if record.get("step", 0) <= after_step:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


METRICS_FILE = "metrics.json"


def history_result(history: list[dict]) -> dict:
    """``steps`` and ``train_loss`` of a run's result (:func:`report_final`'s summary line reads them), from fit()'s
    per-step history; 0 steps and no loss when nothing was trained (a resume at max_steps). With early stopping
    ``weights`` says which checkpoint the model ends with."""
    last = history[-1] if history else {}
    result = {"steps": last.get("step", 0), "train_loss": last.get("loss")}
    if "weights_step" in last:
        result["weights"] = f"of the best checkpoint, step {last['weights_step']} (early stopping)"
    return result


def report_final(run_dir: Path, result: dict, logger: str) -> None:
    """The end of a fine-tuning or classifier run (rank 0): ``result`` to ``run_dir/metrics.json``, its final
    evaluation (``result["eval"]``) to TensorBoard under ``final/`` (scalars, per-class scores, the confusion matrix
    as text) when ``train.logger`` includes it, and the summary line to stdout."""
    (run_dir / METRICS_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    ev = result.get("eval")
    if ev and logger in ("tensorboard", "both"):
        from torch.utils.tensorboard import SummaryWriter

        step = result["steps"]
        with SummaryWriter(str(run_dir / "tb")) as writer:
            for key, value in scalar_metrics(ev).items():
                writer.add_scalar(f"final/{key}", value, step)
            for label, scores in ev.get("per_class", {}).items():
                for key in ("precision", "recall", "f1"):
                    writer.add_scalar(f"final/{key}/{label}", scores[key], step)
            if "confusion_matrix" in ev:
                table = format_confusion_matrix(ev["confusion_matrix"], ev["labels"])
                writer.add_text("confusion_matrix", "    " + table.replace("\n", "\n    "), step)
    print(summary_line(result, run_dir), flush=True)
