"""Everything a training job sets up once, in one place: distributed init, the debugger, the resume point, seeds,
determinism, TF32, the precision and whether to ``torch.compile``. Nothing in ``train/``, ``model/`` or ``data/``
imports this module: it hands the loop what it decided (:class:`.train.loop.RunSetup`).

:func:`training_run` is what every training entry point wraps its work in: distributed init, the debugger, the
resume point resolved once (:func:`resolve_start`, which refuses a run that would overwrite checkpoints before
anything is written), and the teardown; its :class:`RunContext` prints and saves the resolved config, sets
seeds/determinism/TF32 and the precision (:meth:`RunContext.start`), and compiles and wraps the model for the ranks
(``train.parallel``: DDP, or FSDP2 which shards it; one process trains the plain model either way).

``train.compile: auto`` (the default) compiles on CUDA, where fusing the many small elementwise kernels of a step and
removing Python overhead pays for the compile time many times over, and stays eager everywhere a person is looking:
``--debug`` (its profile sets ``compile: never``), ``--break-on-nonfinite`` (its hooks inspect every module's output)
and an attached debugger (a breakpoint inside a compiled module does not stop). On a CPU the compile time (a C++
toolchain, minutes for a real model) is rarely won back in the short runs people do there. ``always`` / ``never``
force it either way; a ``--train.compile`` flag beats the ``--debug`` profile like any other flag.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import Auto, ConfigError, DebugConfig, TrainConfig, config_to_yaml, save_config
from .debug import debugger_attached, start_debugger
from .train import checkpoint as ckpt
from .train.distributed import DistInfo, get_rank, init_distributed, notice, teardown, wrap_ddp, wrap_fsdp
from .train.logger import require_logger
from .train.loop import RunSetup


@dataclass
class RunContext:
    """One training run's process-level facts, handed to the entry point by :func:`training_run`."""

    info: DistInfo
    run_dir: Path
    dbg: DebugConfig
    setup: RunSetup  # what fit() gets: the resume point from the start, the precision once start() has run
    parallel: str = "ddp"  # train.parallel

    @property
    def resume_from(self) -> Path | None:
        """The checkpoint this run continues from (verified), None for a fresh run."""
        return self.setup.resume_from

    def start(self, cfg: Any) -> None:
        """Print the resolved config (rank 0), then seeds, determinism, TF32 and the precision: call before building
        the model."""
        require_logger(cfg.train.logger)  # a missing wandb fails here, before the data and the model
        if self.info.is_main:
            print(config_to_yaml(cfg), end="", flush=True)
        setup_runtime(cfg.train, self.info.device)
        dtype = resolve_precision(self.info.device, cfg.train.precision)
        self.setup = replace(self.setup, autocast=autocast_context(self.info.device, dtype), dtype=dtype)

    def save_config(self, cfg: Any) -> None:
        """``run_dir/config.yaml`` (rank 0): ``--config`` on it reproduces the run."""
        if self.info.is_main:
            save_config(cfg, self.run_dir / "config.yaml")

    def wrap(self, model: nn.Module, compile_setting: Auto, *, fullgraph: bool = False) -> nn.Module:
        """The model as it trains: compiled when :func:`compile_decision` says so, then DDP under torchrun; or with
        ``train.parallel fsdp`` on several ranks each block compiled, then sharded (FSDP2, bf16 weights in compute
        when the run is bf16)."""
        if self.parallel == "fsdp" and self.info.distributed:
            use = compile_wanted(compile_setting, self.info.device, self.dbg)
            compile_block = functools.partial(torch.compile, fullgraph=fullgraph) if use else None
            return wrap_fsdp(model, self.info, self.setup.dtype, compile_block)
        return wrap_ddp(
            maybe_compile(model, compile_setting, self.info.device, self.dbg, fullgraph=fullgraph), self.info
        )


@contextlib.contextmanager
def training_run(cfg: Any, dbg: DebugConfig) -> Iterator[RunContext]:
    """Distributed init, the debugger (``--debugpy``/``--pycharm-debug``), then the resume point, resolved once
    (:func:`resolve_start`), which refuses early (an existing run without resume/overwrite, a bad or damaged resume
    path) so a refused run changes nothing; the process group is torn down at the end, whatever happens. ``cfg`` is
    any config with ``train``, ``out_dir`` and ``name``."""
    info = init_distributed(cfg.train.device)
    try:
        start_debugger(dbg, info.rank)
        run_dir = Path(cfg.out_dir) / cfg.name
        setup = RunSetup(resolve_start(run_dir, cfg.train), break_on_nonfinite=dbg.break_on_nonfinite)
        yield RunContext(info, run_dir, dbg, setup, cfg.train.parallel)
    finally:
        teardown()


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_runtime(cfg: TrainConfig, device: torch.device) -> None:
    """Seeds, determinism and matmul precision; call once before the model is built (its init draws random numbers).

    Every rank uses the same seed so that models start identical; data sources are seeded per rank by the caller.
    """
    seed_everything(cfg.seed)
    if cfg.deterministic:
        # cuBLAS needs a fixed workspace to be reproducible; must be set before the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an op without a deterministic kernel warns (naming itself) instead of ending the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if device.type == "cuda":
        # "high" lets fp32 matmuls use TF32 tensor cores (Ampere+): ~8x the fp32 rate at ~1e-3 relative precision.
        torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")


def _read_cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (Linux x86 'flags', arm64 'Features'); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def cpu_supports_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (x86 AVX512-BF16 / AMX-BF16, Arm BF16), where autocast pays off.

    Without it bf16 is emulated through fp32 conversions and is *slower* than plain fp32.
    """
    flags = _read_cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        return True
    if sys.platform == "darwin":  # Apple silicon M2 and later report FEAT_BF16
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return out.strip() == "1"
    return False


def resolve_precision(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``: ``torch.bfloat16`` or ``None`` (plain fp32).

    ``auto`` and ``bf16`` use bf16 autocast where the hardware has native bf16 (CUDA with ``is_bf16_supported``,
    CPUs with AVX512-BF16/AMX/Arm BF16) and fall back to fp32 with a one-line notice otherwise. fp16 is not
    offered: it needs loss scaling, and every GPU with bf16 is better served by it.
    """
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        notice(f"notice: {torch.cuda.get_device_name(device)} has no bf16 support: training in fp32 (TF32 if allowed)")
        return None
    if device.type == "cpu":
        if cpu_supports_bf16():
            return torch.bfloat16
        notice("notice: this CPU has no native bf16 (AVX512-BF16/AMX/Arm BF16): training in fp32")
        return None
    notice(f"notice: bf16 autocast is not used on {device.type}: training in fp32")
    return None


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """A reusable context manager for every forward pass: bf16 autocast, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compile_decision(setting: Auto, device: torch.device, dbg: DebugConfig) -> tuple[bool, str]:
    """(compile or not, why) for ``train.compile`` = ``setting`` on ``device`` with the debug flags ``dbg``."""
    if dbg.break_on_nonfinite:
        return False, "--break-on-nonfinite inspects every module eagerly"
    if setting != "auto":
        return setting == "always", f"train.compile {setting}"
    if debugger_attached():
        return False, "a debugger is attached: breakpoints inside a compiled model would not stop"
    if device.type != "cuda":
        return False, f"train.compile auto compiles on CUDA only, this run is on {device.type}"
    return True, "train.compile auto on CUDA"


def compile_wanted(setting: Auto, device: torch.device, dbg: DebugConfig) -> bool:
    """:func:`compile_decision`, said in one line (rank 0)."""
    use, why = compile_decision(setting, device, dbg)
    if get_rank() == 0:
        state = "on" if use else "off"
        print(f"compile: {state} ({why})", file=sys.stderr if not use else sys.stdout, flush=True)
    return use


def maybe_compile(
    model: nn.Module, setting: Auto, device: torch.device, dbg: DebugConfig, *, fullgraph: bool = False
) -> nn.Module:
    """``torch.compile(model)`` when :func:`compile_decision` says so, else ``model``; one line either way.

    ``fullgraph=True`` (our LlamaLM) turns a graph break into an error instead of a silent slowdown.
    """
    return torch.compile(model, fullgraph=fullgraph) if compile_wanted(setting, device, dbg) else model


def named_checkpoint(path: str | Path, log: ckpt.Log = None) -> Path:
    """``train.resume_from``: that checkpoint directory, or the newest intact checkpoint of a checkpoints root or run
    directory (:func:`.train.checkpoint.newest_intact`; ``log`` gets its notices); verified either way.

    Raises :class:`.train.checkpoint.DamagedCheckpointError` (a :class:`ConfigError`) for a damaged checkpoint named
    explicitly or a named run without an intact one, and :class:`ConfigError` for a path without checkpoints.
    """
    path = Path(path)
    if ckpt.is_complete(path):
        ckpt.verify_checkpoint(path, log)
        return path
    for candidate_root in (path, path / "checkpoints"):
        if ckpt.list_checkpoints(candidate_root):
            found = ckpt.newest_intact(candidate_root, log)
            if found is None:
                raise ckpt.DamagedCheckpointError(
                    f"train.resume_from={str(path)!r}: every checkpoint in {candidate_root} is damaged: restore one "
                    "from a copy, or name another checkpoint"
                )
            return found
    raise ConfigError(f"train.resume_from={str(path)!r}: no complete checkpoint there")


def resolve_start(run_dir: str | Path, cfg: TrainConfig) -> Path | None:
    """The checkpoint this run continues from, or None for a fresh start: ``cfg.resume_from`` (see
    :func:`named_checkpoint`), else with ``cfg.resume`` auto the run's newest intact checkpoint. Worked out once per
    run, before anything is written, and handed to ``fit`` and the label checks.

    Raises :class:`ConfigError` when a fresh start would overwrite checkpoints (without ``cfg.overwrite``) or the
    named checkpoint is missing or damaged.
    """
    root = Path(run_dir) / "checkpoints"
    if cfg.resume_from is not None:
        return named_checkpoint(cfg.resume_from, log=notice)
    if cfg.resume == "auto":
        found = ckpt.newest_intact(root, notice)
        if found is None:
            notice(f"no intact checkpoint in {root}: starting from step 0")
        return found
    if ckpt.list_checkpoints(root) and not cfg.overwrite:
        raise ConfigError(
            f"{run_dir} already has checkpoints (latest {ckpt.latest_checkpoint(root).name}): continue it with "
            "--train.resume auto, start a new run with another --name, or replace it with --train.overwrite true"
        )
    return None


def check_resume_labels(resume_from: Path | None, labels: list[str] | None) -> None:
    """Refuse (ConfigError) to resume a classifier whose checkpoint was trained on other classes than ``labels``:
    its output layer has one row per class, in that order. Checkpoints keep them as ``extra["labels"]``."""
    if resume_from is None or labels is None:
        return
    saved = (ckpt.load_trainer_state(resume_from, verified=True).get("extra") or {}).get("labels")
    if saved is not None and list(saved) != list(labels):
        raise ConfigError(f"{resume_from}: checkpoint labels {saved} differ from the data's labels {labels}")
