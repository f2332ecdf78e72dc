"""Measured training throughput: our LlamaLM against transformers' LlamaForCausalLM on the same shapes.

    python -m <pkg>.bench pretrain                       # --preset tiny: the default project's shape
    python -m <pkg>.bench pretrain --preset gpt2-small --dtype bf16 --compile   # on a GPU
    python -m <pkg>.bench lora --rank 8 [--compile]      # LoRA fine-tune step: ours (train_step + peft) vs
                                                         # transformers + peft
    python -m <pkg>.bench gpu-check                      # CUDA only: gpt2-small, bf16, eager and compiled, one table
    python -m <pkg>.bench loader                         # batches/s of the pretraining loader (bench_loader.py)
    python -m <pkg>.bench prepare [--mb 100]             # corpus preparation tokens/s vs tokenizers, peak memory
                                                         # (bench_prepare.py, which describes its method)

Prints one JSON object per line: one per model (tokens/s, step time median and spread, MFU, final loss), then the
ratio. Method, so the figures can be trusted:
- both models start from the same weights (ours copied into the HF model) and train on the same batches with the
  same optimizer (`train.optim.build_optimizer`) through the same `train.step.train_step`, so the final losses should
  agree closely, which checks that the two compute the same thing;
- runs alternate A B A B (`--repeats` rounds of `--steps` timed steps each), so a background load hits both;
- the first `--warmup` steps of every model are not timed (allocator and kernel warm-up);
- figures are medians over all timed steps, with min / max and the inter-quartile range;
- `--compile` compiles both models (ours with fullgraph=True); compilation happens in the untimed warm-up steps;
- on CUDA each model's `peak_step_mem_mib` is the most memory one of its steps allocated on top of what was resident
  before it (weights and optimizer state of both models), i.e. activations, gradients and temporaries.

MFU = achieved FLOPs / peak FLOPs, the peak from `train.flops.peak_flops` as in training: the table of known CUDA
GPUs (dense bf16, no sparsity) for bf16 runs, otherwise timing a large matmul on this device in the run's dtype
("measured": an achievable peak, so MFU reads higher than against a datasheet). FLOPs per token:
`LlamaLM.flops_per_token` for both models (same architecture, same count).

More benchmarks slot in as subcommands: write `bench_<name>(args) -> list[dict]` (`measure` times its runners with
`bench_timing`), add a subparser in `build_parser`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys

import torch
from torch import nn

from . import bench_loader, bench_prepare
from .bench_timing import (
    PlainLoop,
    Trainer,
    autocast_for,
    random_batches,
    significant,
    throughput_rows,
    time_alternating,
)
from .config import ModelConfig, TrainConfig
from .model.hf import hf_config_dict, to_hf_key
from .model.lm import LlamaLM
from .model.presets import PRESETS, preset_fields
from .runtime import setup_runtime
from .train.flops import peak_flops

# ----------------------------------------------------------------------------------------------------------------------
# Shared by every subcommand: the shape, the set-up, the measurement

# The shape flags and the preset field each one defaults to (model/presets.py, the one home of the shapes).
SHAPE_FLAGS = {
    "layers": "n_layers", "dim": "dim", "heads": "n_heads", "kv_heads": "n_kv_heads", "vocab_size": "vocab_size",
}  # fmt: skip
# The batch a preset is timed at: tiny, the default project's; the others nanoGPT's 12 x 1024 (GPT-2's context),
# the shape GPU training loops are compared at.
RUN_SHAPES = {"tiny": dict(seq_len=128, batch_size=16)}
DEFAULT_RUN_SHAPE = {"seq_len": 1024, "batch_size": 12}


def preset_flags(name: str) -> dict[str, int]:
    """Every shape flag's value under preset ``name``."""
    fields = preset_fields(name)
    return {flag: fields[field] for flag, field in SHAPE_FLAGS.items()} | RUN_SHAPES.get(name, DEFAULT_RUN_SHAPE)


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every shape flag not given on the command line from ``--preset``."""
    for key, value in preset_flags(args.preset).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def compiled(model: nn.Module, enabled: bool, fullgraph: bool = False) -> nn.Module:
    return torch.compile(model, fullgraph=fullgraph) if enabled else model


def setup(args: argparse.Namespace) -> tuple[torch.device, ModelConfig, list[dict]]:
    """Seed, thread count, device, the model shape every subcommand reads from its flags, and the batches."""
    apply_preset(args)
    device = torch.device(args.device)
    setup_runtime(TrainConfig(seed=args.seed), device)  # seeds and TF32 on CUDA, exactly as training sets them
    if args.threads:
        torch.set_num_threads(args.threads)
    # The preset's shape, then the flags (as --model.preset and --model.* combine in training)
    fields = preset_fields(args.preset) | {field: getattr(args, flag) for flag, field in SHAPE_FLAGS.items()}
    fields |= {"preset": args.preset, "max_seq_len": args.seq_len}
    if getattr(args, "untied", False):
        fields["tie_embeddings"] = False
    config = ModelConfig(**fields)
    batches = random_batches(config.vocab_size, args.batch_size, args.seq_len, 4, device, args.seed)
    return device, config, batches


def measure(bench: str, args: argparse.Namespace, device: torch.device, runners: dict) -> tuple[list[dict], dict]:
    """Time `runners` as the flags say: their rows and the ratio row, all headed by the run's settings, the ratio row
    also by the shape."""
    times, step_mem = time_alternating(
        runners, steps=args.steps, warmup=args.warmup, repeats=args.repeats, device=device
    )
    common = {"bench": bench, "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads()}
    common |= {"preset": args.preset, "compile": args.compile}
    *rows, summary = throughput_rows(runners, times, step_mem, args.batch_size * args.seq_len, common)
    return rows, summary | {key: getattr(args, key) for key in preset_flags(args.preset)}


# ----------------------------------------------------------------------------------------------------------------------
# pretrain: ours vs transformers' LlamaForCausalLM


def hf_twin(model: LlamaLM) -> nn.Module:
    """transformers' LlamaForCausalLM with the same config and the same weights as `model` (SDPA attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(model.config), attn_implementation="sdpa"))
    state = {to_hf_key(k): v for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weight copy into LlamaForCausalLM failed: missing {missing}, unexpected {unexpected}")
    return hf.to(next(model.parameters()).device)


def bench_pretrain(args: argparse.Namespace) -> list[dict]:
    device, config, batches = setup(args)
    ours = LlamaLM(config).to(device)
    initial = copy.deepcopy(ours) if args.dtype != "fp32" else None  # for the fp32 reference run
    autocast = autocast_for(device, args.dtype)
    runners = {
        "ours": Trainer(compiled(ours, args.compile, fullgraph=True), batches, autocast),
        "transformers": Trainer(compiled(hf_twin(ours), args.compile), batches, autocast),
    }
    rows, summary = measure("pretrain", args, device, runners)
    flops_per_token = ours.flops_per_token(args.seq_len)
    peak, peak_source = peak_flops(device, torch.float32 if args.dtype == "fp32" else torch.bfloat16)
    for row in rows:
        row["mfu"] = significant(row["tokens_per_s"] * flops_per_token / peak)
    summary |= {"peak_flops": peak, "peak_source": peak_source, "flops_per_token": flops_per_token}
    summary["params"] = ours.num_params(False)
    if initial is not None:
        # Same start, same batches, same number of steps, no autocast: how far the bf16 run's loss is from fp32's.
        reference = Trainer(initial, batches, contextlib.nullcontext())
        for _ in range(runners["ours"].step):
            reference()
        summary |= {"loss_bf16": round(runners["ours"].loss, 5), "loss_fp32": round(reference.loss, 5)}
    return [*rows, summary]


# ----------------------------------------------------------------------------------------------------------------------
# lora: our fine-tune step (train_step on a peft-wrapped LlamaLM) vs a plain transformers + peft loop


def peft_twins(base: LlamaLM, rank: int, targets: list[str]) -> tuple[nn.Module, nn.Module]:
    """(ours, theirs): `base` with our LoRA (peft on LlamaLM), and transformers' twin of `base` with peft's LoRA,
    starting from the same LoRA weights (A is random, so ours are copied into theirs)."""
    from peft import LoraConfig, get_peft_model

    from .config import LoraSettings
    from .lora import apply_lora

    baseline = hf_twin(base)  # same base weights, before peft rewrites our module in place
    ours = apply_lora(base, LoraSettings(r=rank, alpha=2 * rank, dropout=0.0, target_modules=targets), None)
    theirs = get_peft_model(baseline, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets))
    lora_state = {  # key "layers.0..." -> "model.layers.0..."
        "base_model.model." + to_hf_key(k.removeprefix("base_model.model.")): v
        for k, v in ours.state_dict().items()
        if "lora_" in k
    }
    result = theirs.load_state_dict(lora_state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"LoRA weight copy failed: unexpected {result.unexpected_keys[:3]}")
    return ours, theirs


def bench_lora(args: argparse.Namespace) -> list[dict]:
    from .lora import count_parameters

    device, config, batches = setup(args)
    targets = ["q_proj", "v_proj"]
    ours, theirs = peft_twins(LlamaLM(config).to(device), args.rank, targets)
    autocast = autocast_for(device, args.dtype)
    runners = {
        "ours": Trainer(compiled(ours, args.compile), batches, autocast),
        "transformers+peft": PlainLoop(compiled(theirs, args.compile), batches, autocast),
    }
    rows, summary = measure("lora", args, device, runners)
    for row, runner in zip(rows, runners.values(), strict=True):
        row["trainable_params"] = count_parameters(runner.model)[0]
    return [*rows, summary | {"rank": args.rank, "target_modules": targets}]


def _add_lora_parser(sub) -> None:
    p = sub.add_parser("lora", help="LoRA fine-tune tokens/s: our train_step on peft+LlamaLM vs transformers+peft loop")
    _add_shape(p)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r on q_proj, v_proj (default: %(default)s)")
    _add_common(p)
    p.set_defaults(func=bench_lora)


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def _add_shape(p: argparse.ArgumentParser, preset: str = "tiny") -> None:
    """The model and batch shape that :func:`setup` reads, shared by every subcommand: a preset, then any flag."""
    p.add_argument("--preset", choices=list(PRESETS), default=preset, help="shape defaults (default: %(default)s)")
    for key, value in preset_flags("tiny").items():
        p.add_argument(
            "--" + key.replace("_", "-"), type=int, default=None, help=f"(default: the preset's; tiny {value})"
        )


def _add_common(p: argparse.ArgumentParser, dtype: str = "fp32") -> None:
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds A B A B (default: %(default)s)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=dtype, help="bf16 = autocast (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (compiled during warm-up)")


# ----------------------------------------------------------------------------------------------------------------------
# gpu-check: what to run first on a new GPU box


def bench_gpu_check(args: argparse.Namespace) -> list[dict]:
    """`bench pretrain` eager, then compiled (by default gpt2-small, bf16); the rows of both runs."""
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        print(
            f"error: gpu-check needs a CUDA GPU (device {args.device}, CUDA available: "
            f"{torch.cuda.is_available()}): run it on the GPU machine or in the dev container",
            file=sys.stderr,
        )
        raise SystemExit(2)
    rows = []
    for compile_model in (False, True):
        rows += bench_pretrain(argparse.Namespace(**{**vars(args), "compile": compile_model}))
    return rows


def format_table(rows: list[dict]) -> str:
    """The per-model rows of `bench pretrain` runs as one plain-text table."""
    models = [r for r in rows if r["model"] != "ratio"]
    header = f"{'model':<14}{'compile':<9}{'tokens/s':>12}{'MFU':>8}{'peak step MiB':>15}{'step ms (min-max)':>24}"
    lines = [header, "-" * len(header)]
    for r in models:
        spread = f"{r['step_ms_median']:.1f} ({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f})"
        memory = f"{r['peak_step_mem_mib']:.0f}" if "peak_step_mem_mib" in r else "-"
        lines.append(
            f"{r['model']:<14}{'yes' if r['compile'] else 'no':<9}{r['tokens_per_s']:>12,.0f}"
            f"{100 * r['mfu']:>7.1f}%{memory:>15}{spread:>24}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="training tokens/s and MFU: ours vs transformers' LlamaForCausalLM")
    _add_shape(p)
    p.add_argument("--untied", action="store_true", help="separate lm_head instead of tied embeddings")
    _add_common(p)
    p.set_defaults(func=bench_pretrain)
    _add_lora_parser(sub)
    p = sub.add_parser("gpu-check", help="CUDA: pretrain bench eager and compiled (gpt2-small, bf16) as one table")
    _add_shape(p, preset="gpt2-small")
    _add_common(p, dtype="bf16")
    p.set_defaults(func=bench_gpu_check)
    bench_loader.add_parser(sub)
    bench_prepare.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    rows = args.func(args)
    if args.command == "gpu-check":
        device = torch.cuda.get_device_name(torch.device(args.device))
        shape = ", ".join(f"{k} {v}" for k, v in preset_flags(args.preset).items())
        print(f"{device}, torch {torch.__version__}, {args.preset} ({shape}), {args.dtype}\n{format_table(rows)}")
        return
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
