"""Attention: rotary position embeddings, grouped-query attention through SDPA, a KV cache, and a written-out reference.

Read top to bottom:
1. `RotaryEmbedding` / `apply_rotary`: positions enter attention by rotating q and k (Hugging Face Llama's pairing of
   dimensions, so weights exported to transformers give the same logits).
2. `build_attention_mask`: one boolean mask per forward pass (True = may attend), or None for the fast causal path.
3. `KVCache`: keys/values of past positions, so generation feeds one new token per step.
4. `Attention`: the module the models use. Grouped-query attention (n_kv_heads <= n_heads), causal or padded
   self-attention, or cross-attention over a separate `context` sequence.
5. `reference_attention` / `ReferenceMultiHeadAttention`: the textbook formula softmax(QK^T / sqrt(d_k)) V with one
   projection per head. Slow and obvious on purpose; the tests prove `Attention` computes the same numbers.

Shapes: B batch, T query length, S key length (past + current), C model width, H query heads, K key/value heads,
D head width (C = H * D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE. Frequencies theta^(-2i/D), repeated twice along D (the HF Llama layout).

    `sin` is stored with the rotation's sign folded in: [-sin, +sin] along D where transformers keeps [+sin, +sin]
    and negates half of x on every call instead (`rotate_half`). `cos` is the same as transformers'.
    The tables are a non-persistent buffer: they are derived from the config, never saved, and grow on demand when a
    position beyond `max_seq_len` is asked for (generation past the training length).
    """

    def __init__(self, head_dim: int, max_seq_len: int = 2048, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [D/2]
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


def build_attention_mask(
    attention_mask: Tensor | None, q_len: int, past_len: int = 0, *, causal: bool = True
) -> Tensor | None:
    """Combine padding and causality into one bool mask [B|1, 1, T, S] (True = attend), or None when not needed.

    attention_mask: None | [B, S] or [B, T] (1 = real token, 0 = padding) | [B, 1, T, S] bool (used as given).
    None is returned when plain `is_causal` (no past, no padding) or no masking at all is enough: SDPA then picks its
    fastest kernel and nothing of size T x S is materialised.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.to(torch.bool)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding anywhere: same as no mask, and the fast path stays available
    if attention_mask is None and (not causal or past_len == 0 or q_len == 1):
        return None  # caller uses is_causal=(causal and past_len == 0 and q_len > 1)
    total = past_len + q_len
    device = attention_mask.device if attention_mask is not None else None
    mask = torch.ones(1, 1, q_len, total, dtype=torch.bool, device=device)
    if causal:
        # Query i sits at absolute position past_len + i and may see keys 0 .. past_len + i (bottom-right aligned).
        q_pos = torch.arange(past_len, total, device=device)[:, None]  # [T, 1]
        k_pos = torch.arange(total, device=device)[None, :]  # [1, S]
        mask = mask & (k_pos <= q_pos)
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
# The attention module the models use


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, computed by `F.scaled_dot_product_attention`.

    Self-attention: forward(x, rope=(cos, sin), mask=..., causal=True). Cross-attention (`cross=True`): queries from x,
    keys/values from `context` [B, S, C], no rotary (the two sequences share no position axis), never causal.
    Projections are named like Hugging Face Llama (q_proj, k_proj, v_proj, o_proj) so LoRA targets and weight export
    are a key copy.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        dropout: float = 0.0,
        cross: bool = False,
        layer_idx: int = 0,
    ):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"dim {dim} must divide by n_heads {n_heads}, and n_heads by n_kv_heads {n_kv_heads}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.n_rep = n_heads // n_kv_heads  # query heads sharing one key/value head
        self.dropout = dropout
        self.cross = cross
        self.layer_idx = layer_idx  # which slot of a KVCache this layer owns
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
        context: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x [B, T, C] -> [B, T, C].

        mask: None or bool [B|1, 1|H, T, S] (True = attend), e.g. from `build_attention_mask`. With mask None and
        causal=True, causality comes from SDPA's `is_causal` (the fast path) when there is no past.
        cache: self-attention appends this call's keys/values to it (cross-attention ignores it).
        """
        B, T, _ = x.shape
        kv_in = context if self.cross else x
        S_new = kv_in.shape[1]
        # Project, then split the width into heads: [B, T, H*D] -> [B, T, H, D] -> [B, H, T, D] (a view, no copy).
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(kv_in).view(B, S_new, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, S, D]
        v = self.v_proj(kv_in).view(B, S_new, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, S, D]
        if rope is not None and not self.cross:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        past_len = 0
        if cache is not None and not self.cross:
            past_len = cache.seq_len(self.layer_idx)
            k, v = cache.update(self.layer_idx, k, v)  # [B, K, S, D] with S = past + T

        if causal and not self.cross and mask is None and past_len > 0 and T > 1:
            mask = build_attention_mask(None, T, past_len)  # a chunk after a past: is_causal would align top-left
        is_causal = causal and not self.cross and mask is None and past_len == 0 and T > 1
        y = self._sdpa(q, k, v, mask, is_causal)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # heads side by side again: [B, T, C]
        return self.o_proj(y)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        dropout_p = self.dropout if self.training else 0.0
        # enable_gqa only without a mask: with one, some torch/CUDA versions fall back to the slow math kernel (the
        # same rule transformers uses); then copying the K heads up to H is the cheaper way.
        if self.n_rep > 1 and _SDPA_HAS_GQA and mask is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=True
            )
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)  # [B, H, S, D]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


# ----------------------------------------------------------------------------------------------------------------------
# Written-out reference (what the textbooks draw). Used by the tests, and to read when SDPA feels like magic.


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE as the paper writes it: dimension i pairs with i + D/2 and the pair (a, b) turns by its position's angle,
    (a, b) -> (a cos - b sin, b cos + a sin). x [..., T, D]; cos, sin as `RotaryEmbedding` gives them."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    c, s = cos[..., :half], sin[..., half:]  # sin's second half is +sin (the first half holds -sin)
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(Q K^T / sqrt(d_k)) V.  q [..., T, d_k], k [..., S, d_k], v [..., S, d_v], mask bool [..., T, S]."""
    d_k = q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # [..., T, S]: how well each query matches each key
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # forbidden keys get zero weight after softmax
    weights = torch.softmax(scores, dim=-1)  # [..., T, S], rows sum to 1
    return weights @ v  # [..., T, d_v]: weighted average of the values


class ReferenceMultiHeadAttention(nn.Module):
    """Multi-head attention as in "Attention Is All You Need": one small W_q, W_k, W_v per head, run one head at a time,
    outputs concatenated and mixed by W_o. Grouped-query attention: query head h reads key/value head h // n_rep.

    `load_from(attn)` copies an `Attention`'s fused weights into the per-head matrices (rows h*D:(h+1)*D of q_proj are
    head h's W_q), so both can be compared on the same input.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, *, cross: bool = False):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.n_rep = n_heads // n_kv_heads
        self.cross = cross
        self.w_q = nn.ModuleList(nn.Linear(dim, self.head_dim, bias=False) for _ in range(n_heads))
        self.w_k = nn.ModuleList(nn.Linear(dim, self.head_dim, bias=False) for _ in range(n_kv_heads))
        self.w_v = nn.ModuleList(nn.Linear(dim, self.head_dim, bias=False) for _ in range(n_kv_heads))
        self.w_o = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    @torch.no_grad()
    def load_from(self, attn: Attention) -> ReferenceMultiHeadAttention:
        D = self.head_dim
        for h in range(self.n_heads):
            self.w_q[h].weight.copy_(attn.q_proj.weight[h * D : (h + 1) * D])
        for h in range(self.n_kv_heads):
            self.w_k[h].weight.copy_(attn.k_proj.weight[h * D : (h + 1) * D])
            self.w_v[h].weight.copy_(attn.v_proj.weight[h * D : (h + 1) * D])
        self.w_o.weight.copy_(attn.o_proj.weight)
        return self

    def forward(
        self,
        x: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        causal: bool = True,
        context: Tensor | None = None,
    ) -> Tensor:
        """x [B, T, C] -> [B, T, C]; mask bool [B|1, 1, T, S] (True = attend) is combined with causality if causal."""
        kv_in = context if self.cross else x
        T, S = x.shape[1], kv_in.shape[1]
        allowed = torch.ones(T, S, dtype=torch.bool, device=x.device)
        if causal and not self.cross:
            allowed = torch.tril(allowed)  # query t sees keys 0..t
        if mask is not None:
            allowed = allowed & mask[:, 0]  # [B, T, S]
        heads = []
        for h in range(self.n_heads):
            g = h // self.n_rep  # the key/value head this query head shares
            q, k, v = self.w_q[h](x), self.w_k[g](kv_in), self.w_v[g](kv_in)  # [B, T, D], [B, S, D], [B, S, D]
            if rope is not None and not self.cross:
                q, k = rotate_pairs(q, *rope), rotate_pairs(k, *rope)
            heads.append(reference_attention(q, k, v, allowed))  # [B, T, D]
        return self.w_o(torch.cat(heads, dim=-1))  # [B, T, H*D] -> [B, T, C]
