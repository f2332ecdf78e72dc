"""plan's figures against torch's own accounting: MemTracker (torch.distributed._tools.mem_tracker) follows every
tensor of a real training step on the CPU and files it as parameter, gradient, optimizer state or activation; the
plan's formulas must give its figures within the tolerances below, for the fused-loss LlamaLM that pretrain trains
and for transformers' Llama with LoRA adapters that finetune trains, in fp32 and under bf16 autocast, with and
without activation checkpointing."""

from __future__ import annotations

import contextlib
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from torch.distributed._tools.mem_tracker import MemTracker

from {{ cookiecutter.package }} import plan
from {{ cookiecutter.package }}.config import LoraSettings, ModelConfig, OptimConfig
from {{ cookiecutter.package }}.lora import apply_lora
from {{ cookiecutter.package }}.model.hf import hf_config_dict
from {{ cookiecutter.package }}.model.lm import LlamaLM
from {{ cookiecutter.package }}.train.distributed import DistInfo, wrap_fsdp
from {{ cookiecutter.package }}.train.optim import build_optimizer

# Small, but every width differs (GQA 6:2, SwiGLU 224, vocabulary 512), so a term with the wrong width shows.
SHAPE = dict(vocab_size=512, dim=96, n_layers=3, n_heads=6, n_kv_heads=2, hidden_dim=224, max_seq_len=128)
BATCH, SEQ = 4, 64
EXACT = 0.01  # the pretrain model: the formulas name every tensor; 1% covers AdamW's step counters and the loss
LORA_OVER = 1.35  # finetune's activations: LlamaLM's per-block formula, an upper bound for transformers' + LoRA


def measure(model: torch.nn.Module, autocast: bool, **batch: torch.Tensor) -> dict[str, int]:
    """MemTracker's bytes: parameters and activations at the end of forward, gradients after backward, optimizer
    state after the step (fused AdamW, as training builds it)."""
    optimizer = build_optimizer(model, OptimConfig())
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    figures = {}

    def take(*names: str) -> None:
        snapshot = tracker.get_tracker_snapshot("current")[torch.device("cpu")]
        figures.update({name: sum(v for k, v in snapshot.items() if getattr(k, "value", k) == name) for name in names})

    with tracker:
        with torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext():
            out = model(**batch)
        take("Parameter", "Activation")
        out.loss.backward()
        take("Gradient")
        optimizer.step()
        take("Optstate")
    return figures


def measure_storages(model: torch.nn.Module, autocast: bool, **batch: torch.Tensor) -> dict[str, int]:
    """The same figures from the tensors' storages, for a model with frozen parameters (MemTracker hooks the
    gradient of every parameter, which a frozen one cannot have): activations are what autograd saves for backward
    (``saved_tensors_hooks``, each storage once) and the logits the output holds."""
    optimizer = build_optimizer(model, OptimConfig())
    weights = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    precision = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), precision:
        out = model(**batch)
    saved[out.logits.untyped_storage().data_ptr()] = out.logits.untyped_storage().nbytes()
    out.loss.backward()
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {
        "Parameter": sum(p.untyped_storage().nbytes() for p in model.parameters()),
        "Activation": sum(saved.values()),
        "Gradient": sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None),
        "Optstate": sum(t.untyped_storage().nbytes() for t in state),
    }


def planned(model: torch.nn.Module, run: plan.Run, checkpointing: bool) -> tuple[dict, int]:
    """(the plan's 1-GPU ddp row, the activations it expects at the end of forward) for ``model``."""
    counts = plan.count_parameters(model)
    compute = plan.compute(run, "ddp")
    acts = plan.activation_bytes(run.model, run.batch_size, run.seq_len, compute, checkpointing, run.hf_loss)
    return plan.plan_row(counts, run, "ddp", 1, checkpointing), acts["saved"] + plan.autocast_copies(
        counts, run, checkpointing
    )


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "ckpt"])
def test_pretrain_plan_equals_torchs_accounting(autocast, checkpointing):
    torch.manual_seed(0)
    config = ModelConfig(**SHAPE, activation_checkpointing=checkpointing)
    model = LlamaLM(config).train()
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ))
    got = measure(model, autocast, input_ids=ids, labels=ids)
    row, activations = planned(model, plan.Run(config, BATCH, SEQ, autocast), checkpointing)
    assert row["parameters"] == got["Parameter"]
    assert row["gradients"] == pytest.approx(got["Gradient"], rel=EXACT)
    assert row["optimizer"] == pytest.approx(got["Optstate"], rel=EXACT)
    assert activations == pytest.approx(got["Activation"], rel=EXACT)
    if checkpointing:  # and checkpointing is what saves: the plan's figure is a fraction of the full one
        full = plan.activation_bytes(config, BATCH, SEQ, "autocast" if autocast else "fp32", False)["saved"]
        assert activations < 0.3 * full


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_lora_plan_gives_grads_and_optimizer_state_to_the_adapters_only(autocast):
    torch.manual_seed(0)
    config = ModelConfig(**SHAPE)
    hf_config = transformers.LlamaConfig(**hf_config_dict(config), attn_implementation="sdpa")
    model = apply_lora(transformers.LlamaForCausalLM(hf_config), LoraSettings(r=8), task="sft").train()
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ))
    got = measure_storages(model, autocast, input_ids=ids, labels=ids)
    row, activations = planned(model, plan.Run(config, BATCH, SEQ, autocast, hf_loss=True), False)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapters == 3 * 8 * ((96 + 96) + (96 + 32))  # rank 8 A and B on q_proj (96 -> 96), v_proj (96 -> 32)
    assert row["parameters"] == got["Parameter"]
    assert row["gradients"] == 4 * adapters == pytest.approx(got["Gradient"], rel=EXACT)
    assert row["optimizer"] == pytest.approx(got["Optstate"], rel=EXACT)
    assert got["Activation"] <= activations <= LORA_OVER * got["Activation"]


# ----------------------------------------------------------------------------------------------------------------------
# fsdp: FSDP2 on two gloo ranks, followed by FSDPMemTracker

FSDP_CASES = [("fp32", False), ("bf16", False), ("bf16", True)]  # (precision, activation checkpointing)


def _fsdp_rank(rank: int, store: str, out: str) -> None:
    """Each case of FSDP_CASES on rank ``rank`` of 2: sharded as training shards it (``wrap_fsdp``: fully_shard per
    block then the root; bf16 policy: bf16 weights, fp32 gradient reduction), one step to create the optimizer state,
    then a measured one; rank 0 saves the figures."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=120)  # a rank that never arrives fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timeout)
    figures = {}
    for precision, checkpointing in FSDP_CASES:
        torch.manual_seed(0)
        model = LlamaLM(ModelConfig(**SHAPE, activation_checkpointing=checkpointing))
        param_dtype = torch.bfloat16 if precision == "bf16" else None
        model = wrap_fsdp(model, DistInfo(rank=rank, world_size=2), param_dtype)
        optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
        ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ))
        tracker = FSDPMemTracker(model, optimizer)
        tracker.track_inputs((ids,))
        with tracker:
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            tracker.reset_mod_stats()
            loss = model(ids, labels=ids).loss
            snapshots = {"forward": tracker.get_tracker_snapshot("current")}
            loss.backward()
            snapshots["backward"] = tracker.get_tracker_snapshot("current")
            optimizer.step()
            snapshots["step"] = tracker.get_tracker_snapshot("current")
            snapshots["peak"] = tracker.get_tracker_snapshot("peak")
        figures[f"{precision} {checkpointing}"] = {
            point: {getattr(k, "name", str(k)): v for k, v in snap[torch.device("cpu")].items()}
            for point, snap in snapshots.items()
        }
    if rank == 0:
        torch.save(figures, out)
    os._exit(0)  # no teardown: freeing a gloo group can deadlock (tests/test_distributed.py)


@pytest.mark.slow  # ~15 s on 2 CPU cores (40 s loaded): two processes, three FSDP set-ups, two steps each
def test_fsdp_plan_against_fsdp_mem_tracker(tmp_path):
    """Two gloo ranks: the sharded parameters, gradients and AdamW state per rank, the activations at the end of
    forward (bf16 weights: a bf16 residual stream, no casts), and the step's peak, which the plan's total bounds
    from above by at most 30% (it adds gradients and activations as if they peaked together)."""
    mp.spawn(_fsdp_rank, args=(str(tmp_path / "store"), str(tmp_path / "figures.pt")), nprocs=2)
    measured = torch.load(tmp_path / "figures.pt", weights_only=True)
    config = ModelConfig(**SHAPE)
    with torch.device("meta"):
        counts = plan.count_parameters(LlamaLM(config))
    for precision, checkpointing in FSDP_CASES:
        got = measured[f"{precision} {checkpointing}"]
        row = plan.plan_row(counts, plan.Run(config, BATCH, SEQ, precision == "bf16"), "fsdp", 2, checkpointing)
        acts = plan.activation_bytes(config, BATCH, SEQ, precision, checkpointing)
        assert row["parameters"] == pytest.approx(got["forward"]["SHARDED_PARAM"], rel=EXACT)
        assert row["gradients"] == pytest.approx(got["backward"]["SHARDED_GRAD"], rel=EXACT)
        assert row["optimizer"] == pytest.approx(got["step"]["OPT"], rel=EXACT)
        kept = got["forward"]["ACT"] + got["forward"]["INP"]  # the tracker files the token ids as an input
        assert acts["saved"] == pytest.approx(kept, rel=EXACT), (precision, checkpointing)
        peak = got["peak"]["Total"] - got["peak"]["BUFFER"]  # rotary's tables: derived, a few KiB
        assert peak <= row["total"] <= 1.3 * peak, (precision, checkpointing, row["total"] / peak)


# ----------------------------------------------------------------------------------------------------------------------
# The command


def table(capsys, *argv: str) -> dict[str, list[str]]:
    """``plan``'s rows by strategy name ("ddp x8 +ckpt": [params, grads, optim, activ, working, total, fits])."""
    plan.main(list(argv))
    lines = capsys.readouterr().out.splitlines()
    return {" ".join(line.split()[:-7]): line.split()[-7:] for line in lines[3:]}


def test_the_table_says_which_strategy_fits(capsys):
    """Llama 3.2 1B, 8 x 2048 tokens, on 8 GPUs of 24 GiB: only sharding and checkpointing together fit."""
    argv = ["--model.preset", "llama-3.2-1b", "--data.seq_len", "2048", "--train.batch_size", "8"]
    rows = table(capsys, *argv, "--gpus", "8", "--gpu-mem", "24")
    assert [r[-1] for r in rows.values()] == ["no", "no", "no", "yes"]
    assert list(rows) == ["ddp x8", "ddp x8 +ckpt", "fsdp x8", "fsdp x8 +ckpt"]
    # fsdp shards parameters and AdamW state 8 ways; DDP's buckets double the gradients
    assert float(rows["ddp x8"][0]) == pytest.approx(8 * float(rows["fsdp x8"][0]), rel=0.01)
    assert float(rows["ddp x8"][1]) == pytest.approx(16 * float(rows["fsdp x8"][1]), rel=0.01)
    assert float(rows["ddp x8"][3]) > 5 * float(rows["ddp x8 +ckpt"][3])  # checkpointing keeps block inputs only
    assert table(capsys, *argv, "--gpus", "8", "--gpu-mem", "80")["fsdp x8"][-1] == "yes"


@pytest.mark.parametrize(("preset", "published"), [("smollm2-135m", 134_515_008), ("llama-3.2-1b", 1_235_814_400)])
def test_meta_counts_are_the_published_sizes(preset, published):
    """The plan counts a meta-device build: no storage, the exact count (the model cards round these to 135M and
    1.24B)."""
    from {{ cookiecutter.package }}.model.presets import preset_fields

    with torch.device("meta"):
        counts = plan.count_parameters(LlamaLM(ModelConfig(**preset_fields(preset))))
    assert counts.params == counts.trainable == published


def test_a_finetune_config_is_planned_with_its_base_model_and_adapters(tmp_path, capsys):
    from {{ cookiecutter.package }}.model.hf import export_hf

    base = export_hf(LlamaLM(ModelConfig(**SHAPE)), tmp_path / "base")
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"base_model: {base}\nlora:\n  r: 4\n")
    plan.main(["--config", str(recipe), "--gpus", "2"])
    header = capsys.readouterr().out.splitlines()[0]
    adapters = 3 * 4 * ((96 + 96) + (96 + 32))
    assert header.startswith("finetune LoRA r=4") and f"({adapters / 1e6:,.2f}M trained)" in header


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--gpus", "0"], "--gpus 0 --gpu-mem 80: expected at least one GPU"),
        (["--model.preset", "gpt5"], "model.preset='gpt5' is unknown"),
        (["--program", "finetune", "--base_model", "no/such/dir"], "model path does not exist: no/such/dir"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0 and expected in err, err
