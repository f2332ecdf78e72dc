"""The set-up every training entry point shares, in one place, and the choice of whether to ``torch.compile``.

:func:`training_run` is what ``pretrain.run`` and ``finetune.run`` wrap their work in: distributed init, the
debugger, the refusal of a run that would overwrite checkpoints (before anything is written), and the teardown; its
:class:`RunContext` prints and saves the resolved config, sets seeds/determinism/TF32, and compiles and DDP-wraps the
model.

``train.compile: auto`` (the default) compiles on CUDA, where fusing the many small elementwise kernels of a step and
removing Python overhead pays for the compile time many times over, and stays eager everywhere a person is looking:
``--debug`` (its profile sets ``compile: false``), ``--break-on-nonfinite`` (its hooks inspect every module's output)
and an attached debugger (a breakpoint inside a compiled module does not stop). On a CPU the compile time (a C++
toolchain, minutes for a real model) is rarely won back in the short runs people do there. ``true`` / ``false`` force
it either way; a ``--train.compile`` flag beats the ``--debug`` profile like any other flag.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError, DebugConfig, TrainConfig, config_to_yaml, save_config
from .debug import debugger_attached, start_debugger
from .train import checkpoint as ckpt
from .train.distributed import DistInfo, get_rank, init_distributed, notice, teardown, wrap_ddp
from .train.logger import require_logger
from .train.loop import setup_runtime


@dataclass
class RunContext:
    """One training run's process-level facts, handed to the entry point by :func:`training_run`."""

    info: DistInfo
    run_dir: Path
    dbg: DebugConfig
    resume_from: Path | None  # the checkpoint this run continues from (verified), None = a fresh run

    def start(self, cfg: Any) -> None:
        """Print the resolved config (rank 0), then seeds, determinism and TF32: call before building the model."""
        require_logger(cfg.train.logger)  # a missing wandb fails here, before the data and the model
        if self.info.is_main:
            print(config_to_yaml(cfg), end="", flush=True)
        setup_runtime(cfg.train, self.info.device)

    def save_config(self, cfg: Any) -> None:
        """``run_dir/config.yaml`` (rank 0): ``--config`` on it reproduces the run."""
        if self.info.is_main:
            save_config(cfg, self.run_dir / "config.yaml")

    def wrap(self, model: nn.Module, compile_setting: bool | str, *, fullgraph: bool = False) -> nn.Module:
        """The model as it trains: compiled when :func:`compile_decision` says so, then DDP under torchrun."""
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
        yield RunContext(info, run_dir, dbg, resolve_start(run_dir, cfg.train))
    finally:
        teardown()


def compile_decision(setting: bool | str, device: torch.device, dbg: DebugConfig) -> tuple[bool, str]:
    """(compile or not, why) for ``train.compile`` = ``setting`` on ``device`` with the debug flags ``dbg``."""
    if dbg.break_on_nonfinite:
        return False, "--break-on-nonfinite inspects every module eagerly"
    if setting is True or setting == "true":
        return True, "train.compile true"
    if setting is False or setting == "false":
        return False, "train.compile false"
    if debugger_attached():
        return False, "a debugger is attached: breakpoints inside a compiled model would not stop"
    if device.type != "cuda":
        return False, f"train.compile auto compiles on CUDA only, this run is on {device.type}"
    return True, "train.compile auto on CUDA"


def maybe_compile(
    model: nn.Module, setting: bool | str, device: torch.device, dbg: DebugConfig, *, fullgraph: bool = False
) -> nn.Module:
    """``torch.compile(model)`` when :func:`compile_decision` says so, else ``model``; one line either way.

    ``fullgraph=True`` (our LlamaLM) turns a graph break into an error instead of a silent slowdown.
    """
    use, why = compile_decision(setting, device, dbg)
    if get_rank() == 0:
        state = "on" if use else "off"
        print(f"compile: {state} ({why})", file=sys.stderr if not use else sys.stdout, flush=True)
    return torch.compile(model, fullgraph=fullgraph) if use else model


def resolve_resume(resume: str | Path | None, root: str | Path, log: ckpt.Log = None) -> Path | None:
    """``None``/``""`` -> no resume; ``"auto"`` -> the newest intact checkpoint under ``root`` (None if there is none:
    a fresh start); anything else -> that checkpoint directory, or a checkpoints root / run directory whose newest
    intact one is taken (:func:`.train.checkpoint.newest_intact`; ``log`` gets its notices). The result is verified.

    Raises :class:`.train.checkpoint.DamagedCheckpointError` (a :class:`ConfigError`) for a damaged checkpoint named
    explicitly or a named run without an intact one, and FileNotFoundError for a path without checkpoints.
    """
    if resume is None or str(resume) == "":
        return None
    if str(resume) == "auto":
        return ckpt.newest_intact(root, log)
    path = Path(resume)
    if ckpt.is_complete(path):
        ckpt.verify_checkpoint(path, log)
        return path
    for candidate_root in (path, path / "checkpoints"):
        if ckpt.list_checkpoints(candidate_root):
            found = ckpt.newest_intact(candidate_root, log)
            if found is None:
                raise ckpt.DamagedCheckpointError(
                    f"train.resume={str(resume)!r}: every checkpoint in {candidate_root} is damaged: restore one "
                    "from a copy, or name another checkpoint"
                )
            return found
    raise FileNotFoundError(f"train.resume={str(resume)!r}: no complete checkpoint there")


def resolve_start(run_dir: str | Path, cfg: TrainConfig) -> Path | None:
    """The checkpoint this run continues from (``cfg.resume``, see :func:`resolve_resume`), or None for a fresh
    start. Worked out once per run, before anything is written, and handed to ``fit`` and the label checks.

    Raises :class:`ConfigError` when a fresh start would overwrite checkpoints (without ``cfg.overwrite``) or a
    resume path holds no intact checkpoint.
    """
    root = Path(run_dir) / "checkpoints"
    try:
        found = resolve_resume(cfg.resume, root, log=notice)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from err
    if found is None and cfg.resume == "auto":
        notice(f"no intact checkpoint in {root}: starting from step 0")
    elif found is None and ckpt.list_checkpoints(root) and not cfg.overwrite:
        raise ConfigError(
            f"{run_dir} already has checkpoints (latest {ckpt.latest_checkpoint(root).name}): continue it with "
            "--train.resume auto, start a new run with another --name, or replace it with --train.overwrite true"
        )
    return found


def check_resume_labels(resume_from: Path | None, labels: list[str] | None) -> None:
    """Refuse (ConfigError) to resume a classifier whose checkpoint was trained on other classes than ``labels``:
    its output layer has one row per class, in that order. Checkpoints keep them as ``extra["labels"]``."""
    if resume_from is None or labels is None:
        return
    saved = (ckpt.load_trainer_state(resume_from, verified=True).get("extra") or {}).get("labels")
    if saved is not None and list(saved) != list(labels):
        raise ConfigError(f"{resume_from}: checkpoint labels {saved} differ from the data's labels {labels}")
