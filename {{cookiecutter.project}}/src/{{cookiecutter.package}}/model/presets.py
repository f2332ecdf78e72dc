"""Model shapes by name, for ``--model.preset NAME`` (and ``bench --preset``, ``plan``): the one home of each shape.

A preset is data: the ``ModelConfig`` fields that make up a published model's shape. The parser applies it as a
layer just above the dataclass defaults (``config/__init__.py`` lists the layers): every field a ``--config`` file,
the ``--debug`` profile or a flag gives replaces the preset's value, field by field, whatever the order of the
arguments. So ``--model.preset smollm2-135m --model.n_layers 12`` is SmolLM2-135M's shape with 12 layers, and the
preset's ``hidden_dim`` stays: give ``--model.hidden_dim`` too when you change ``dim``. In Python:
``ModelConfig(**preset_fields("smollm2-135m"))``.

Sources: the models' ``config.json`` on the Hugging Face Hub, read (2026-12) through copies of them in public code
(the Hub itself was out of reach): torchtune's ``models/smol`` builders and printed SmolLM2-135M configs for SmolLM2,
a verbatim copy of meta-llama/Llama-3.2-1B(-Instruct)'s config for Llama 3.2. tests/test_plan.py pins the parameter
counts they give (134,515,008 and 1,235,814,400: the model cards' 135M and 1.24B).
- tiny: this project's default model (``ModelConfig``'s defaults; about 4M parameters).
- gpt2-small: GPT-2 124M's shape (12 layers, width 768, 12 heads, 1024 positions) as a Llama: RoPE instead of learned
  positions, SwiGLU with the same parameter count as GPT-2's MLP, the vocabulary padded from 50257 to 50304 (a
  multiple of 64, as nanoGPT does). The shape GPU training loops are compared at.
- smollm2-135m / smollm2-360m / smollm2-1.7b: HuggingFaceTB/SmolLM2-*/config.json (vocabulary 49152, 8192 positions,
  rope_theta 1e5 (1.3e5 for 1.7B), tied embeddings, rms_norm_eps 1e-5).
- llama-3.2-1b: meta-llama/Llama-3.2-1B/config.json, with its ``llama3`` RoPE scaling (model/attention.py).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ..config.base import ModelConfig

# What a preset sets: the shape. Everything else (dropout, attention kernel, checkpointing, ...) is the run's choice.
SHAPE_FIELDS = (
    "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len", "rope_theta",
    "tie_embeddings", "rope_scaling",
)  # fmt: skip
# The llama3 RoPE scaling of Llama 3.1 / 3.2 (rope_scaling in their config.json).
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _smollm2(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, hidden_dim: int, rope_theta: float) -> dict:
    return dict(
        vocab_size=49152, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=hidden_dim,
        max_seq_len=8192, rope_theta=rope_theta, tie_embeddings=True, rope_scaling=None,
    )  # fmt: skip


# Every preset names all of SHAPE_FIELDS, so that one preset replaces another entirely. hidden_dim None = derived
# from dim (ModelConfig's rule), as the default model has it.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {f.name: f.default for f in fields(ModelConfig) if f.name in SHAPE_FIELDS},
    "gpt2-small": dict(
        vocab_size=50304, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden_dim=None, max_seq_len=1024,
        rope_theta=10000.0, tie_embeddings=True, rope_scaling=None,
    ),
    "smollm2-135m": _smollm2(576, 30, 9, 3, 1536, 100000.0),
    "smollm2-360m": _smollm2(960, 32, 15, 5, 2560, 100000.0),
    "smollm2-1.7b": _smollm2(2048, 24, 32, 32, 8192, 130000.0),
    "llama-3.2-1b": dict(
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, max_seq_len=131072,
        rope_theta=500000.0, tie_embeddings=True, rope_scaling=LLAMA3_ROPE_SCALING,
    ),
}  # fmt: skip


def preset_fields(name: str) -> dict[str, Any]:
    """The ModelConfig fields of preset ``name`` (a copy); a ValueError naming the known presets for any other name."""
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r} is unknown: expected one of {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    if fields["rope_scaling"] is not None:
        fields["rope_scaling"] = dict(fields["rope_scaling"])
    return fields
