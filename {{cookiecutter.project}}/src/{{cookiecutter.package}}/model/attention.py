"""Attention: rotary position embeddings, grouped-query attention, a KV cache, and the textbook formula written out.

Read top to bottom:
1. `RotaryEmbedding` / `apply_rotary`: positions enter attention by rotating q and k (Hugging Face Llama's pairing of
   dimensions, so weights exported to transformers give the same logits); `llama3_inv_freq`: Llama 3.1's scaling.
2. `build_attention_mask`: one boolean causal mask per forward pass (True = may attend), or None for the fast path.
3. `KVCache`: keys/values of past positions, so generation feeds one new token per step.
4. `written_out_attention`: softmax(Q K^T / sqrt(d_k)) V, one line per step, to read and to step through.
5. `Attention`: the module the models use. Grouped-query attention (n_kv_heads <= n_heads), causal or bidirectional
   self-attention, computed by `F.scaled_dot_product_attention` (fused kernels) or, with `written_out=True`
   (`--model.attention written_out`), by `written_out_attention`: the same numbers (within 1e-5 in fp32, forward and
   gradients; tests/test_attention.py), every intermediate a tensor you can print in the debugger.

Shapes: B batch, T query length, S key length (past + current), C model width, H query heads, K key/value heads,
D head width (C = H * D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RopeScaling

# `enable_gqa` (SDPA broadcasting K key/value heads over H query heads without a copy) arrived in torch 2.5.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


# ----------------------------------------------------------------------------------------------------------------------
# Rotary position embeddings


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, D] by its positions' angles; cos/sin are [T, D] (shared) or [B, T, D] (per row).

    Llama pairs dimension i with i + D/2 and turns each pair (a, b) by its angle: (a cos - b sin, b cos + a sin).
    Rolling the last dim by D/2 lines b up under a (and a under b), and `sin` carries the pair's sign (-sin in the
    first half, +sin in the second, see `RotaryEmbedding`), so the whole rotation is two multiplies and an add: no
    chunk, negation and concatenation per call, and one fused kernel under torch.compile.
    """
    if cos.dim() == 3:  # per-row positions: broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    # Match x's dtype: under bf16 autocast q/k are bf16 while the tables are fp32, and mixing would upcast q and k.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def llama3_inv_freq(
    inv_freq: Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> Tensor:
    """Llama 3.1's RoPE scaling of the rotation frequencies, to stretch a model to ``factor`` x its context.

    A pair of dimensions turning once in fewer than original / high_freq_factor positions (a short wavelength: local
    word order) keeps its frequency; one turning in more than original / low_freq_factor positions (longer than the
    original context, so never seen completing a turn) is slowed by ``factor``; the band between blends the two,
    linearly in original / wavelength. The same numbers as transformers' ``rope_type="llama3"``.
    """
    wavelen = 2 * math.pi / inv_freq
    # 0 for the long wavelengths, 1 for the short ones, in between for the band (clamped, so no branch per band)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smooth = smooth.clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE. Frequencies theta^(-2i/D), repeated twice along D (the HF Llama layout).

    `sin` is stored with the rotation's sign folded in: [-sin, +sin] along D where transformers keeps [+sin, +sin]
    and negates half of x on every call instead (`rotate_half`). `cos` is the same as transformers'.
    The tables are a non-persistent buffer: they are derived from the config, never saved, and grow on demand when a
    position beyond `max_seq_len` is asked for (generation past the training length).
    """

    def __init__(
        self, head_dim: int, max_seq_len: int = 2048, theta: float = 10000.0, scaling: RopeScaling | None = None
    ):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [D/2]
        if scaling is not None:  # the only kind there is: RopeScaling.rope_type is "llama3"
            inv_freq = llama3_inv_freq(
                inv_freq,
                scaling.factor,
                scaling.low_freq_factor,
                scaling.high_freq_factor,
                scaling.original_max_position_embeddings,
            )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(max_seq_len)

    def _build(self, length: int) -> None:
        t = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)  # [L]
        freqs = torch.outer(t, self.inv_freq)  # [L, D/2]
        self.register_buffer("cos_cached", torch.cat((freqs.cos(), freqs.cos()), dim=-1), persistent=False)
        self.register_buffer("sin_cached", torch.cat((-freqs.sin(), freqs.sin()), dim=-1), persistent=False)

    def _ensure(self, length: int) -> None:
        if length > self.cos_cached.shape[0]:
            self._build(max(length, 2 * self.cos_cached.shape[0]))

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """position_ids [T] or [B, T] (int) -> cos, sin [T, D] or [B, T, D] (fp32; apply_rotary casts)."""
        self._ensure(int(position_ids.max()) + 1)  # a host sync; the default path below avoids it
        return self.cos_cached[position_ids], self.sin_cached[position_ids]

    def span(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        """cos, sin [length, D] for positions start .. start+length-1: slices of the table, no gather, no sync."""
        self._ensure(start + length)
        return self.cos_cached[start : start + length], self.sin_cached[start : start + length]


# ----------------------------------------------------------------------------------------------------------------------
# Masks and cache


def build_attention_mask(attention_mask: Tensor | None, q_len: int, past_len: int = 0) -> Tensor | None:
    """Combine padding and causality into one bool mask [B|1, 1, T, S] (True = attend), or None when not needed.

    attention_mask: None | [B, S] or [B, T] (1 = real token, 0 = padding) | [B, 1, T, S] bool (used as given).
    None is returned when plain `is_causal` (no past, no padding) is enough: SDPA then picks its fastest kernel and
    nothing of size T x S is materialised.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.to(torch.bool)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding anywhere: same as no mask, and the fast path stays available
    if attention_mask is None and (past_len == 0 or q_len == 1):
        return None  # caller uses is_causal=(past_len == 0 and q_len > 1)
    total = past_len + q_len
    device = attention_mask.device if attention_mask is not None else None
    # Query i sits at absolute position past_len + i and may see keys 0 .. past_len + i (bottom-right aligned).
    q_pos = torch.arange(past_len, total, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(total, device=device)[None, :]  # [1, S]
    mask = (k_pos <= q_pos)[None, None]  # [1, 1, T, S]
    if attention_mask is not None:
        keep = attention_mask.to(torch.bool)[:, -total:]  # [B, S]; HF passes past + current
        mask = mask & keep[:, None, None, :]
        # A padding query (left padding + causal) may see no key at all; softmax over nothing is NaN. Let such rows see
        # everything: their outputs are garbage either way and never reach a real token (pad keys stay masked).
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


class KVCache:
    """Keys and values of every position seen so far, one [B, K, S, D] pair per layer, grown by concatenation.

    Concatenation copies the past each step (quadratic in the generated length); for the small models this project
    trains that is far below the cost of the forward pass, and it keeps the cache a plain list you can inspect.
    """

    def __init__(self, n_layers: int):
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers

    def seq_len(self, layer_idx: int = 0) -> int:
        """Number of cached positions (of one layer; all layers agree between forward passes)."""
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[2]

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v [B, K, T, D] for one layer; return all keys/values [B, K, S, D] for that layer."""
        if self.keys[layer_idx] is not None:
            k = torch.cat((self.keys[layer_idx], k), dim=2)
            v = torch.cat((self.values[layer_idx], v), dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, K, S, D] -> [B, K * n_rep, S, D]: query head h uses key/value head h // n_rep (same as repeat_interleave)."""
    if n_rep == 1:
        return x
    b, k, s, d = x.shape
    return x[:, :, None].expand(b, k, n_rep, s, d).reshape(b, k * n_rep, s, d)


# ----------------------------------------------------------------------------------------------------------------------
# The formula, written out (what the textbooks draw)


def written_out_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> Tensor:
    """softmax(Q K^T / sqrt(d_k)) V, taking the arguments of `F.scaled_dot_product_attention` (equal head counts).

    query [..., T, d_k], key [..., S, d_k], value [..., S, d_v], attn_mask bool [..., T, S] (True = attend);
    is_causal: query t sees keys 0..t (top-left aligned, as in SDPA). -> [..., T, d_v].
    """
    scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])  # [..., T, S]: each query against each key
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        attn_mask = causal if attn_mask is None else attn_mask & causal
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))  # forbidden keys get weight 0 after the softmax
    # The softmax in fp32 whatever the input dtype, as SDPA's kernels accumulate it.
    weights = torch.softmax(scores.float(), dim=-1).to(value.dtype)  # [..., T, S], every row sums to 1
    if dropout_p:
        weights = F.dropout(weights, dropout_p)  # drops query-key links, as SDPA's dropout does
    return weights @ value  # [..., T, d_v]: each query's weighted average of the values


# ----------------------------------------------------------------------------------------------------------------------
# The attention module the models use


class Attention(nn.Module):
    """Multi-head self-attention with grouped-query heads: forward(x, rope=(cos, sin), mask=..., causal=True).

    Projections are named like Hugging Face Llama (q_proj, k_proj, v_proj, o_proj) so LoRA targets and weight export
    are a key copy. `written_out` only picks what `attend` calls (SDPA, or `written_out_attention`); the weights are
    the same, so a model trained with one runs with the other (transformers calls the written-out kind "eager").
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        dropout: float = 0.0,
        layer_idx: int = 0,
        written_out: bool = False,
    ):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"dim {dim} must divide by n_heads {n_heads}, and n_heads by n_kv_heads {n_kv_heads}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.n_rep = n_heads // n_kv_heads  # query heads sharing one key/value head
        self.dropout = dropout
        self.layer_idx = layer_idx  # which slot of a KVCache this layer owns
        self.written_out = written_out
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(
        self,
        x: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        causal: bool = True,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x [B, T, C] -> [B, T, C].

        mask: None or bool [B|1, 1|H, T, S] (True = attend), e.g. from `build_attention_mask`; a mask is the whole
        rule, causality included. With mask None and causal=True, causality comes from SDPA's `is_causal` (the fast
        path) when there is no past. causal=False with no mask: every position sees every position.
        cache: this call's keys/values are appended to it, and attention runs over all of them.
        """
        q = self.split_heads(self.q_proj(x), self.n_heads)  # [B, H, T, D]
        k = self.split_heads(self.k_proj(x), self.n_kv_heads)  # [B, K, T, D]
        v = self.split_heads(self.v_proj(x), self.n_kv_heads)  # [B, K, T, D]
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        T, past_len = x.shape[1], 0
        if cache is not None:
            past_len = cache.seq_len(self.layer_idx)
            k, v = cache.update(self.layer_idx, k, v)  # [B, K, S, D] with S = past + T
        if causal and mask is None and past_len > 0 and T > 1:
            mask = build_attention_mask(None, T, past_len)  # a chunk after a past: is_causal would align top-left
        is_causal = causal and mask is None and past_len == 0 and T > 1
        return self.o_proj(self.merge_heads(self.attend(q, k, v, mask, is_causal)))

    def split_heads(self, x: Tensor, n_heads: int) -> Tensor:
        """[B, T, n*D] -> [B, n, T, D]: the width cut into heads (a view, no copy), heads in front of time."""
        B, T, _ = x.shape
        return x.view(B, T, n_heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def merge_heads(y: Tensor) -> Tensor:
        """[B, H, T, D] -> [B, T, H*D]: the heads' outputs side by side again."""
        B, H, T, D = y.shape
        return y.transpose(1, 2).reshape(B, T, H * D)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        """q [B, H, T, D], k and v [B, K, S, D] -> [B, H, T, D]: each query's weighted average of the values."""
        dropout_p = self.dropout if self.training else 0.0
        if self.written_out:
            k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)  # query head h reads key/value head h // n_rep
            return written_out_attention(q, k, v, mask, dropout_p, is_causal)
        # enable_gqa only without a mask: with one, some torch/CUDA versions fall back to the slow math kernel (the
        # same rule transformers uses); then copying the K heads up to H is the cheaper way.
        if self.n_rep > 1 and _SDPA_HAS_GQA and mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=True)
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)  # [B, H, S, D]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
