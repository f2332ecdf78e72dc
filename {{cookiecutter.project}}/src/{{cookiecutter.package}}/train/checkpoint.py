"""Crash-safe checkpoints: weights in safetensors, trainer state in a weights-only torch file, atomic publication.

Layout of ``<run_dir>/checkpoints/``::

    step-000100/
        model.safetensors   # weights (only the trainable ones for a partly frozen model such as peft/LoRA)
        trainer.pt          # optimizer, scheduler, step, RNG states, data position, config, extra state
        ...                 # whatever the optional save_model callback writes (e.g. a LoRA adapter)
    step-000200/
    latest                  # text file: "step-000200"

Writing never exposes a partial checkpoint: everything goes into a hidden ``.tmp-step-...`` directory, every file
and the directory are fsync'ed, the directory is renamed to ``step-NNNNNN`` (an atomic rename on POSIX and NTFS) and
only then the ``latest`` file is replaced atomically (write ``latest.tmp``, fsync, ``os.replace``). A kill at any
moment leaves the previous checkpoint published and loadable; leftover ``.tmp-*`` directories are ignored and
cleaned up by the next save. :func:`latest_checkpoint` also survives a missing or stale ``latest`` file by falling
back to the newest complete ``step-*`` directory.

Loading uses ``torch.load(weights_only=True)``: the trainer state only holds tensors, numbers, strings, lists,
tuples and dicts (numpy's RNG state is converted to plain lists), so no pickled code is ever executed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# --------------------------------------------------------------------------------------------------------------------
# Model weights
# --------------------------------------------------------------------------------------------------------------------


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
    from safetensors import safe_open

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


# --------------------------------------------------------------------------------------------------------------------
# RNG and plain-data helpers
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Atomic file system helpers
# --------------------------------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes a rename/creation inside `path` durable. Directories cannot be opened on Windows: skip there.
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / (LATEST_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST_FILE)
    _fsync_dir(root)


def is_complete(path: str | Path) -> bool:
    """A published checkpoint directory: named ``step-N`` and holding both files."""
    path = Path(path)
    return (
        path.is_dir()
        and _STEP_DIR.match(path.name) is not None
        and (path / MODEL_FILE).is_file()
        and (path / TRAINER_FILE).is_file()
    )


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` sorted by step (hidden temp directories are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint named by ``root/latest``, or the newest complete one if that file is missing or stale."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if candidate.parent == root and is_complete(candidate):
            return candidate
    found = list_checkpoints(root)
    return found[-1] if found else None


# --------------------------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------------------------


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    data_state: Any = None,
    rng: Any = None,
    config: dict | None = None,
    extra: dict | None = None,
    save_model: Callable[[nn.Module, Path], None] | None = None,
    trainable_only: bool | None = None,
    keep: int = 0,
) -> Path:
    """Atomically publish ``root/step-NNNNNN`` and point ``root/latest`` at it; returns the directory.

    Call on the main process only (the caller gathers per-rank ``data_state``/``rng`` first). ``model`` must be the
    unwrapped module (no DDP/compile wrapper) so parameter names match a fresh model.

    Args:
        data_state: the batch source position (``BatchSource.state_dict()``, or a per-rank list of them).
        rng: RNG states to store; default :func:`rng_state` of this process.
        config: the resolved run config as a plain dict (:func:`..config.config_to_dict`).
        extra: any other plain data to keep with the checkpoint (e.g. a label map).
        save_model: ``fn(model, tmp_dir)`` writes more files into the checkpoint before it is published, e.g. a peft
            adapter via ``model.save_pretrained(tmp_dir / "adapter")``.
        trainable_only: see :func:`model_state`.
        keep: after publishing, delete all but the newest ``keep`` checkpoints (0 = keep all).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = root / name
    for stale in root.glob(".tmp-*"):  # debris of a killed save: never published, safe to delete
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        save_model_weights(model, tmp / MODEL_FILE, trainable_only)
        trainer = {
            "format": FORMAT_VERSION,
            "step": int(step),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": to_plain(rng if rng is not None else rng_state()),
            "data": to_plain(data_state),
            "config": to_plain(config),
            "extra": to_plain(extra),
        }
        torch.save(trainer, tmp / TRAINER_FILE)
        if save_model is not None:
            save_model(model, tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        _fsync_dir(tmp)
        if final.exists():
            # Re-saving a step (e.g. a run resumed from an older checkpoint): publish the new one, then drop the old.
            trash = root / f".tmp-old-{name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_latest(root, name)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The ``trainer.pt`` dict of a checkpoint directory, loaded with ``weights_only=True``."""
    state = torch.load(Path(path) / TRAINER_FILE, map_location=map_location, weights_only=True)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {state.get('format')!r} (expected {FORMAT_VERSION})")
    return state


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    restore_rng: bool = True,
    rank: int = 0,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore weights (+ optimizer, scheduler, RNG when given) from a checkpoint directory; return the trainer state.

    The returned dict has ``step`` (optimizer steps already taken), ``data`` (batch source position), ``config``
    and ``extra``. ``model`` is the unwrapped module; optimizer state is moved to the parameters' device by
    ``Optimizer.load_state_dict``. When the RNG state was saved per rank (a list), ``rank`` picks this process's.
    """
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (expected {MODEL_FILE} and {TRAINER_FILE})")
    load_model_weights(model, path / MODEL_FILE)
    state = load_trainer_state(path, map_location="cpu")
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and state.get("rng") is not None:
        rng = state["rng"]
        if isinstance(rng, list):
            rng = rng[rank] if rank < len(rng) else rng[0]
        set_rng_state(rng)
    return state


def resolve_resume(resume: str | Path | None, root: str | Path) -> Path | None:
    """``None``/``""`` -> no resume; ``"auto"`` -> latest checkpoint under ``root`` (None if there is none yet);
    anything else -> that checkpoint directory, or a checkpoints root / run directory whose latest is taken.
    """
    if resume is None or str(resume) == "":
        return None
    if str(resume) == "auto":
        return latest_checkpoint(root)
    path = Path(resume)
    if is_complete(path):
        return path
    for candidate_root in (path, path / "checkpoints"):
        found = latest_checkpoint(candidate_root)
        if found is not None:
            return found
    raise FileNotFoundError(f"train.resume={str(resume)!r}: no complete checkpoint there")
