"""``python -m <package>.plan``: will this run fit? Memory per GPU under ddp and fsdp, with and without activation
checkpointing, for the run's model, micro-batch, sequence length and precision. Nothing is trained or loaded: the
model is built on the meta device (shapes without storage) to count its parameters.

    python -m <package>.plan --config configs/pretrain.yaml --gpus 8 --gpu-mem 80
    python -m <package>.plan --model.preset llama-3.2-1b --model.max_seq_len 2048 --data.seq_len 2048 --gpus 8
    python -m <package>.plan --config configs/finetune-sft.yaml --base_model HuggingFaceTB/SmolLM2-135M --gpus 1

Every option of the program's config is accepted (``--model.preset``, ``--train.batch_size``, ...); the program is
found from the config files (``base_model``, ``lora`` or ``task`` in one: finetune) or given with ``--program``.
finetune has no checkpointing switch (yet): its "+ckpt" rows say what one would save.

What is counted, per GPU, in bytes (P parameters, P_t of them trained, W GPUs, N = batch_size x seq_len tokens of one
micro-batch, a = 2 in bf16, 4 in fp32; gradient accumulation adds no memory):
- parameters: fp32, 4 P under ddp, 4 P / W under fsdp. They are the master weights: autocast casts per operation and
  FSDP2's bf16 ``MixedPrecisionPolicy`` gathers bf16 copies for compute, so no other fp32 copy exists.
- gradients: fp32, for trained parameters only (LoRA: the adapters): 4 P_t under ddp, twice that on more than one
  GPU (DDP's buckets hold a copy), 4 P_t / W under fsdp.
- optimizer: AdamW's exp_avg and exp_avg_sq in fp32: 8 P_t, / W under fsdp.
- activations: what autograd keeps from the forward pass for backward (:func:`activation_bytes`, the formula checked
  against torch's own accounting in tests/test_plan.py), plus, with checkpointing, one block recomputed in backward.
  ddp's bf16 is autocast over fp32 weights (an fp32 residual stream, bf16 casts per Linear); fsdp's computes in the
  bf16 weights the policy gathers (a bf16 residual stream, no casts).
- working: ddp under bf16: the bf16 copies of the weights autocast makes (kept for backward); fsdp: the gathered
  unsharded parameters (the root module's, one block computing, one prefetched) and one unit's gradients before
  the reduce-scatter (an estimate); both: the loss's largest temporary (one chunk of fp32 logits).

The total adds everything as if gradients and activations peaked together (an upper bound by up to the smaller of
the two) and "fits" leaves 10% of the GPU to the CUDA context, NCCL buffers and the allocator's fragmentation.
These are planning figures: what a GPU measures is the check (docs/distributed.md "Memory plan").
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .cli import run_guarded
from .config import ConfigError, DebugConfig, ModelConfig, fail, parse_config
from .config.finetune import FinetuneConfig
from .config.pretrain import PretrainConfig
from .model.lm import LOSS_CHUNKS, LlamaLM
from .model.transformer import swiglu_hidden_dim

GIB = 1024**3
HEADROOM = 0.9  # the share of --gpu-mem a plan may fill
COMPONENTS = ("parameters", "gradients", "optimizer", "activations", "working")


@dataclass
class Counts:
    """Parameter counts of one model, from a meta-device build (tied weights counted once)."""

    params: int
    trainable: int
    matmul: int  # Linear weights inside the blocks: autocast's bf16 copies of them are kept for backward
    block: int  # one decoder block (an FSDP unit)
    root: int  # everything outside the blocks: embeddings, final norm, head (the root FSDP unit)


def count_parameters(model: nn.Module) -> Counts:
    """``Counts`` of ``model``; its decoder blocks are its longest ``nn.ModuleList``."""
    unique = {id(p): p for p in model.parameters()}.values()
    blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)
    block = sum(p.numel() for p in blocks[0].parameters())
    linear = sum(m.weight.numel() for m in blocks.modules() if isinstance(m, nn.Linear))
    params = sum(p.numel() for p in unique)
    return Counts(
        params=params,
        trainable=sum(p.numel() for p in unique if p.requires_grad),
        matmul=linear,
        block=block,
        root=params - len(blocks) * block,
    )


def block_activation_bytes(cfg: ModelConfig, tokens: int, seq_len: int, compute: str) -> int:
    """What one DecoderBlock keeps for backward (model/transformer.py), for ``tokens`` = B x T, when it computes in
    ``compute``: "fp32", "autocast" (fp32 weights, bf16 matmuls: ddp's bf16) or "bf16" (bf16 weights: FSDP2's bf16
    MixedPrecisionPolicy).

    Each RMSNorm keeps, in fp32 whatever the input, its input, x * rstd and rstd. Under autocast each Linear casts its
    (fp32) input anew (q, k, v: 3 bf16 copies; gate, up: 2); otherwise the two norm outputs are kept once each. SDPA
    keeps q, k, v, its output (which o_proj's input is a view of) and the fp32 log-sum-exp; the MLP keeps gate, up,
    silu(gate) and the product; in bf16 rotary's cos/sin tables are kept as bf16 casts.
    """
    a = 4 if compute == "fp32" else 2
    n, c, f, head = tokens, cfg.dim, _hidden(cfg), cfg.dim // cfg.n_heads
    kv = cfg.n_kv_heads * head
    norms = 2 * (2 * 4 * n * c + 4 * n)
    linear_inputs = (5 if compute == "autocast" else 2) * a * n * c
    rope = 4 * seq_len * head * a if a == 2 else 0
    attention = a * n * (c + 2 * kv) + a * n * c + 4 * n * cfg.n_heads
    mlp = 4 * a * n * f
    return norms + linear_inputs + rope + attention + mlp


def _hidden(cfg: ModelConfig) -> int:
    return swiglu_hidden_dim(cfg.dim, cfg.multiple_of, cfg.hidden_dim)


def activation_bytes(
    cfg: ModelConfig, batch: int, seq_len: int, compute: str, checkpointing: bool, hf_loss: bool = False
) -> dict[str, int]:
    """{"saved": kept at the end of forward, "recompute": one block rebuilt in backward (checkpointing),
    "loss_temp": the loss's largest temporary} in bytes, for LlamaLM's forward with labels (model/lm.py), computing
    in ``compute`` (:func:`block_activation_bytes`).

    ``hf_loss``: transformers' LlamaForCausalLM (what finetune trains) instead builds the whole logits [N, V]: its
    output keeps them (a bytes each) and cross-entropy keeps fp32 log-probabilities for backward, where the fused
    loss keeps d loss / d hidden [N, C] and d loss / d weight [V, C] (fp32)."""
    n, a, v = batch * seq_len, 4 if compute == "fp32" else 2, cfg.vocab_size
    block = block_activation_bytes(cfg, n, seq_len, compute)
    residual = 2 if compute == "bf16" else 4  # the residual stream: fp32 under autocast (the embedding's dtype)
    per_block = residual * n * cfg.dim if checkpointing else block  # checkpointing keeps each block's input only
    # outside the blocks: token ids, the final norm (as in a block), the loss
    outside = 8 * n + (2 * 4 * n * cfg.dim + 4 * n)
    if hf_loss:
        outside += (a + 4) * n * v
        loss_temp = 4 * n * v  # the fp32 copy of bf16 logits cross-entropy reads (fp32: the log-softmax's input)
    else:
        outside += a * n * cfg.dim + 4 * v * cfg.dim + 8
        loss_temp = 8 * -(-n // LOSS_CHUNKS) * v  # one chunk's fp32 logits and log-probabilities (model/lm.py)
    recompute = block if checkpointing else 0
    return {"saved": cfg.n_layers * per_block + outside, "recompute": recompute, "loss_temp": loss_temp}


# ----------------------------------------------------------------------------------------------------------------------
# The plan: one row per strategy


@dataclass
class Run:
    """What the plan needs to know about the run besides the model."""

    model: ModelConfig
    batch_size: int  # micro-batch per GPU
    seq_len: int
    bf16: bool  # train.precision auto (bf16 on any GPU that has it) or bf16; else fp32
    hf_loss: bool = False  # a fine-tune: transformers' model, whose loss keeps the whole logits
    label: str = ""  # what the header calls the model


def autocast_copies(counts: Counts, run: Run, checkpointing: bool) -> int:
    """The bf16 copies of the fp32 weights that autocast makes and autograd keeps for backward: the blocks' Linear
    weights (and transformers' lm_head, whose logits are a plain matmul); checkpointing drops them with the rest of
    the blocks' activations and recasts them block by block."""
    if not run.bf16 or checkpointing:
        return 0
    return 2 * (counts.matmul + (run.model.vocab_size * run.model.dim if run.hf_loss else 0))


def compute(run: Run, parallel: str) -> str:
    """How the blocks compute (:func:`block_activation_bytes`): ddp's bf16 is autocast over fp32 weights, fsdp's the
    bf16 weights its MixedPrecisionPolicy gathers."""
    if not run.bf16:
        return "fp32"
    return "autocast" if parallel == "ddp" else "bf16"


def plan_row(counts: Counts, run: Run, parallel: str, gpus: int, checkpointing: bool) -> dict[str, Any]:
    """Bytes per GPU of one strategy: parameters, gradients, optimizer, activations, working, total."""
    shard = gpus if parallel == "fsdp" else 1
    acts = activation_bytes(run.model, run.batch_size, run.seq_len, compute(run, parallel), checkpointing, run.hf_loss)
    activations = acts["saved"] + acts["recompute"]
    if parallel == "ddp":
        working = autocast_copies(counts, run, checkpointing)
    else:  # FSDP2: the root unit's gathered params, one block computing and one prefetched, one unit's gradients
        p_bytes = 2 if run.bf16 else 4
        biggest = max(counts.root, counts.block)
        working = p_bytes * (counts.root + 2 * counts.block) + (p_bytes + 4) * biggest
    row = {
        "parallel": parallel,
        "gpus": gpus,
        "checkpointing": checkpointing,
        "parameters": 4 * counts.params // shard,
        "gradients": 4 * counts.trainable * (2 if parallel == "ddp" and gpus > 1 else 1) // shard,
        "optimizer": 8 * counts.trainable // shard,
        "activations": activations,
        "working": working + acts["loss_temp"],
    }
    row["total"] = sum(row[k] for k in COMPONENTS)
    return row


def plan_rows(counts: Counts, run: Run, gpus: int) -> list[dict[str, Any]]:
    """ddp and fsdp on ``gpus`` GPUs, each without and with activation checkpointing."""
    return [plan_row(counts, run, p, gpus, ckpt) for p in ("ddp", "fsdp") for ckpt in (False, True)]


def format_plan(counts: Counts, run: Run, rows: list[dict[str, Any]], gpu_mem_gib: float) -> str:
    """The table ``plan`` prints: GiB per GPU (MiB for a model whose every total is under 1 GiB), one row per
    strategy."""
    budget = HEADROOM * gpu_mem_gib
    unit, scale = ("GiB", GIB) if max(r["total"] for r in rows) >= GIB else ("MiB", 1024**2)
    precision = "bf16 (ddp: autocast, fsdp: bf16 weights)" if run.bf16 else "fp32"
    lines = [
        f"{run.label}: {counts.params / 1e6:,.1f}M parameters ({counts.trainable / 1e6:,.2f}M trained), "
        f"micro-batch {run.batch_size} x {run.seq_len} tokens, {precision}",
        f"{unit} per GPU; fits = total <= {budget:.1f} GiB ({HEADROOM * 100:.0f}% of {gpu_mem_gib:g} GiB)",
        f"{'strategy':<16}{'params':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'working':>9}{'total':>9}  fits",
    ]
    for r in rows:
        name = f"{r['parallel']} x{r['gpus']}" + (" +ckpt" if r["checkpointing"] else "")
        cells = "".join(f"{r[k] / scale:>9.2f}" for k in (*COMPONENTS, "total"))
        lines.append(f"{name:<16}{cells}  {'yes' if r['total'] / GIB <= budget else 'no'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# From the command line to a plan


def program_of(argv: list[str], given: str | None) -> type:
    """The program's config class: ``--program``, else finetune when a ``--config`` file has its keys."""
    if given:
        return {"pretrain": PretrainConfig, "finetune": FinetuneConfig}[given]
    files = [b for a, b in zip(argv, argv[1:], strict=False) if a == "--config"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for name in files:
        try:
            keys = set(yaml.safe_load(Path(name).read_text(encoding="utf-8")) or {})
        except (OSError, yaml.YAMLError, TypeError):
            continue  # parse_config reports a missing or broken file in its own words
        if keys & {"base_model", "lora", "task"}:
            return FinetuneConfig
    return PretrainConfig


def finetune_model(cfg: FinetuneConfig, debug: bool) -> ModelConfig:
    """The shape of the base model a fine-tune would load: its config.json, from a directory or the Hub."""
    from .lora import pretrain_export_dir, resolve_model_path
    from .model.hf import config_from_hf

    path = resolve_model_path(cfg.base_model or pretrain_export_dir(debug))
    local = Path(path) / "config.json"
    if not local.is_file():
        from huggingface_hub import hf_hub_download

        try:
            local = Path(hf_hub_download(path, "config.json"))
        except Exception as exc:  # offline, unknown or gated repo
            raise ConfigError(f"{path}: could not fetch its config.json ({' '.join(str(exc).split())[:200]})") from exc
    try:
        return config_from_hf(json.loads(local.read_text(encoding="utf-8")), str(local))
    except ValueError as exc:  # not a Llama: the plan's formulas are LlamaLM's
        raise ConfigError(str(exc)) from exc


def plan_inputs(cfg: Any, debug: bool) -> tuple[Counts, Run]:
    """Parameter counts (a meta-device build, LoRA adapters applied for a fine-tune) and the run's shape."""
    bf16 = cfg.train.precision != "fp32"  # auto: bf16 on any GPU that has it
    if isinstance(cfg, FinetuneConfig):
        if cfg.task != "sft":
            raise ConfigError("plan covers causal language models: finetune --task classify is not planned")
        model_cfg, seq_len, label = finetune_model(cfg, debug), cfg.data.max_seq_len, f"finetune LoRA r={cfg.lora.r}"
    else:
        model_cfg, seq_len, label = cfg.model, cfg.data.seq_len, f"pretrain {cfg.model.preset or '(config model)'}"
    run = Run(model_cfg, cfg.train.batch_size, seq_len, bf16, isinstance(cfg, FinetuneConfig), label)
    with torch.device("meta"):  # shapes only: a 1B model costs nothing to count
        model = LlamaLM(model_cfg)
        if isinstance(cfg, FinetuneConfig):
            from .lora import apply_lora

            model = apply_lora(model, cfg.lora, task=None)
    return count_parameters(model), run


def build_parser() -> argparse.ArgumentParser:
    """plan's own options; every other argument goes to the program's config parser."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {__package__}.plan",
        description="Memory per GPU under ddp and fsdp, with and without activation checkpointing, for a run's config.",
        epilog="Any option of the program's config also applies: python -m <package>.pretrain --help lists them.",
    )
    parser.add_argument("--gpus", type=int, default=1, help="GPUs the run would use (default: %(default)s)")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default: %(default)s)")
    parser.add_argument("--program", choices=["pretrain", "finetune"], default=None, help="default: from --config")
    return parser


def main(argv: list[str] | None = None) -> None:
    ours, rest = build_parser().parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if ours.gpus < 1 or ours.gpu_mem <= 0:
        fail(f"--gpus {ours.gpus} --gpu-mem {ours.gpu_mem:g}: expected at least one GPU and some memory")
    cfg, dbg = parse_config(program_of(rest, ours.program), rest, prog="plan")

    def show(cfg: Any, dbg: DebugConfig) -> None:
        counts, run = plan_inputs(cfg, dbg.debug)
        print(format_plan(counts, run, plan_rows(counts, run, ours.gpus), ours.gpu_mem), flush=True)

    run_guarded(show, cfg, dbg)


if __name__ == "__main__":
    sys.exit(main())
