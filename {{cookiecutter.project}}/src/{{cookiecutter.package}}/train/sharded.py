"""Sharded model and optimizer state under ``--train.parallel fsdp``, through ``torch.distributed.checkpoint`` (DCP).

A checkpoint of an fsdp run holds ``sharded/`` instead of ``model.safetensors`` and the optimizer part of
``trainer.pt``: DCP's ``.metadata`` and one ``__<rank>_0.distcp`` file per rank that wrote it, each with that rank's
shards of the weights and AdamW state, keyed by parameter name (``get_state_dict``). Loading reshards: any world size
reads it (2 ranks -> 1 -> 2), a single process without a process group included, into a sharded or a plain model.
A model with frozen parameters (a LoRA base) saves only its trainable ones, as ``model.safetensors`` does.
Everything here but :func:`is_sharded_checkpoint` is collective under a process group: every rank calls it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .state import has_frozen_params

SHARDED_DIR = "sharded"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A checkpoint directory written by :func:`save_sharded`."""
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


@contextlib.contextmanager
def _single_process_quietly() -> Iterator[None]:
    """DCP warns at every save and load without a process group that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _options(model: nn.Module) -> StateDictOptions:
    frozen = has_frozen_params(model)  # a LoRA base is the base model's files, not the checkpoint's
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """What a sharded checkpoint holds, as this rank's tensors (DTensor shards, or whole) keyed by parameter name."""
    if optimizer is None:
        state = {"model": get_model_state_dict(model, options=_options(model))}
    else:
        model_state, optim_state = get_state_dict(model, optimizer, options=_options(model))
        state = {"model": model_state, "optimizer": optim_state}
    # ignore_frozen_params misses the second name of a tied frozen weight (a LoRA base's lm_head): drop it too
    named = model.named_parameters(remove_duplicate=False)
    frozen = {name.replace("_orig_mod.", "") for name, p in named if not p.requires_grad}
    state["model"] = {k: v for k, v in state["model"].items() if k not in frozen}
    return state


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Every rank writes its shards of ``model`` (and ``optimizer``) into ``directory/sharded``."""
    with _single_process_quietly():
        dcp.save(_state(model, optimizer), checkpoint_id=Path(directory) / SHARDED_DIR)


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Read ``directory/sharded`` into ``model`` (and ``optimizer``), whatever the world size it was saved at: DCP
    fills each of this rank's tensors from the saved shards that overlap it."""
    state = _state(model, optimizer)
    with _single_process_quietly():
        dcp.load(state, checkpoint_id=Path(directory) / SHARDED_DIR)
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=_options(model))
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
            options=_options(model),
        )  # fmt: skip


def full_state_dict(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole weights of a sharded ``model`` on rank 0's CPU, gathered one tensor at a time (an empty dict on the
    other ranks), so no rank ever holds more than one copy of the model: what the exports write.
    ``trainable_only``: the trainable parameters alone (LoRA adapters)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)
