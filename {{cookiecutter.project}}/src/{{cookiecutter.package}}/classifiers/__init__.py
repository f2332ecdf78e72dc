"""Trained classifiers in their run directories: what a classifier's training leaves there, and what ``predict`` loads.

Every classifier run leaves ``config.yaml`` (the resolved config, preprocessing included), ``label_map.json`` (class id
-> label) and, once it finished, ``metrics.json``, whose ``task`` names the kind of run. The module of this package
named after that task (``classify``: text classification by ``finetune --task classify``; one per extra project the
project was made with) knows the model files that kind of run writes and turns a new input file into what the model
takes with the training data's own reading functions and the saved config: the same preprocessing by construction.
A task without a module here (``sft``) is not a classifier's run.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..train.logger import METRICS_FILE
from ..train.state import load_model_weights


@dataclass
class Classifier:
    """A trained classifier ready for new inputs."""

    labels: list[str]  # class id -> label
    model: nn.Module  # eval mode, on its device; ``model(**collate(examples)).logits`` is [B, K]
    read_file: Callable[[Path], Any]  # one input file -> one example; ConfigError (one line) when it is unusable
    collate: Callable[[list[Any]], dict[str, Tensor]]  # examples -> the model's keyword arguments (CPU tensors)
    suffixes: tuple[str, ...]  # the files of a folder that are inputs
    read_line: Callable[[str], Any] | None = None  # a line of standard input -> an example (text classifiers)

    @torch.no_grad()
    def probabilities(self, examples: list[Any]) -> Tensor:
        """[B, K] class probabilities (float32, CPU) of a batch of examples."""
        device = next(self.model.parameters()).device
        batch = {key: value.to(device) for key, value in self.collate(examples).items()}
        return torch.softmax(self.model(**batch).logits.float(), dim=-1).cpu()


def kinds() -> list[str]:
    """The tasks whose runs this project can load: the modules of this package."""
    return sorted(module.name for module in pkgutil.iter_modules(__path__))


def run_task(run_dir: Path) -> str:
    """The ``task`` a finished run recorded in its metrics.json (ConfigError when there is none)."""
    path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    if not path.is_file():
        trained = " / ".join(kinds())
        raise ConfigError(f"{run_dir}: not a finished run (no {METRICS_FILE}); predict takes a {trained} run")
    task = json.loads(path.read_text(encoding="utf-8")).get("task")
    if task is None:
        raise ConfigError(f"{run_dir}: its {METRICS_FILE} names no task: not a classifier's run")
    return task


def load_classifier(run_dir: str | Path, device: torch.device) -> Classifier:
    """The classifier a finished run trained, on ``device`` in eval mode."""
    run_dir = Path(run_dir)
    task = run_task(run_dir)
    if task not in kinds():
        raise ConfigError(f"{run_dir} is a {task} run, not a classifier's: predict takes a {' / '.join(kinds())} run")
    classifier = importlib.import_module(f"{__name__}.{task}").load(run_dir)
    classifier.model.to(device).eval()
    return classifier


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """``model`` with the final weights a from-scratch training saved at ``path`` (ConfigError when there are
    none)."""
    if not path.is_file():
        raise ConfigError(f"{path.parent}: no {path.name}: the run did not finish (its checkpoints hold the weights)")
    load_model_weights(model, path, strict=True)
    return model
