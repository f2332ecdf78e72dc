"""FSDP2 (``--train.parallel fsdp``) on 2 gloo CPU ranks: the same training as one process, sharded checkpoints that
reload at another world size, exports gathered from the shards, LoRA with a frozen sharded base, two "nodes".

Tolerances: losses of a sharded run and a single process with the same global batch agree to rel 1e-4 and weights to
rel 1e-4 / abs 1e-6 after a few AdamW steps (float reduction order differs: reduce-scatter vs one batch); state that is
only moved (checkpoint -> another world size, shards -> an export) must be bit-identical.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from {{ cookiecutter.package }} import pretrain
from {{ cookiecutter.package }}.config import OptimConfig
from {{ cookiecutter.package }}.model.hf import export_hf
from {{ cookiecutter.package }}.model.lm import LlamaLM
from {{ cookiecutter.package }}.train import checkpoint as ckpt
from {{ cookiecutter.package }}.train import distributed as D
from {{ cookiecutter.package }}.train.optim import build_optimizer
from {{ cookiecutter.package }}.train.sharded import full_state_dict
from {{ cookiecutter.package }}.train.step import train_step


def _batches(seed: int, n: int = 2) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 96, (n, 2, 16), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": x, "labels": x} for x in ids]


def _step(model, optimizer, seed: int, step: int) -> None:
    train_step(model, _batches(seed), optimizer, None, grad_clip=1.0, autocast=contextlib.nullcontext(), step=step)


def _full_state(model, optimizer) -> dict:
    """Weights and AdamW state as whole tensors keyed by parameter name (rank 0 of a sharded model; {} elsewhere)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model": full_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for name, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][name][key]), (name, key)


def _on_two_ranks(rank: int, store: str, config, root: Path, phase: str) -> None:
    """One gloo rank of 2 in a process of its own: ``save`` trains one step and checkpoints step 1 sharded; ``load``
    reads step 2 (saved by one process) into a fresh sharded model. Rank 0 writes the whole state it then holds."""
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=120)  # a rank that never arrives fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timeout)
    info = D.DistInfo(rank=rank, world_size=2)
    torch.manual_seed(0 if phase == "save" else 99)  # the load must overwrite every weight
    model = D.wrap_fsdp(LlamaLM(config), info)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0))
    if phase == "save":
        _step(model, optimizer, seed=rank, step=1)
        ckpt.save_checkpoint(root, 1, model, optimizer, sharded=True)
    else:
        ckpt.load_checkpoint(root / "step-000002", model, optimizer, restore_rng=False)
    state = _full_state(model, optimizer)
    if rank == 0:
        torch.save(state, root / f"{phase}-state.pt")
    dist.barrier()
    os._exit(0)  # no teardown: freeing a gloo group can deadlock (see test_distributed)


def test_sharded_checkpoint_reloads_exactly_at_another_world_size(tmp_path, tiny_model_config):
    """2 ranks save their shards -> 1 process (no process group) loads them into a plain model and AdamW, trains a
    step and saves -> 2 ranks load that into a sharded model: the weights and the optimizer state are exact at every
    hand-over, and every checkpoint is published with a manifest that verifies."""
    root = tmp_path / "checkpoints"
    mp.spawn(_on_two_ranks, args=(str(tmp_path / "store1"), tiny_model_config, root, "save"), nprocs=2)
    saved = torch.load(root / "save-state.pt", weights_only=True)
    assert sorted(p.name for p in (root / "step-000001" / "sharded").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp",
    ]  # fmt: skip
    ckpt.verify_checkpoint(root / "step-000001")
    assert ckpt.load_trainer_state(root / "step-000001")["optimizer"] is None  # it lives in the shards

    torch.manual_seed(7)
    model = LlamaLM(tiny_model_config)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0))
    assert not dist.is_initialized()
    ckpt.load_checkpoint(ckpt.latest_checkpoint(root), model, optimizer, restore_rng=False)
    _assert_same_state(saved, _full_state(model, optimizer))
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied after loading

    _step(model, optimizer, seed=5, step=2)
    ckpt.save_checkpoint(root, 2, model, optimizer, sharded=True)
    one_process = _full_state(model, optimizer)
    mp.spawn(_on_two_ranks, args=(str(tmp_path / "store2"), tiny_model_config, root, "load"), nprocs=2)
    _assert_same_state(one_process, torch.load(root / "load-state.pt", weights_only=True))
    assert ckpt.read_pointer(root, ckpt.LATEST_FILE).name == "step-000002"


def test_a_ddp_checkpoint_is_refused_by_a_sharded_model_with_one_line(tmp_path, tiny_model, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, tiny_model)
    monkeypatch.setattr(ckpt, "is_sharded", lambda model: True)  # as an FSDP2 model would answer
    with pytest.raises(ckpt.ConfigError, match="saved by a ddp run: continue it with --train.parallel ddp"):
        ckpt.load_checkpoint(tmp_path / "step-000001", tiny_model)
