"""Distributed helpers, DDP's no_sync accumulation path, and a real 2-process torchrun run of the pretrain entry."""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from {{ cookiecutter.package }} import pretrain
from {{ cookiecutter.package }}.train import distributed as D
from {{ cookiecutter.package }}.train.checkpoint import load_trainer_state
from {{ cookiecutter.package }}.train.step import train_step


def test_single_process_without_torchrun_env(monkeypatch, tiny_model):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert info.device == torch.device("cpu") and not dist.is_initialized()
    assert D.wrap_ddp(tiny_model, info) is tiny_model
    assert (D.get_rank(), D.get_world_size(), D.is_main_process()) == (0, 1, True)
    assert D.all_reduce_mean(3.5) == 3.5 and D.all_gather_object({"a": 1}) == [{"a": 1}]
    D.barrier()  # a no-op, must not hang
    D.teardown()  # safe without a process group


def test_resolve_device():
    assert D.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert D.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            D.resolve_device("cuda")


def test_unwrap_sees_through_compile(tiny_model):
    compiled = torch.compile(tiny_model)  # lazy: nothing is compiled until the first call
    assert D.unwrap(compiled) is tiny_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_world_of_one(monkeypatch):
    """A real gloo process group with one rank: DDP and the collectives run, without a second process."""
    port = _free_port()
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield D.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    D.teardown()


def test_ddp_accumulation_matches_plain_model(gloo_world_of_one, tiny_model):
    """Only the last micro-batch of a step all-reduces, once, on the accumulated gradient.

    With one rank a real all-reduce is the identity, so any sync placement would give the plain model's gradients.
    The comm hook stands in for a second rank that contributes zero gradients: it halves each bucket it reduces.
    Synced once after accumulation the gradient is exactly half the plain model's (so lr 0.5 here == lr 0.25 there);
    syncing every micro-batch would halve the first ones twice, and no_sync on the wrong micro-batch would leave the
    last one unhalved."""
    plain = copy.deepcopy(tiny_model)
    # wrap_ddp only wraps for world_size > 1; build the wrapper directly to exercise no_sync on one process.
    ddp = torch.nn.parallel.DistributedDataParallel(tiny_model)
    assert D.unwrap(ddp) is tiny_model and D.is_distributed() is False  # world of one: helpers stay local
    forwards = []  # one entry per micro-batch forward, so len() is the number of the micro-batch now running
    tiny_model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    synced = []  # (micro-batch number, bucket index) of every all-reduce

    def zero_second_rank(state, bucket):
        synced.append((len(forwards), bucket.index()))
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer() / 2)
        return fut

    ddp.register_comm_hook(None, zero_second_rank)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (2, 6, 16), generator=g)  # 2 steps x 3 micro-batches of 2 sequences
    steps = [[{"input_ids": x, "labels": x} for x in step.split(2)] for step in ids]
    ddp_opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.25)
    for n, micro in enumerate(steps, start=1):
        kwargs = {"grad_clip": 0.0, "autocast": contextlib.nullcontext(), "step": n}
        a = train_step(ddp, micro, ddp_opt, None, **kwargs)
        b = train_step(plain, micro, plain_opt, None, **kwargs)
        assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-6)
        for p, q in zip(tiny_model.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p, q)
    buckets = sorted({index for _, index in synced})
    assert synced and sorted(synced) == [(mb, index) for mb in (3, 6) for index in buckets]


def _step_on_rank(rank: int, store: str, model: torch.nn.Module, micro_by_rank: list, out_dir: Path) -> None:
    """One train_step of a DDP model on gloo rank ``rank`` of 2 (a process of its own); its loss and applied
    gradients go to a file."""
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=120)  # a rank that never arrives fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timeout)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    grads: list[torch.Tensor] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    result = train_step(
        ddp, micro_by_rank[rank], opt, None, grad_clip=0.0, autocast=contextlib.nullcontext(), step=1,
        on_gradients=lambda: grads.extend(p.grad.clone() for p in model.parameters()),
    )  # fmt: skip
    torch.save({"loss": result.loss, "tokens": result.tokens, "grads": grads}, out_dir / f"rank{rank}.pt")
    # No teardown: freeing a gloo group can deadlock (its destructor joins a worker thread that waits for the GIL
    # to release a tensor), and this process has nothing left to do.
    os._exit(0)


def test_two_ranks_with_uneven_targets_equal_one_big_batch(tmp_path, tiny_model, uneven_batch):
    """Two gloo ranks, two micro-batches each, with 1 + 15 and 15 + 15 targets: every rank applies the gradient of
    the step's mean over all 46 targets, as one process with the four rows in one batch does (DDP's division by the
    world size undone, the target count summed over the ranks before the first forward)."""
    rows = [{k: v[i : i + 1] for k, v in uneven_batch.items()} for i in range(2)]  # 1 and 15 targets
    micro_by_rank = [[rows[0], rows[1]], [rows[1], rows[1]]]
    whole_batch = {k: torch.cat([mb[k] for rank in micro_by_rank for mb in rank]) for k in uneven_batch}
    mp.spawn(_step_on_rank, args=(str(tmp_path / "store"), tiny_model, micro_by_rank, tmp_path), nprocs=2)

    grads: list[torch.Tensor] = []
    params = list(tiny_model.parameters())
    opt = torch.optim.SGD(params, lr=0.0)
    whole = train_step(
        tiny_model, [whole_batch], opt, None, grad_clip=0.0, autocast=contextlib.nullcontext(), step=1,
        on_gradients=lambda: grads.extend(p.grad.clone() for p in params),
    )  # fmt: skip
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert float(got["loss"]) == pytest.approx(float(whole.loss), rel=1e-5)
        assert float(got["tokens"]) == float(whole.tokens) == 4 * 16
        for a, b in zip(got["grads"], grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _losses(path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one_process(tmp_path, pretrain_args, subprocess_env, package_name):
    """2 ranks x batch 2 == 1 process x batch 2 x 2 accumulation steps: same windows (sequential sampling), same
    mean gradient, so the same losses up to float reduction order."""
    common = [*pretrain_args, "--data.sampling", "sequential", "--train.max_steps", "6", "--train.batch_size", "2"]
    common += ["--train.save_every", "6", "--train.eval_every", "6", "--sample.max_new_tokens", "4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", f"{package_name}.pretrain", *common, "--name", "ddp"]
    proc = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("model: ") == 1  # only rank 0 prints

    pretrain.main([*common, "--train.grad_accum", "2", "--name", "single"])

    runs = tmp_path / "runs"
    ddp, single = _losses(runs / "ddp" / "metrics.jsonl"), _losses(runs / "single" / "metrics.jsonl")
    assert len(ddp) == len(single) == 6
    assert ddp == pytest.approx(single, rel=1e-4)
    assert ddp[-1] < ddp[0]
    state = load_trainer_state(runs / "ddp" / "checkpoints" / "step-000006")
    assert isinstance(state["data"], list) and len(state["data"]) == 2  # one data position per rank
    assert len(state["rng"]) == 2
