"""What a run shows and writes while it trains: the progress bar, log lines, TensorBoard and ``metrics.jsonl``.

Two pieces, both used by :func:`.loop.fit`:

- :class:`StepLog` holds the steps since the device was last read and the clock of that window: ``train_step``
  leaves its numbers on the device, and reading them once per ``log_every`` is what keeps a GPU busy;
- :class:`RunLogger` turns the records into output, on rank 0 only (every method is a no-op elsewhere).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from .step import StepResult


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
                record["mfu"] = tokens_per_s * (self.fpt or 0.0) / self.peak
        self.pending.clear()
        return records

    def raise_if_failed(self) -> None:
        """Raise NonFiniteLossError for the skipped step :meth:`read` found, if any."""
        if self.failed is not None:
            step, result = self.failed
            result.check_finite(step)


class RunLogger:
    """Progress bar, log lines, TensorBoard scalars/text and ``metrics.jsonl`` of one run (rank 0 writes).

    A resumed run first drops the ``metrics.jsonl`` lines of steps after its checkpoint (a killed run may have
    written a few more) and tells TensorBoard to purge them, so both read like one uninterrupted run.
    """

    def __init__(self, run_dir: Path, cfg: TrainConfig, start_step: int, *, main: bool, progress: bool) -> None:
        self.main, self.max_steps = main, cfg.max_steps
        self.metrics_path = run_dir / "metrics.jsonl"
        self.bar: Any = None
        self.writer: Any = None
        if not main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.metrics_path, start_step)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
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
            return
        self.write(f"{head}  tok/s {record['tokens_per_s']:,.0f}  mfu {100 * record['mfu']:.1f}%")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def eval_lines(self, step: int, record: dict, texts: str | list[str] | None) -> None:
        """The evaluation numbers (``eval_*`` keys of ``record``) and the samples, as lines and in TensorBoard."""
        if not self.main:
            return
        evals = {k[5:]: v for k, v in record.items() if k.startswith("eval_")}
        if evals:
            self.write(f"eval step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in evals.items()))
        if self.writer is not None:
            for key, value in evals.items():
                self.writer.add_scalar(f"eval/{key}", value, step)
        texts = [texts] if isinstance(texts, str) else list(texts or [])
        for i, text in enumerate(texts):
            self.write(f"--- sample {i} (step {step}) ---\n{text}\n---")
        if texts and self.writer is not None:
            self.writer.add_text("samples", "\n\n".join(f"    {t}".replace("\n", "\n    ") for t in texts), step)

    def append_metrics(self, records: list[dict]) -> None:
        if self.main and records:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(record) + "\n" for record in records)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


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
