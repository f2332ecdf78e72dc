"""Crash-safe, self-verifying checkpoints: save, verify, load, find the latest (or best), prune.

Layout of ``<run_dir>/checkpoints/``::

    step-000100/
        manifest.json       # size and sha256 of every other file (:mod:`.manifest`), written last
        model.safetensors   # weights (only the trainable ones for a partly frozen model such as peft/LoRA)
        trainer.pt          # optimizer, scheduler, step, RNG and early-stopping states, data position, config, extra
        sharded/            # instead of model.safetensors and the optimizer under --train.parallel fsdp: each rank's
                            # shards of both, through torch.distributed.checkpoint (:mod:`.sharded`)
        ...                 # whatever the optional save_model callback writes (e.g. a LoRA adapter)
    step-000200/
    latest                  # text file: "step-000200"
    best                    # text file, with early stopping: the best checkpoint (:mod:`.stopping`), never pruned

Writing never exposes a partial checkpoint (:func:`staged`; :func:`staged_on_all_ranks` when every rank writes its
shards): a kill at any moment leaves the previous one published.
Reading checks the files against the manifest first: a damaged checkpoint raises :class:`DamagedCheckpointError`
(one line: the file and what is wrong) and :func:`newest_intact` skips it, but nothing is deleted for being damaged.
``trainer.pt`` holds only tensors and plain data (:mod:`.state`): ``torch.load(weights_only=True)`` runs no code.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from .distributed import all_gather_object, barrier, get_rank, is_sharded
from .manifest import MANIFEST_FILE, find_damage, fsync, write_manifest
from .sharded import is_sharded_checkpoint, load_sharded, save_sharded
from .state import load_model_weights, rng_state, save_model_weights, set_rng_state, to_plain

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
LATEST_FILE = "latest"
BEST_FILE = "best"
_STEP_DIR = re.compile(r"^step-(\d+)$")
Log = Callable[[str], None] | None


class DamagedCheckpointError(ConfigError):
    """A checkpoint whose files do not match its manifest (a ConfigError: entry points exit 2 with its one line)."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def verify_checkpoint(path: str | Path, log: Log = None) -> None:
    """Raise :class:`DamagedCheckpointError` unless ``path``'s files match its manifest (see :func:`find_damage`)."""
    if (damage := find_damage(Path(path), log=log)) is not None:
        raise DamagedCheckpointError(
            f"damaged checkpoint {path}: {damage} (resume from another checkpoint; --train.resume auto takes the "
            "newest intact one of the run)"
        )


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
    return sorted((p for p in root.iterdir() if is_complete(p)), key=_step_of) if root.is_dir() else []


def read_pointer(root: str | Path, pointer: str) -> Path | None:
    """The complete checkpoint that the text file ``root/<pointer>`` (``latest``, ``best``) names; None when the file
    is missing, unreadable or names anything else (its files are verified when the checkpoint is read)."""
    try:
        candidate = Path(root) / (Path(root) / pointer).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return candidate if candidate.parent == Path(root) and is_complete(candidate) else None


def write_pointer(root: Path, pointer: str, name: str) -> None:
    """Point ``root/<pointer>`` at checkpoint ``name`` atomically: a reader sees the old name or the new one."""
    tmp = root / (pointer + ".tmp")
    tmp.write_text(name + "\n", encoding="utf-8")
    fsync(tmp)
    os.replace(tmp, root / pointer)
    fsync(root)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint named by ``root/latest``, or the newest complete one if that file is missing or stale."""
    found = list_checkpoints(root)
    return read_pointer(root, LATEST_FILE) or (found[-1] if found else None)


def newest_intact(root: str | Path, log: Log = None) -> Path | None:
    """The checkpoint ``root/latest`` names if it is intact, else the newest intact one by step; None if none is.
    ``log`` gets one line per damaged checkpoint skipped and a notice when the one taken has no manifest."""
    for path in dict.fromkeys(filter(None, [read_pointer(root, LATEST_FILE), *list_checkpoints(root)[::-1]])):
        if (damage := find_damage(path, log=log)) is None:
            return path
        if log is not None:
            log(f"skipping damaged checkpoint {path}: {damage}")
    return None


def _publish(tmp: Path, final: Path) -> None:
    for file in (p for p in tmp.rglob("*") if p.is_file()):
        fsync(file)
    fsync(tmp)
    root, name = final.parent, final.name
    if final.exists() and find_damage(final) is not None:
        # A run resumed past a damaged checkpoint reaches its step again: keep the evidence, publish the new one.
        os.replace(final, root / f"{name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    if final.exists():  # re-saving a step (a run resumed from an older checkpoint): publish, then drop the old one
        trash = root / f".tmp-old-{name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync(root)
    write_pointer(root, LATEST_FILE, name)


@contextlib.contextmanager
def staged(root: str | Path, step: int) -> Iterator[Path]:
    """A hidden directory to write checkpoint ``step``'s files into. When the block ends it gets its manifest and is
    published atomically as ``root/step-NNNNNN`` with ``root/latest`` pointing at it; on an error it is removed and
    the previous checkpoint stays the latest. Any writer of checkpoint files (e.g. a sharded one) goes through it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # debris of a killed save: never published, safe to delete
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp)  # last, so it covers every file written into the directory
        _publish(tmp, root / step_dir_name(step))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_on_all_ranks(root: str | Path, step: int) -> Iterator[Path]:
    """:func:`staged` for a checkpoint every rank writes into (its DCP shards): rank 0 stages the directory and every
    rank gets its path; once all ranks have left the block, rank 0 writes the manifest and publishes. Call it on
    every rank (``root`` on a file system they all see)."""
    if get_rank() != 0:
        yield all_gather_object(None)[0]
        barrier()
        return
    with staged(root, step) as tmp:
        all_gather_object(tmp)
        yield tmp
        barrier()  # every rank's shards are on disk before the manifest lists them


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
    stopping: dict | None = None,
    save_model: Callable[[nn.Module, Path], None] | None = None,
    trainable_only: bool | None = None,
    sharded: bool = False,
    keep: int = 0,
) -> Path:
    """Publish ``root/step-NNNNNN`` atomically (:func:`staged`) and return it; main process only, unwrapped ``model``.
    ``sharded`` (``--train.parallel fsdp``): called on every rank, each writes its shards of the model and optimizer
    (:func:`.sharded.save_sharded`) and runs ``save_model``; rank 0 writes the rest.

    ``data_state``: the batch source position (or a per-rank list); ``rng``: RNG states (default: this process's);
    ``config``: the run's config as a dict; ``extra``: other plain data (e.g. a label map); ``stopping``: the
    early-stopping state (:mod:`.stopping`); ``save_model(model, dir)``
    writes more files into it (e.g. a peft adapter); ``trainable_only``: see :func:`.state.model_state`; ``keep``:
    then delete all but the newest ``keep`` intact checkpoints (0 = keep all; :func:`prune`)."""
    trainer = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None and not sharded else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": to_plain(rng if rng is not None else rng_state()),
        **to_plain({"data": data_state, "config": config, "extra": extra, "stopping": stopping}),
    }
    with staged_on_all_ranks(root, step) if sharded else staged(root, step) as tmp:
        if sharded:
            save_sharded(tmp, model, optimizer)
        else:
            save_model_weights(model, tmp / MODEL_FILE, trainable_only)
        if get_rank() == 0:
            torch.save(trainer, tmp / TRAINER_FILE)
        if save_model is not None:
            save_model(model, tmp)
    final = Path(root) / step_dir_name(step)
    if keep > 0 and get_rank() == 0:
        prune(Path(root), keep, final)
    return final


def prune(root: Path, keep: int, final: Path) -> None:
    """Delete all but ``final``, the ``best`` one and the newest ``keep`` intact checkpoints; damaged ones neither
    count nor go. Older ones are judged by size (hashing every kept one at each save would cost more than the save;
    loading catches flipped bits), newer ones, left by a run resumed from an older checkpoint, by hash."""
    kept, best = 0, read_pointer(root, BEST_FILE)
    for path in reversed(list_checkpoints(root)):
        if path == best or (path != final and find_damage(path, hashes=_step_of(path) > _step_of(final))):
            continue
        if path != final and kept >= keep:
            shutil.rmtree(path, ignore_errors=True)
        kept += 1


def load_trainer_state(path: str | Path, map_location: str | torch.device = "cpu", *, verified: bool = False) -> dict:
    """The ``trainer.pt`` dict of a checkpoint, loaded with ``weights_only=True`` once its files are verified
    (:class:`DamagedCheckpointError` otherwise; ``verified=True``: the caller just did, e.g. when resolving it)."""
    if not verified:
        verify_checkpoint(path)
    state = torch.load(Path(path) / TRAINER_FILE, map_location=map_location, weights_only=True)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {state.get('format')!r} (expected {FORMAT_VERSION})")
    return state


def load_weights(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """The weights of checkpoint ``path`` (and, when sharded, the optimizer state) into ``model``: a sharded
    checkpoint into any model at any world size (collective under a process group), ``model.safetensors`` into an
    unsharded one."""
    if is_sharded_checkpoint(path):
        load_sharded(path, model, optimizer)
    elif is_sharded(model):
        raise ConfigError(
            f"{path} was saved by a ddp run: continue it with --train.parallel ddp (an fsdp run reads the sharded "
            "checkpoints of fsdp runs, at any number of ranks)"
        )
    else:
        load_model_weights(model, path / MODEL_FILE)


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    restore_rng: bool = True,
    rank: int = 0,
    verified: bool = False,
) -> dict[str, Any]:
    """Restore the unwrapped ``model``'s weights (+ optimizer, scheduler, and ``rank``'s RNG states when given) from
    a checkpoint directory; return the trainer state (``step``, ``data`` position, ``config``, ``extra``). A damaged
    checkpoint raises :class:`DamagedCheckpointError` before ``model`` is touched (``verified``: the caller checked)."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (expected {MODEL_FILE} and {TRAINER_FILE})")
    state = load_trainer_state(path, verified=verified)
    load_weights(path, model, optimizer)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and (rng := state.get("rng")) is not None:
        if isinstance(rng, list):  # one state per rank
            rng = rng[rank] if rank < len(rng) else rng[0]
        set_rng_state(rng)
    return state
