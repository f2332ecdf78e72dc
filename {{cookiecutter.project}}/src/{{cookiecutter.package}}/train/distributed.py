"""Data-parallel training with ``torchrun``: process-group set-up, DDP wrapping, rank helpers, teardown.

The same entry point runs on one process or many; nothing changes but the launcher::

    python -m <package>.pretrain --config configs/pretrain.yaml                        # 1 process
    torchrun --nproc_per_node=2 -m <package>.pretrain --config configs/pretrain.yaml   # 2 processes, 1 node

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed`
reads them (no environment = a single process) and picks the backend: NCCL for CUDA, gloo for CPU. Each process
draws its own batches (the batch source is seeded by rank), so the global batch is
``batch_size * grad_accum * world_size``.

Multi-node: start the same command on every node with a rendezvous endpoint that all nodes can reach, e.g.::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_id=$JOB_ID \\
        --rdzv_endpoint=$HEAD_NODE:29500 -m <package>.pretrain --config configs/pretrain.yaml

(``scripts/slurm-pretrain.sh`` does this under Slurm.) Only rank 0 writes logs, TensorBoard and checkpoints;
checkpoints go to ``out_dir`` which must then be on a shared file system for ``--train.resume auto`` to work.

FSDP2 (``--train.parallel fsdp``, :func:`wrap_fsdp`): each rank keeps only its shard of every parameter, gradient
and AdamW state; a decoder block's weights are all-gathered just before it runs and freed after, and its gradients
are reduce-scattered. Checkpoints are then sharded too (:mod:`.sharded`). DDP is what a model that fits on one device
should use: it is simpler and, without the all-gathers, faster.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={device!r} but CUDA is not available: use --train.device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"train.device={device!r} but MPS is not available: use --train.device cpu")
    return dev


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group torchrun describes in the environment, or return a single-process :class:`DistInfo`.

    Idempotent: a second call (e.g. from a test or a notebook) reuses the existing group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # before init: NCCL binds this rank to its GPU
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(
                backend=backend,
                timeout=datetime.timedelta(minutes=timeout_minutes),
                device_id=dev if backend == "nccl" else None,
            )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def teardown() -> None:
    """Leave the process group (safe to call when none exists)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def notice(message: str) -> None:
    """One line on stderr, from the main process only (every rank reaches the same conclusions)."""
    if get_rank() == 0:
        print(message, file=sys.stderr, flush=True)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(value: float, device: torch.device | None = None) -> float:
    """Average a Python number over all ranks (returns it unchanged on one process)."""
    if not is_distributed():
        return float(value)
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device or "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / dist.get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (a one-element list on one process); used for per-rank data/RNG state."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(model: nn.Module, info: DistInfo, **ddp_kwargs: Any) -> nn.Module:
    """Wrap in DistributedDataParallel when running on more than one process; return ``model`` unchanged otherwise.

    DDP broadcasts rank 0's parameters at construction, so all ranks start from the same weights even if they
    were initialised differently. For a peft model (frozen base) DDP only syncs the trainable adapter weights.
    """
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    Use it to save weights, call ``generate`` or read ``config``: the wrappers only change how forward runs.
    """
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def is_compiled(model: nn.Module) -> bool:
    """True when ``torch.compile`` wraps the model (possibly inside DDP) or, under FSDP, its blocks."""
    while isinstance(model, DDP):
        model = model.module
    return any(isinstance(getattr(m, "_orig_mod", None), nn.Module) for m in model.modules())


def decoder_blocks(model: nn.Module) -> list[tuple[nn.ModuleList, str]]:
    """The repeated blocks FSDP shards one by one, as (their list, name in it): the elements of every outermost
    ``nn.ModuleList`` (LlamaLM's ``layers``, transformers' ``model.layers``, BERT's ``encoder.layer``)."""
    found, inside = [], ()
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not name.startswith(inside):
            found.extend((module, key) for key in module._modules)
            inside += (name + ".",)
    return found


def wrap_fsdp(
    model: nn.Module,
    info: DistInfo,
    param_dtype: torch.dtype | None = None,
    compile_block: Callable[[nn.Module], nn.Module] | None = None,
) -> nn.Module:
    """Shard ``model`` with FSDP2 over all ranks: ``fully_shard`` on every decoder block (:func:`decoder_blocks`),
    then on the root (the embeddings, final norm and head, which stay one unit so that tied weights stay tied).
    Returns ``model`` unchanged on one process, like :func:`wrap_ddp`.

    ``param_dtype`` (bf16 runs): the all-gathered weights and the computation are in that dtype while the sharded
    master weights, the gradients' reduction and AdamW stay fp32 (``MixedPrecisionPolicy``). ``compile_block``
    (``torch.compile``) is applied to each block before it is sharded, torchtitan's order: the all-gather hooks then
    run eagerly around a compiled block. Activation checkpointing needs nothing here: the model recomputes each block
    inside ``torch.utils.checkpoint``, and FSDP2's hooks skip the all-gather during that recomputation.

    Frozen and trainable parameters may share a block (a LoRA base and its adapters): FSDP2 shards both, and only the
    trainable ones get gradients and optimizer state.
    """
    if not info.distributed:
        return model
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for parent, key in decoder_blocks(model):
        block = parent._modules[key]
        if compile_block is not None:
            block = compile_block(block)
            parent.register_module(key, block)
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    """FSDP2 has sharded ``model``: every forward all-gathers, so every rank must run the same forwards."""
    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Around one micro-batch's forward and backward: reduce the gradients over the ranks in this backward only when
    ``sync`` (the last micro-batch of a step); the others accumulate locally. DDP: ``no_sync()``; FSDP2:
    ``set_requires_gradient_sync``, which skips the reduce-scatter; a plain model: nothing to do."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    no_sync = getattr(model, "no_sync", None)  # DistributedDataParallel
    return no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
