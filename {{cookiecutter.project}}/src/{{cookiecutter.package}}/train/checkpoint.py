"""Crash-safe checkpoints: weights in safetensors, trainer state in a weights-only torch file, atomic publication.

Layout of ``<run_dir>/checkpoints/``::

    step-000100/
        manifest.json       # size and sha256 of every other file, written last (see below)
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

Each checkpoint verifies itself: ``manifest.json`` lists every other file of the directory with its size and sha256
(``{"format": 1, "files": {"model.safetensors": {"size": 5678, "sha256": "..."}, ...} }``) and is written before the
directory is published. Everything that reads a checkpoint checks it first (sizes, then hashes) and a damaged one
raises :class:`DamagedCheckpointError`, one line naming the file and what is wrong. :func:`resolve_resume` skips
damaged checkpoints with one line each and takes the newest intact one. Nothing is deleted because it is damaged:
retention neither counts nor removes damaged checkpoints, and re-saving a damaged step sets the old directory aside
as ``step-NNNNNN.damaged-<time>``. Checkpoints saved before manifests existed load unverified, with a notice.

Loading uses ``torch.load(weights_only=True)``: the trainer state only holds tensors, numbers, strings, lists,
tuples and dicts (numpy's RNG state is converted to plain lists), so no pickled code is ever executed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ConfigError

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
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


# --------------------------------------------------------------------------------------------------------------------
# Manifest: every checkpoint verifies itself
# --------------------------------------------------------------------------------------------------------------------


class DamagedCheckpointError(ConfigError):
    """A checkpoint whose files do not match its manifest (a ConfigError: entry points exit 2 with its one line)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _payload(directory: Path) -> list[Path]:
    """The files a manifest covers: all of the directory's, at any depth, but the manifest itself."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p != directory / MANIFEST_FILE)


def write_manifest(directory: Path) -> None:
    files = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _payload(directory)
    }
    text = json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1)
    (directory / MANIFEST_FILE).write_text(text + "\n", encoding="utf-8")


def _read_manifest(directory: Path) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"} }``; raises ValueError saying what is wrong with the manifest."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{MANIFEST_FILE} is unreadable ({' '.join(str(err).split())})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{MANIFEST_FILE} has format {found!r}, this version reads {MANIFEST_FORMAT}")
    files = manifest.get("files")
    entries = files.values() if isinstance(files, dict) else [None]
    if not all(isinstance(v, dict) and {"size", "sha256"} <= v.keys() for v in entries):
        raise ValueError(f"{MANIFEST_FILE} has no valid file list")
    return files


def _find_damage(directory: Path, *, hashes: bool = True) -> str | None:
    """What is wrong with ``directory`` against its manifest, or None. All sizes are compared before any hash, so
    a truncated file is named without reading gigabytes; ``hashes=False`` stops there."""
    try:
        files = _read_manifest(directory)
    except ValueError as err:
        return str(err)
    for name, want in files.items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if (size := file.stat().st_size) != want["size"]:
            return f"{name} is {size} bytes, manifest says {want['size']}"
    for name, want in files.items() if hashes else ():
        if (digest := _sha256(directory / name)) != want["sha256"]:
            return f"{name} has sha256 {digest[:12]}..., manifest says {want['sha256'][:12]}...: its bytes changed"
    return None


@dataclasses.dataclass
class _Verdict:
    signature: tuple  # the files' stat when checked: any change makes the verdict stale
    verified: bool  # False: no manifest (saved before manifests existed)
    damage: str | None
    reported: bool = False


# Entry points resolve the same checkpoint several times (early refusal, finetune's label check, fit) and then load
# it: it is hashed once per process and each damaged or unverifiable checkpoint is reported once.
_verdicts: dict[str, _Verdict] = {}


def _signature(directory: Path) -> tuple:
    stats = [(p.relative_to(directory).as_posix(), p.stat()) for p in sorted(directory.rglob("*")) if p.is_file()]
    return tuple((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for name, st in stats)


def _verdict(directory: Path) -> _Verdict:
    key, signature = str(directory.resolve()), _signature(directory)
    cached = _verdicts.get(key)
    if cached is None or cached.signature != signature:
        verified = (directory / MANIFEST_FILE).exists()
        cached = _verdicts[key] = _Verdict(signature, verified, _find_damage(directory) if verified else None)
    return cached


def _looks_damaged(directory: Path) -> bool:
    """Cheap check for retention: a known verdict, else the sizes (hashing every kept checkpoint at each save would
    cost more than the save; flipped bits are caught when loading)."""
    cached = _verdicts.get(str(directory.resolve()))
    if cached is not None and cached.signature == _signature(directory):
        return cached.damage is not None
    return (directory / MANIFEST_FILE).exists() and _find_damage(directory, hashes=False) is not None


def _report_once(verdict: _Verdict, log: Callable[[str], None] | None, message: str) -> None:
    if log is not None and not verdict.reported:
        log(message)
        verdict.reported = True


def _damage_message(path: Path, damage: str) -> str:
    return f"damaged checkpoint {path}: {damage}"


def _unverified_message(path: Path) -> str:
    return f"notice: {path} has no {MANIFEST_FILE} (saved by an older version): using it unverified"


def verify_checkpoint(path: str | Path, log: Callable[[str], None] | None = None) -> None:
    """Raise :class:`DamagedCheckpointError` unless ``path``'s files match its manifest. A checkpoint without a
    manifest passes (``log`` gets a notice, once per process, that it cannot be verified)."""
    path = Path(path)
    verdict = _verdict(path)
    if verdict.damage is not None:
        raise DamagedCheckpointError(
            f"{_damage_message(path, verdict.damage)} (resume from another checkpoint; --train.resume auto takes "
            "the newest intact one of the run)"
        )
    if not verdict.verified:
        _report_once(verdict, log, _unverified_message(path))


# --------------------------------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------------------------------


def is_complete(path: str | Path) -> bool:
    """A published checkpoint directory: named ``step-N`` and holding a manifest (its files are checked when it is
    read) or, saved before manifests existed, both files."""
    path = Path(path)
    if not path.is_dir() or _STEP_DIR.match(path.name) is None:
        return False
    return (path / MANIFEST_FILE).exists() or ((path / MODEL_FILE).is_file() and (path / TRAINER_FILE).is_file())


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


def newest_intact(root: str | Path, log: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint ``root/latest`` names if it is intact, else the newest intact one by step; None if none is.

    ``log`` gets one line per damaged checkpoint skipped (``skipping damaged checkpoint <path>: <what>``) and a
    notice when the one taken has no manifest, each once per process. Nothing is deleted.
    """
    candidates = list_checkpoints(root)[::-1]
    pointed = latest_checkpoint(root)
    if pointed is not None:
        candidates = [pointed, *(p for p in candidates if p != pointed)]
    for path in candidates:
        verdict = _verdict(path)
        if verdict.damage is None:
            if not verdict.verified:
                _report_once(verdict, log, _unverified_message(path))
            return path
        _report_once(verdict, log, f"skipping {_damage_message(path, verdict.damage)}")
    return None


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
        keep: after publishing, delete all but the newest ``keep`` intact checkpoints (0 = keep all; see
            :func:`_prune`).
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
        write_manifest(tmp)  # last, so it covers the callback's files too
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        _fsync_dir(tmp)
        if final.exists() and _verdict(final).damage is not None:
            # A run resumed past a damaged checkpoint reaches its step again: keep the evidence, publish the new one.
            os.replace(final, root / f"{name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
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
        _prune(root, keep, final)
    return final


def _prune(root: Path, keep: int, final: Path) -> None:
    """Delete all but ``final`` and the newest ``keep`` intact checkpoints. Damaged ones neither count nor go: they
    never push a good checkpoint out, and nothing is deleted because it is damaged. ``final`` was hashed as it was
    written, so the newest intact checkpoint always stays."""
    kept = 0
    for path in reversed(list_checkpoints(root)):
        if path == final:
            kept += 1
        elif not _looks_damaged(path):
            if kept >= keep:
                shutil.rmtree(path, ignore_errors=True)
            kept += 1


def load_trainer_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The ``trainer.pt`` dict of a checkpoint directory, loaded with ``weights_only=True`` once its files are
    verified (:class:`DamagedCheckpointError` otherwise)."""
    verify_checkpoint(path)
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
    Raises :class:`DamagedCheckpointError` before touching ``model`` when the files do not match the manifest.
    """
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (expected {MODEL_FILE} and {TRAINER_FILE})")
    verify_checkpoint(path)
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


def resolve_resume(
    resume: str | Path | None, root: str | Path, log: Callable[[str], None] | None = None
) -> Path | None:
    """``None``/``""`` -> no resume; ``"auto"`` -> the newest intact checkpoint under ``root`` (None if there is none:
    a fresh start); anything else -> that checkpoint directory, or a checkpoints root / run directory whose newest
    intact one is taken (see :func:`newest_intact`; ``log`` gets its notices).

    Raises :class:`DamagedCheckpointError` (a :class:`ConfigError`) for a damaged checkpoint named explicitly or a
    named run without an intact one, and FileNotFoundError for a path without checkpoints.
    """
    if resume is None or str(resume) == "":
        return None
    if str(resume) == "auto":
        return newest_intact(root, log)
    path = Path(resume)
    if is_complete(path):
        verify_checkpoint(path, log)
        return path
    for candidate_root in (path, path / "checkpoints"):
        if list_checkpoints(candidate_root):
            found = newest_intact(candidate_root, log)
            if found is None:
                raise DamagedCheckpointError(
                    f"train.resume={str(resume)!r}: every checkpoint in {candidate_root} is damaged: restore one "
                    "from a copy, or name another checkpoint"
                )
            return found
    raise FileNotFoundError(f"train.resume={str(resume)!r}: no complete checkpoint there")
