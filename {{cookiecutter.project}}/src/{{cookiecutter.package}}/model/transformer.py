"""The blocks a decoder-only Transformer stacks, and the output every classifier returns.

- `RMSNorm`, `SwiGLU`: the Llama normalisation and feed-forward.
- `DecoderBlock`: pre-norm causal self-attention + MLP; what `LlamaLM` stacks (`model/seq2seq.py` derives its
  encoder and cross-attention blocks from it).
- `block_options`: what the config sets in each block (norm eps, dropout, which attention).
- `init_weights`: GPT-2's initialisation with depth-scaled residual projections.
- `ClassifierOutput`: `.logits` / `.loss` like transformers' classifiers, what every classifier here returns.

Shapes: B batch, T length, C model width, V vocabulary, N classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .attention import Attention, KVCache


def swiglu_hidden_dim(dim: int, multiple_of: int = 64, hidden_dim: int | None = None) -> int:
    """Llama's MLP width: 2/3 of 4*dim (SwiGLU has three matrices, so this keeps ~8*dim^2 params), rounded up."""
    if hidden_dim is not None:
        return hidden_dim
    width = int(8 * dim / 3)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight. No mean subtraction, no bias (cheaper than LayerNorm, same quality)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # torch's fused kernel: one pass instead of pow, mean, add, rsqrt, mul, mul (and their backward), with the
        # statistics accumulated in fp32 for bf16 inputs. Written out: weight * x * rsqrt(mean(x^2, -1) + eps).
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): a gated MLP; the gate decides, per hidden unit, how much of `up` passes."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:  # [B, T, C] -> [B, T, C]
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return F.dropout(y, self.dropout, self.training) if self.dropout else y


def residual_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    return F.dropout(x, p, training) if p else x


class DecoderBlock(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)). Pre-norm keeps the residual stream un-normalised, which is what
    lets deep stacks train without warm-up tricks. Names match HF LlamaDecoderLayer."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        hidden_dim: int,
        *,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        layer_idx: int = 0,
        written_out: bool = False,
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, norm_eps)
        self.self_attn = Attention(
            dim, n_heads, n_kv_heads, dropout=dropout, layer_idx=layer_idx, written_out=written_out
        )
        self.post_attention_layernorm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, hidden_dim, dropout)
        self.dropout = dropout

    def forward(
        self,
        x: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), rope=rope, mask=mask, causal=True, cache=cache)
        x = x + residual_dropout(h, self.dropout, self.training)
        return x + self.mlp(self.post_attention_layernorm(x))


def block_options(config: ModelConfig) -> dict:
    """The keyword arguments of `DecoderBlock` that come from the config (everything but the shapes)."""
    return dict(norm_eps=config.norm_eps, dropout=config.dropout, written_out=config.attention == "written_out")


def init_weights(model: nn.Module, std: float, n_layers: int) -> None:
    """normal(0, std) for every Linear and Embedding; residual output projections (o_proj, down_proj) get
    std / sqrt(2 * n_layers) because each block adds two of them to the residual stream, and GPT-2 found that keeping
    the sum's variance independent of depth helps. Biases zero, norms one (their constructors already do that)."""
    residual_std = std / (2 * n_layers) ** 0.5
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name.rsplit(".", 1)[-1]
            nn.init.normal_(module.weight, 0.0, residual_std if last in ("o_proj", "down_proj") else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)


@dataclass
class ClassifierOutput:
    logits: Tensor  # [B, N]
    loss: Tensor | None = None
