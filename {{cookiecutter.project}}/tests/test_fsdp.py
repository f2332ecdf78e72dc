"""FSDP2 (``--train.parallel fsdp``) on 2 gloo CPU ranks: the same training as one process (compiled and checkpointed
blocks, accumulation, two "nodes" on loopback), sharded checkpoints that reload at another world size, exports
gathered from the shards, LoRA with a frozen sharded base.

Tolerances: losses of a sharded run and one process with the same global batch agree to rel 1e-4 (1e-5 in-process)
and weights to rel 1e-4 / abs 1e-6 after a few AdamW steps (the reductions add in another order); state that is only
moved (a checkpoint to another world size, shards to an export) is bit-identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
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
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from {{ cookiecutter.package }} import pretrain
from {{ cookiecutter.package }}.config import LoraSettings, OptimConfig, TrainConfig, parse_config
from {{ cookiecutter.package }}.config.base import RunConfig
from {{ cookiecutter.package }}.config.finetune import FinetuneConfig
from {{ cookiecutter.package }}.config.pretrain import PretrainConfig
from {{ cookiecutter.package }}.lora import apply_lora, load_model, merge_and_save
from {{ cookiecutter.package }}.model.hf import export_hf, import_hf
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
    # save: bf16 compute (MixedPrecisionPolicy), the sharded master weights and AdamW state stay fp32
    model = D.wrap_fsdp(LlamaLM(config), info, param_dtype=torch.bfloat16 if phase == "save" else None)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0))
    seen = []  # the dtype of a block's weight as the block runs (after FSDP's pre-forward hook has all-gathered it)
    model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(m.mlp.up_proj.weight.dtype))
    if phase == "save":
        _step(model, optimizer, seed=rank, step=1)
        ckpt.save_checkpoint(root, 1, model, optimizer, sharded=True)
    else:
        ckpt.load_checkpoint(root / "step-000002", model, optimizer, restore_rng=False)
    state = _full_state(model, optimizer)
    state["dtypes"] = [str(dtype) for dtype in (*seen[:1], model.layers[0].mlp.up_proj.weight.dtype)]
    if rank == 0:
        torch.save(state, root / f"{phase}-state.pt")
    dist.barrier()
    os._exit(0)  # no teardown: freeing a gloo group can deadlock (see test_distributed)


@pytest.mark.slow
def test_sharded_checkpoint_reloads_exactly_at_another_world_size(tmp_path, tiny_model_config):
    """2 ranks save their shards -> 1 process (no process group) loads them into a plain model and AdamW, trains a
    step and saves -> 2 ranks load that into a sharded model: the weights and the optimizer state are exact at every
    hand-over, and every checkpoint is published with a manifest that verifies."""
    root = tmp_path / "checkpoints"
    mp.spawn(_on_two_ranks, args=(str(tmp_path / "store1"), tiny_model_config, root, "save"), nprocs=2)
    saved = torch.load(root / "save-state.pt", weights_only=True)
    assert saved["dtypes"] == ["torch.bfloat16", "torch.float32"]  # bf16 in the block, fp32 master weights
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


def _compiled_fsdp_steps(rank: int, store: str, config, out: Path) -> None:
    """Gloo rank ``rank`` of 2: two steps of 2 accumulated micro-batches on FSDP2 over blocks that are checkpointed
    and compiled; rank 0 writes the losses and the gathered weights."""
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=120)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timeout)
    torch.manual_seed(0)
    compile_block = functools.partial(torch.compile, fullgraph=True, backend="aot_eager")  # no C++ toolchain needed
    model = D.wrap_fsdp(LlamaLM(config), D.DistInfo(rank=rank, world_size=2), compile_block=compile_block)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0))
    losses = []
    for step in (1, 2):
        micro = _batches(10 * step + rank)
        kwargs = {"grad_clip": 0.5, "autocast": contextlib.nullcontext(), "step": step}
        losses.append(float(train_step(model, micro, optimizer, None, **kwargs).loss))
    weights = full_state_dict(model)
    if rank == 0:
        block = model.layers[0]  # a compiled block (the compile wrapper), sharded on its own
        shape = [hasattr(block, "_orig_mod"), D.is_sharded(block), D.is_compiled(model), D.is_sharded(model)]
        torch.save({"losses": losses, "weights": weights, "shape": shape}, out)
    dist.barrier()
    os._exit(0)


@pytest.mark.slow
def test_fsdp_with_compiled_checkpointed_blocks_matches_one_process(tmp_path, tiny_model_config):
    """torch.compile and activation checkpointing on every block, then fully_shard (torchtitan's order), with
    accumulation (no reduce-scatter on the first micro-batch) and clipping of DTensor gradients: the losses and the
    weights of 2 ranks equal one process that takes both ranks' micro-batches in each step (rel 1e-5 / 1e-4)."""
    config = dataclasses.replace(tiny_model_config, activation_checkpointing=True)
    out = tmp_path / "fsdp.pt"
    mp.spawn(_compiled_fsdp_steps, args=(str(tmp_path / "store"), config, out), nprocs=2)
    got = torch.load(out, weights_only=True)
    assert got["shape"] == [True, True, True, True]

    torch.manual_seed(0)
    model = LlamaLM(config)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0))
    for step in (1, 2):
        micro = _batches(10 * step) + _batches(10 * step + 1)
        kwargs = {"grad_clip": 0.5, "autocast": contextlib.nullcontext(), "step": step}
        loss = float(train_step(model, micro, optimizer, None, **kwargs).loss)
        assert got["losses"][step - 1] == pytest.approx(loss, rel=1e-5)
    assert got["weights"].keys() == model.state_dict().keys()  # names without the compile wrapper's _orig_mod
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(got["weights"][name], tensor, rtol=1e-4, atol=1e-6)


@dataclasses.dataclass
class _OneDeviceProgram(RunConfig):
    """A program whose models fit one device (as the classifiers' are): RunConfig.shardable stays False."""

    debug_section = "one-device"
    name: str = "one-device"
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


def test_only_pretrain_and_finetune_take_fsdp(capsys):
    with pytest.raises(ValueError, match=r"^train.parallel='fsdp' is invalid: expected ddp for this program's models$"):
        _OneDeviceProgram(train=TrainConfig(parallel="fsdp"))
    assert _OneDeviceProgram().train.parallel == "ddp"
    assert parse_config(PretrainConfig, ["--train.parallel", "fsdp"])[0].train.parallel == "fsdp"
    assert parse_config(FinetuneConfig, ["--train.parallel", "fsdp"])[0].train.parallel == "fsdp"
    with pytest.raises(SystemExit) as exit_info:
        parse_config(PretrainConfig, ["--train.parallel", "zero3"])
    assert exit_info.value.code == 2 and "train.parallel" in capsys.readouterr().err


# ---- the entry points under torchrun --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(launch: list[str], module: str, args: list[str], env: dict, *, agents: int = 1) -> None:
    """``python -m torch.distributed.run <launch> -m <module> <args>``, ``agents`` of them at once (one per "node");
    every one must exit 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", module, *args]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(agents)]  # fmt: skip
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-4000:]


TWO_RANKS = ["--standalone", "--nproc_per_node=2"]


def _metrics(run_dir: Path, key: str = "loss") -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r]


def _common(pretrain_args: list[str], steps: int) -> list[str]:
    """Sequential windows: 2 ranks x batch 2 x accumulation a read the windows 1 process x batch 2 x 2a reads."""
    return [*pretrain_args, "--data.sampling", "sequential", "--train.max_steps", str(steps),
            "--train.batch_size", "2", "--train.eval_every", str(steps), "--sample.max_new_tokens", "4",
            "--train.grad_stats", "true"]  # fmt: skip


@pytest.mark.slow
def test_ddp_and_fsdp_on_two_loopback_nodes_match_one_process(tmp_path, pretrain_args, subprocess_env, package_name):
    """Two torchrun agents on one machine (--nnodes=2, one process each, c10d rendezvous on 127.0.0.1: the multi-node
    command) train with ddp, and with FSDP2 over activation-checkpointed blocks; both accumulate 2 micro-batches (no
    all-reduce / reduce-scatter on the first), and one plain process accumulates the same 8 windows per step. Losses
    agree to rel 1e-4, exported weights to rel 1e-4 / abs 1e-6. The fsdp run's hf/ export, gathered from the shards
    on rank 0, is bit-identical to the export of its last checkpoint by one process."""
    common = [*_common(pretrain_args, 4), "--train.save_every", "4", "--export_hf", "true", "--train.grad_accum", "2"]
    for parallel in ("ddp", "fsdp"):
        launch = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_id={parallel}",
                  f"--rdzv_endpoint=127.0.0.1:{_free_port()}"]  # fmt: skip
        args = [*common, "--train.parallel", parallel, "--name", parallel]
        args += ["--model.activation_checkpointing", "true"] if parallel == "fsdp" else []
        _torchrun(launch, f"{package_name}.pretrain", args, subprocess_env, agents=2)
    pretrain.main([*common, "--train.grad_accum", "4", "--name", "single"])

    runs = tmp_path / "runs"
    reference = load_file(runs / "single" / "hf" / "model.safetensors")
    for parallel in ("ddp", "fsdp"):
        assert len(_metrics(runs / parallel)) == 4
        assert _metrics(runs / parallel) == pytest.approx(_metrics(runs / "single"), rel=1e-4), parallel
        exported = load_file(runs / parallel / "hf" / "model.safetensors")
        assert exported.keys() == reference.keys()
        for name, tensor in exported.items():
            torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-6)
    assert (runs / "ddp" / "checkpoints" / "step-000004" / ckpt.MODEL_FILE).is_file()

    last = runs / "fsdp" / "checkpoints" / "step-000004"
    assert len(list((last / "sharded").glob("*.distcp"))) == 2 and not (last / ckpt.MODEL_FILE).exists()
    model = import_hf(runs / "single" / "hf")  # the shape; the checkpoint overwrites every weight
    ckpt.load_checkpoint(last, model, restore_rng=False)
    unsharded = load_file(export_hf(model, tmp_path / "unsharded") / "model.safetensors")
    exported = load_file(runs / "fsdp" / "hf" / "model.safetensors")
    assert unsharded.keys() == exported.keys()
    assert all(torch.equal(unsharded[name], tensor) for name, tensor in exported.items())


@pytest.mark.slow
def test_fsdp_resumes_two_ranks_then_one_process_then_two_ranks(tmp_path, pretrain_args, subprocess_env, package_name):
    """2 ranks save at step 2 -> one process continues from that checkpoint (the same global batch by accumulation)
    and saves step 3 -> 2 ranks continue from that: the state moves exactly (test above) and sequential sampling
    continues the same global order of windows, so every continued step has the uninterrupted run's learning rate
    exactly and its loss to rel 1e-4 (measured: equal)."""
    common = [*_common(pretrain_args, 4), "--train.parallel", "fsdp"]
    module = f"{package_name}.pretrain"
    runs = tmp_path / "runs"
    _torchrun(TWO_RANKS, module, [*common, "--train.save_every", "2", "--name", "two"], subprocess_env)
    pretrain.main([*common, "--train.grad_accum", "2", "--train.save_every", "1", "--name", "one",
                   "--train.resume_from", str(runs / "two" / "checkpoints" / "step-000002")])  # fmt: skip
    resume = ["--train.resume_from", str(runs / "one" / "checkpoints" / "step-000003")]
    _torchrun(TWO_RANKS, module, [*common, *resume, "--name", "again"], subprocess_env)

    steps = {name: [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("two", "one", "again")}  # fmt: skip
    assert [r["step"] for r in steps["one"]] == [3, 4] and [r["step"] for r in steps["again"]] == [4]
    uninterrupted = {r["step"]: r for r in steps["two"]}
    for record in steps["one"] + steps["again"]:
        reference = uninterrupted[record["step"]]
        assert record["lr"] == reference["lr"]
        assert record["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    assert len(list((runs / "one" / "checkpoints" / "step-000003" / "sharded").glob("*.distcp"))) == 1


@pytest.mark.slow
def test_lora_under_fsdp_trains_only_the_adapters_and_merges_like_one_process(
    tmp_path, ft_hf_dir, subprocess_env, package_name
):
    """SFT with LoRA on 2 ranks, the frozen base sharded with its adapters: the sharded checkpoints hold the adapters
    alone, the merged hf/ export differs from the base only in the adapted projections, and it is bit-identical to
    merging the last checkpoint's shards into the base in one process."""
    args = ["--base_model", str(ft_hf_dir), "--out_dir", str(tmp_path / "runs"), "--name", "lora", "--merge", "true",
            "--train.parallel", "fsdp", "--train.max_steps", "3", "--train.batch_size", "4", "--train.save_every", "3",
            "--train.eval_every", "3", "--train.device", "cpu", "--train.precision", "fp32", "--train.logger", "none",
            "--optim.lr", "1e-2", "--optim.warmup_steps", "0", "--data.max_seq_len", "64",
            "--sample.max_new_tokens", "4"]  # fmt: skip
    _torchrun(TWO_RANKS, f"{package_name}.finetune", args, subprocess_env)
    run_dir = tmp_path / "runs" / "lora"
    assert len(_metrics(run_dir)) == 3

    last = run_dir / "checkpoints" / "step-000003"
    saved = FileSystemReader(str(last / "sharded")).read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("model.")]
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights), weights

    model, tokenizer = load_model(ft_hf_dir, "sft")
    peft_model = apply_lora(model, LoraSettings(), "sft")
    ckpt.load_checkpoint(last, peft_model, restore_rng=False)
    reference = load_file(merge_and_save(peft_model, tmp_path / "unsharded", tokenizer) / "model.safetensors")
    merged, base = load_file(run_dir / "hf" / "model.safetensors"), load_file(ft_hf_dir / "model.safetensors")
    assert merged.keys() == reference.keys() == base.keys()
    assert all(torch.equal(merged[name], reference[name]) for name in merged)
    changed = {name for name in merged if not torch.equal(merged[name], base[name])}
    assert changed == {name for name in base if name.endswith(("q_proj.weight", "v_proj.weight"))}
