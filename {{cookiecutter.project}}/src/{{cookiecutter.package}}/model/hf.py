"""Move weights between LlamaLM and a Hugging Face `LlamaForCausalLM` directory, both ways, without remote code.

export_hf(model, out_dir, tokenizer=None): config.json (transformers.LlamaConfig) + model.safetensors (+ tokenizer
files, generation_config.json). The result loads with `AutoModelForCausalLM.from_pretrained(out_dir)` and pushes to
the Hub like any Llama (llama.cpp's GGUF converter is another matter: the README's "Use the models elsewhere").

import_hf(path) -> LlamaLM: reads config.json and model.safetensors (or a sharded model.safetensors.index.json), e.g.
SmolLM2 or TinyLlama, into our module. Only the Llama architecture is accepted; anything else is a clear error
rather than silently wrong logits.

The mapping is a key copy: HF's names are ours with a `model.` prefix (lm_head excepted).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..config import ModelConfig
from .lm import LlamaLM
from .transformer import swiglu_hidden_dim

SAFE_WEIGHTS = "model.safetensors"
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
SAFE_INDEX = "model.safetensors.index.json"


def to_hf_key(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def from_hf_key(name: str) -> str:
    return name.removeprefix("model.")


# ----------------------------------------------------------------------------------------------------------------------
# export


def hf_config_dict(config: ModelConfig, *, bos_token_id=None, eos_token_id=None, pad_token_id=None) -> dict[str, Any]:
    """LlamaConfig keyword arguments equivalent to our ModelConfig (names valid in transformers 4.46 .. 5.x)."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=swiglu_hidden_dim(config.dim, config.multiple_of, config.hidden_dim),
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.dim // config.n_heads,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,  # 5.x folds it into rope_parameters itself
        rope_scaling=dataclasses.asdict(config.rope_scaling) if config.rope_scaling else None,  # the same in 5.x
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=config.dropout,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def export_hf(
    model: LlamaLM, out_dir: str | Path, tokenizer: Any = None, state_dict: dict[str, Tensor] | None = None
) -> Path:
    """Write `model` as a LlamaForCausalLM checkpoint directory. `tokenizer`: a transformers tokenizer, a directory
    holding one, or None. `state_dict`: the weights to write instead of `model.state_dict()` (a sharded model's,
    gathered: `train.sharded.full_state_dict`). Returns the directory."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    ids = {}
    if tokenizer is not None:
        ids = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}

    hf_config = LlamaConfig(**hf_config_dict(model.config, **ids))
    hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.save_pretrained(out)

    tied = model.lm_head.weight is model.embed_tokens.weight
    tensors = {}
    for name, tensor in (state_dict if state_dict is not None else model.state_dict()).items():
        if tied and name == "lm_head.weight":
            continue  # HF re-ties it from tie_word_embeddings; safetensors refuses two names for one storage anyway
        tensors[to_hf_key(name)] = tensor.detach().to("cpu").contiguous()
    save_file(tensors, str(out / SAFE_WEIGHTS), metadata={"format": "pt"})  # "format" is what transformers checks

    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        if ids.get("eos_token_id") is not None:
            GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# import


def _resolve_dir(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise FileNotFoundError(f"{path}: not a checkpoint directory (expected config.json + {SAFE_WEIGHTS})")
    # Looks like a Hub id ("org/name"): fetch only config and safetensors, never code.
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=["config.json", "*.safetensors", SAFE_INDEX]))
    except Exception as exc:  # offline, unknown repo, gated model: say what was tried
        raise FileNotFoundError(f"{path}: no such directory, and fetching it from the Hub failed: {exc}") from exc


def config_from_hf(cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Our ModelConfig from a Llama config.json dict; raises ValueError for anything LlamaLM would compute
    differently (other architectures, biases, RoPE scalings other than llama3, other activations)."""
    model_type = cfg.get("model_type")
    if model_type != "llama":
        archs = ", ".join(cfg.get("architectures") or []) or "unknown architecture"
        raise ValueError(f"{source}: model_type {model_type!r} ({archs}); import_hf reads Llama checkpoints only")
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (need 'silu')")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias (LlamaLM has no biases)")
    n_heads = cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // n_heads):
        problems.append(f"head_dim={cfg['head_dim']} != hidden_size / num_attention_heads")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}  # 5.x / 4.x spelling
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        problems.append(f"rope_type={rope_type!r} (default and llama3 RoPE are implemented)")
    if rope_type == "llama3" and set(LLAMA3_KEYS) - set(rope):
        problems.append(f"llama3 RoPE scaling without {sorted(set(LLAMA3_KEYS) - set(rope))}")
    if problems:
        raise ValueError(f"{source}: unsupported Llama variant: " + "; ".join(problems))
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        hidden_dim=cfg["intermediate_size"],
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        rope_scaling={k: rope[k] for k in LLAMA3_KEYS} | {"rope_type": "llama3"} if rope_type == "llama3" else None,
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),  # LlamaConfig's default is untied
        dropout=0.0,
        init_std=cfg.get("initializer_range", 0.02),
    )


def _load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / SAFE_WEIGHTS).is_file():
        return load_file(str(directory / SAFE_WEIGHTS))
    if (directory / SAFE_INDEX).is_file():
        weight_map = json.loads((directory / SAFE_INDEX).read_text())["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise FileNotFoundError(f"{directory / shard}: shard listed in {SAFE_INDEX} is missing")
            tensors.update(load_file(str(directory / shard)))
        return tensors
    raise FileNotFoundError(
        f"{directory}: no {SAFE_WEIGHTS} or {SAFE_INDEX} (only safetensors are read; convert .bin files first)"
    )


def import_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> LlamaLM:
    """Build a LlamaLM from a LlamaForCausalLM directory (or Hub id). Weights are cast to `dtype`."""
    directory = _resolve_dir(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing (not a transformers checkpoint directory?)")
    config = config_from_hf(json.loads(config_file.read_text()), str(config_file))
    hf_tensors = _load_tensors(directory)

    state = {}
    for key, tensor in hf_tensors.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints saved this derived buffer
        if key == "lm_head.weight" and config.tie_embeddings:
            continue  # tied: lm_head is embed_tokens
        state[from_hf_key(key)] = tensor

    model = LlamaLM(config)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_embeddings else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{directory}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=not config.tie_embeddings)
    return model.to(dtype)
