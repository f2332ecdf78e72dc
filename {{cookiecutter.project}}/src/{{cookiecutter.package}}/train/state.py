"""What a checkpoint holds besides its files' safety (:mod:`.checkpoint`): the model's weights as safetensors, and the
process's RNG states and other run state as plain data that ``torch.load(weights_only=True)`` accepts."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn


def has_frozen_params(model: nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def model_state(model: nn.Module, trainable_only: bool | None = None) -> dict[str, torch.Tensor]:
    """The tensors to save: the full ``state_dict`` or, for a partly frozen model, only the trainable parameters.

    ``trainable_only=None`` decides automatically: a model with frozen parameters (a peft/LoRA wrapper) saves only
    what training changes, so a checkpoint of a fine-tune is megabytes, not the whole base model.
    """
    if trainable_only is None:
        trainable_only = has_frozen_params(model)
    if trainable_only:
        return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    return {name: t.detach() for name, t in model.state_dict().items()}


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop the second name of tensors that share memory (tied embeddings); return ``{alias: kept_name}``.

    safetensors refuses to store two names for one storage; the alias map goes into the file's metadata and
    :func:`load_model_weights` restores it.
    """
    kept: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() > 0 and key in kept:
            aliases[name] = kept[key]
            continue
        kept[key] = name
        out[name] = t
    return out, aliases


def save_model_weights(model: nn.Module, path: str | Path, trainable_only: bool | None = None) -> Path:
    """Write ``model``'s weights to a safetensors file (shared tensors stored once). Not atomic on its own."""
    state, aliases = _dedupe_shared(model_state(model, trainable_only))
    tensors = {name: t.cpu().contiguous() for name, t in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})
    return Path(path)


def load_model_weights(model: nn.Module, path: str | Path, strict: bool | None = None) -> None:
    """Load a file written by :func:`save_model_weights` into ``model`` (on whatever device ``model`` is on).

    ``strict=None``: strict unless the model has frozen parameters (then only the saved, trainable ones load; every
    saved name must still exist in the model).
    """
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(path))
    for alias, name in json.loads(metadata.get("aliases", "{}")).items():
        tensors[alias] = tensors[name]
    if strict is None:
        strict = not has_frozen_params(model)
    result = model.load_state_dict(tensors, strict=strict)
    if result.unexpected_keys:
        raise KeyError(f"{path}: weights not in the model: {', '.join(result.unexpected_keys[:5])}")


def to_plain(value: Any) -> Any:
    """numpy arrays/scalars -> lists/Python numbers, recursively, so ``torch.load(weights_only=True)`` accepts it."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_plain(v) for v in value)
    return value


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (CPU) and CUDA generator states of this process."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
