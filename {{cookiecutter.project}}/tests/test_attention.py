"""Attention: the SDPA path computes exactly the textbook formula (causal, padding, GQA, cross), RoPE follows the HF
Llama convention, and the KV cache reproduces full-sequence attention."""

import pytest
import torch
import torch.nn.functional as F

from {{ cookiecutter.package }}.model.attention import (
    Attention,
    KVCache,
    ReferenceMultiHeadAttention,
    RotaryEmbedding,
    apply_rotary,
    build_attention_mask,
    reference_attention,
    repeat_kv,
    rotate_pairs,
)

TOL = dict(atol=1e-5, rtol=1e-5)
DIM, HEADS = 32, 4


def make_pair(n_kv_heads: int, cross: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    attn = Attention(DIM, HEADS, n_kv_heads, cross=cross).eval()
    ref = ReferenceMultiHeadAttention(DIM, HEADS, n_kv_heads, cross=cross).load_from(attn).eval()
    return attn, ref


def rope_for(T: int):
    return RotaryEmbedding(DIM // HEADS, max_seq_len=16).span(0, T)


def test_reference_attention_is_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 6)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(reference_attention(q, k, v, mask), expected, **TOL)
    # softmax rows sum to one: values all ones -> output all ones
    torch.testing.assert_close(reference_attention(q, k, torch.ones(2, 3, 7, 6), mask), torch.ones(2, 3, 5, 6))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_causal_matches_reference(n_kv_heads):
    attn, ref = make_pair(n_kv_heads)
    x = torch.randn(2, 6, DIM)
    rope = rope_for(6)
    out = attn(x, rope=rope)  # mask None -> SDPA is_causal
    torch.testing.assert_close(out, ref(x, rope=rope), **TOL)
    # causality: changing the last token changes nothing before it
    x2 = x.clone()
    x2[:, -1] += 1.0
    torch.testing.assert_close(attn(x2, rope=rope)[:, :-1], out[:, :-1], **TOL)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_mask_matches_reference(n_kv_heads, side):
    attn, ref = make_pair(n_kv_heads)
    x = torch.randn(2, 6, DIM)
    keep = torch.ones(2, 6, dtype=torch.long)
    if side == "right":
        keep[0, 4:] = 0
    else:
        keep[0, :2] = 0
    mask = build_attention_mask(keep, 6, causal=True)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    out = attn(x, rope=rope_for(6), mask=mask)
    assert torch.isfinite(out).all()  # fully padded query rows must not produce NaN
    real = keep.bool()
    torch.testing.assert_close(out[real], ref(x, rope=rope_for(6), mask=mask)[real], **TOL)


def test_bidirectional_padding_mask():
    attn, ref = make_pair(2)
    x = torch.randn(2, 5, DIM)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mask = build_attention_mask(keep, 5, causal=False)
    out = attn(x, rope=rope_for(5), mask=mask, causal=False)
    expected = ref(x, rope=rope_for(5), mask=mask, causal=False)
    torch.testing.assert_close(out[keep.bool()], expected[keep.bool()], **TOL)
    # first token sees the future when not causal
    x2 = x.clone()
    x2[1, -1] += 1.0
    assert not torch.allclose(attn(x2, rope=rope_for(5), mask=mask, causal=False)[1, 0], out[1, 0])


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_cross_attention_matches_reference(n_kv_heads):
    attn, ref = make_pair(n_kv_heads, cross=True)
    x, context = torch.randn(2, 3, DIM), torch.randn(2, 7, DIM)
    keep = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    mask = build_attention_mask(keep, 7, causal=False)[:, :, :1, :]  # [B, 1, 1, S]: same for every query
    out = attn(x, context=context, mask=mask, causal=False)
    assert out.shape == (2, 3, DIM)
    torch.testing.assert_close(out, ref(x, context=context, mask=mask, causal=False), **TOL)
    # padded context positions have no influence
    context2 = context.clone()
    context2[1, 4:] = torch.randn(3, DIM)
    torch.testing.assert_close(attn(x, context=context2, mask=mask, causal=False), out, **TOL)


def test_repeat_kv_is_repeat_interleave():
    k = torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(repeat_kv(k, 2), k.repeat_interleave(2, dim=1))


def test_rotary_matches_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0, max_position_embeddings=32)
    hf_rope = LlamaRotaryEmbedding(cfg)
    ours = RotaryEmbedding(16, max_seq_len=8, theta=500.0)  # grows past 8 on demand
    position_ids = torch.tensor([[0, 1, 2, 3, 20], [5, 6, 7, 8, 9]])
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 4, 5, 16)
    cos_hf, sin_hf = hf_rope(q, position_ids)
    cos, sin = ours(position_ids)
    torch.testing.assert_close(cos, cos_hf, **TOL)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    torch.testing.assert_close(apply_rotary(q, cos, sin), q_hf, **TOL)
    torch.testing.assert_close(apply_rotary(k, cos, sin), k_hf, **TOL)
    torch.testing.assert_close(rotate_pairs(q, cos[:, None], sin[:, None]), q_hf, **TOL)  # written out: the same


def test_rotary_uses_no_concatenation():
    rope = RotaryEmbedding(8, max_seq_len=4)
    cos, sin = rope.span(0, 4)
    seen = []

    def record(func, types, args=(), kwargs=None):
        seen.append(func.__name__)
        return func(*args, **(kwargs or {}))

    from torch.overrides import TorchFunctionMode

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return record(func, types, args, kwargs)

    with Record():
        apply_rotary(torch.randn(1, 2, 4, 8), cos, sin)
    assert seen and not {"cat", "concat", "concatenate", "chunk", "neg"} & set(seen), seen


def test_rotary_is_a_relative_rotation():
    rope = RotaryEmbedding(8, max_seq_len=32)
    q, k = torch.randn(8), torch.randn(8)
    c90, s90 = torch.zeros(8), torch.cat((-torch.ones(4), torch.ones(4)))  # a quarter turn: multiply by i
    torch.testing.assert_close(apply_rotary(apply_rotary(q, c90, s90), c90, s90), -q)  # i * i = -1

    def score(m, n):
        cm, sm = rope(torch.tensor([m]))
        cn, sn = rope(torch.tensor([n]))
        return (apply_rotary(q, cm, sm) * apply_rotary(k, cn, sn)).sum()

    torch.testing.assert_close(score(3, 1), score(12, 10), **TOL)  # depends on m - n only
    c, s = rope(torch.tensor([7]))
    torch.testing.assert_close(apply_rotary(q, c, s).norm(), q.norm(), **TOL)  # a rotation keeps length


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_kv_cache_reproduces_full_attention(n_kv_heads):
    attn, _ = make_pair(n_kv_heads)
    rope = RotaryEmbedding(DIM // HEADS, max_seq_len=16)
    x = torch.randn(2, 7, DIM)
    full = attn(x, rope=rope.span(0, 7))
    cache = KVCache(1)
    # a 3-token prompt, then a 2-token chunk (needs the bottom-right causal mask), then single tokens
    pieces, start = [], 0
    for length in (3, 2, 1, 1):
        mask = build_attention_mask(None, length, start, causal=True)
        pieces.append(attn(x[:, start : start + length], rope=rope.span(start, length), mask=mask, cache=cache))
        start += length
    assert cache.seq_len() == 7 and cache.keys[0].shape == (2, n_kv_heads, 7, DIM // HEADS)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)
    # without a mask the module builds the bottom-right causal mask for a chunk itself
    cache = KVCache(1)
    head = attn(x[:, :4], rope=rope.span(0, 4), cache=cache)
    tail = attn(x[:, 4:], rope=rope.span(4, 3), cache=cache)
    torch.testing.assert_close(torch.cat((head, tail), dim=1), full, **TOL)


def test_mask_none_when_nothing_to_mask():
    assert build_attention_mask(None, 5) is None
    assert build_attention_mask(torch.ones(2, 5), 5) is None  # all real tokens: keep the fast is_causal path
    assert build_attention_mask(None, 1, 4) is None  # one new token sees the whole past
    chunk = build_attention_mask(None, 2, 3)
    assert chunk.shape == (1, 1, 2, 5)
    assert chunk[0, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_attention_rejects_bad_head_counts():
    with pytest.raises(ValueError, match="n_kv_heads"):
        Attention(32, 4, 3)
