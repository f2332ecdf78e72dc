"""Transformer blocks and the small non-causal models built from them.

- `RMSNorm`, `SwiGLU`: the Llama normalisation and feed-forward.
- `DecoderBlock`: pre-norm causal self-attention + MLP; what `LlamaLM` stacks.
- `EncoderBlock`: the same with bidirectional attention (padding mask only); `TransformerEncoder` stacks it.
- `CrossDecoderBlock`: causal self-attention, then cross-attention over the encoder output, then MLP.
- `EncoderDecoder`: a small seq2seq model (T5-style label convention) for translation-like toy tasks.
- `EncoderClassifier`: BERT-style sequence classification (encoder, masked mean pool, linear head).

Shapes: B batch, T length, C model width, V vocabulary, N classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .attention import Attention, KVCache, RotaryEmbedding, build_attention_mask


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


def _residual_dropout(x: Tensor, p: float, training: bool) -> Tensor:
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
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, norm_eps)
        self.self_attn = Attention(dim, n_heads, n_kv_heads, dropout=dropout, layer_idx=layer_idx)
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
        x = x + _residual_dropout(h, self.dropout, self.training)
        return x + self.mlp(self.post_attention_layernorm(x))


class EncoderBlock(nn.Module):
    """DecoderBlock without the causal mask: every token sees every real (non-padding) token."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden_dim: int, *, norm_eps=1e-5, dropout=0.0):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, norm_eps)
        self.self_attn = Attention(dim, n_heads, n_kv_heads, dropout=dropout)
        self.post_attention_layernorm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, hidden_dim, dropout)
        self.dropout = dropout

    def forward(self, x: Tensor, *, rope: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), rope=rope, mask=mask, causal=False)
        x = x + _residual_dropout(h, self.dropout, self.training)
        return x + self.mlp(self.post_attention_layernorm(x))


class CrossDecoderBlock(nn.Module):
    """Decoder block of an encoder-decoder: causal self-attention, cross-attention to the encoder output, MLP."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden_dim: int, *, norm_eps=1e-5, dropout=0.0):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, norm_eps)
        self.self_attn = Attention(dim, n_heads, n_kv_heads, dropout=dropout)
        self.cross_attn_layernorm = RMSNorm(dim, norm_eps)
        self.cross_attn = Attention(dim, n_heads, n_kv_heads, dropout=dropout, cross=True)
        self.post_attention_layernorm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, hidden_dim, dropout)
        self.dropout = dropout

    def forward(
        self,
        x: Tensor,  # [B, T, C] decoder stream
        memory: Tensor,  # [B, S, C] encoder output
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        self_mask: Tensor | None = None,  # [B, 1, T, T] bool or None (pure causal)
        memory_mask: Tensor | None = None,  # [B, 1, 1, S] bool: which encoder positions are real
    ) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), rope=rope, mask=self_mask, causal=True)
        x = x + _residual_dropout(h, self.dropout, self.training)
        h = self.cross_attn(self.cross_attn_layernorm(x), context=memory, mask=memory_mask, causal=False)
        x = x + _residual_dropout(h, self.dropout, self.training)
        return x + self.mlp(self.post_attention_layernorm(x))


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


def _padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """[B, S] (1 real, 0 pad) -> [B, 1, 1, S] bool (True = real key), or None when nothing is padded.

    One row broadcast over every query: bidirectional self-attention and cross-attention only hide padded keys.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.to(torch.bool)[:, None, None, :]


class TransformerEncoder(nn.Module):
    """Token embedding, rotary positions, a stack of EncoderBlocks, final norm: input_ids [B, T] -> [B, T, C]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        hidden = swiglu_hidden_dim(c.dim, c.multiple_of, c.hidden_dim)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.rope = RotaryEmbedding(c.dim // c.n_heads, c.max_seq_len, c.rope_theta)
        self.layers = nn.ModuleList(
            EncoderBlock(c.dim, c.n_heads, c.n_kv_heads, hidden, norm_eps=c.norm_eps, dropout=c.dropout)
            for _ in range(c.n_layers)
        )
        self.norm = RMSNorm(c.dim, c.norm_eps)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        rope = self.rope.span(0, input_ids.shape[1])
        mask = _padding_mask(attention_mask)
        x = self.embed_tokens(input_ids)  # [B, T, C]
        for layer in self.layers:
            x = layer(x, rope=rope, mask=mask)
        return self.norm(x)


@dataclass
class Seq2SeqOutput:
    logits: Tensor  # [B, T_dec, V]
    loss: Tensor | None = None


class EncoderDecoder(nn.Module):
    """A small seq2seq Transformer. Encoder and decoder share the embedding and config; the LM head is tied to it.

    Label convention as in HF T5/BART: `labels` [B, T] are the target tokens themselves (-100 = ignore); when
    `decoder_input_ids` is not given it is `labels` shifted right behind `decoder_start_token_id`, so position t
    predicts labels[t] having seen labels[:t].
    """

    def __init__(self, config: ModelConfig, *, decoder_start_token_id: int = 0, pad_token_id: int = 0):
        super().__init__()
        c = config
        self.config = c
        self.decoder_start_token_id, self.pad_token_id = decoder_start_token_id, pad_token_id
        hidden = swiglu_hidden_dim(c.dim, c.multiple_of, c.hidden_dim)
        self.encoder = TransformerEncoder(c)
        self.layers = nn.ModuleList(
            CrossDecoderBlock(c.dim, c.n_heads, c.n_kv_heads, hidden, norm_eps=c.norm_eps, dropout=c.dropout)
            for _ in range(c.n_layers)
        )
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        init_weights(self, c.init_std, 2 * c.n_layers)
        self.lm_head.weight = self.encoder.embed_tokens.weight  # one table for input and output tokens

    def shift_right(self, labels: Tensor) -> Tensor:
        start = torch.full_like(labels[:, :1], self.decoder_start_token_id)
        shifted = torch.cat((start, labels[:, :-1]), dim=1)
        return shifted.masked_fill(shifted == -100, self.pad_token_id)  # -100 is not a token id

    def forward(
        self,
        input_ids: Tensor,  # [B, S] source
        attention_mask: Tensor | None = None,  # [B, S]
        decoder_input_ids: Tensor | None = None,  # [B, T]
        decoder_attention_mask: Tensor | None = None,  # [B, T]
        labels: Tensor | None = None,  # [B, T]
        **kwargs,
    ) -> Seq2SeqOutput:
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("EncoderDecoder needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        memory = self.encoder(input_ids, attention_mask)  # [B, S, C]
        memory_mask = _padding_mask(attention_mask)  # [B, 1, 1, S] or None
        T = decoder_input_ids.shape[1]
        self_mask = build_attention_mask(decoder_attention_mask, T, causal=True)
        rope = self.encoder.rope.span(0, T)
        x = self.encoder.embed_tokens(decoder_input_ids)  # [B, T, C]
        for layer in self.layers:
            x = layer(x, memory, rope=rope, self_mask=self_mask, memory_mask=memory_mask)
        logits = self.lm_head(self.norm(x))  # [B, T, V]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return Seq2SeqOutput(logits=logits, loss=loss)


@dataclass
class ClassifierOutput:
    logits: Tensor  # [B, N]
    loss: Tensor | None = None


class EncoderClassifier(nn.Module):
    """BERT-style classifier: encode, average the real tokens' states (padding excluded), one linear layer.

    Mean pooling instead of a [CLS] token: nothing to pre-train into one special position, and it is what sentence
    encoders that train from scratch on small data do well with. Returns `.logits` / `.loss` like HF models, so
    train_step's `model(**batch).loss` works unchanged.
    """

    def __init__(self, config: ModelConfig, num_labels: int):
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.encoder = TransformerEncoder(config)
        self.head = nn.Linear(config.dim, num_labels)
        init_weights(self, config.init_std, config.n_layers)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None, **kwargs
    ) -> ClassifierOutput:
        h = self.encoder(input_ids, attention_mask)  # [B, T, C]
        if attention_mask is None:
            pooled = h.mean(dim=1)
        else:
            keep = attention_mask.to(h.dtype).unsqueeze(-1)  # [B, T, 1]
            pooled = (h * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)  # [B, C]
        logits = self.head(pooled)  # [B, N]
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ClassifierOutput(logits=logits, loss=loss)
