"""Attention: SDPA and the written-out formula compute the same numbers (forward and gradients; causal, padding,
GQA), both equal a per-head textbook module, RoPE follows the HF Llama convention, and the KV cache reproduces
full-sequence attention."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from {{ cookiecutter.package }}.model.attention import (
    Attention,
    KVCache,
    RotaryEmbedding,
    apply_rotary,
    build_attention_mask,
    repeat_kv,
    written_out_attention,
)

# fp32 on a CPU: the two implementations differ only by summation order.
TOL = dict(atol=1e-5, rtol=1e-5)
DIM, HEADS = 32, 4
IMPLEMENTATIONS = pytest.mark.parametrize("written_out", [False, True], ids=["sdpa", "written_out"])


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE as the paper writes it: dimension i pairs with i + D/2 and the pair (a, b) turns by its position's angle,
    (a, b) -> (a cos - b sin, b cos + a sin). x [..., T, D]; cos, sin as `RotaryEmbedding` gives them."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    c, s = cos[..., :half], sin[..., half:]  # sin's second half is +sin (the first half holds -sin)
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1)


class ReferenceMultiHeadAttention(nn.Module):
    """Multi-head attention as in "Attention Is All You Need": one small W_q, W_k, W_v per head, run one head at a time,
    outputs concatenated and mixed by W_o. Grouped-query attention: query head h reads key/value head h // n_rep.

    `load_from(attn)` copies an `Attention`'s fused weights into the per-head matrices (rows h*D:(h+1)*D of q_proj are
    head h's W_q), so both can be compared on the same input.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.n_rep = n_heads // n_kv_heads
        self.w_q = nn.ModuleList(nn.Linear(dim, self.head_dim, bias=False) for _ in range(n_heads))
        self.w_k = nn.ModuleList(nn.Linear(dim, self.head_dim, bias=False) for _ in range(n_kv_heads))
        self.w_v = nn.ModuleList(nn.Linear(dim, self.head_dim, bias=False) for _ in range(n_kv_heads))
        self.w_o = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    @torch.no_grad()
    def load_from(self, attn: Attention) -> "ReferenceMultiHeadAttention":
        D = self.head_dim
        for h in range(self.n_heads):
            self.w_q[h].weight.copy_(attn.q_proj.weight[h * D : (h + 1) * D])
        for h in range(self.n_kv_heads):
            self.w_k[h].weight.copy_(attn.k_proj.weight[h * D : (h + 1) * D])
            self.w_v[h].weight.copy_(attn.v_proj.weight[h * D : (h + 1) * D])
        self.w_o.weight.copy_(attn.o_proj.weight)
        return self

    def forward(self, x: Tensor, *, rope=None, mask: Tensor | None = None, causal: bool = True) -> Tensor:
        """x [B, T, C] -> [B, T, C]; mask bool [B|1, 1, T, T] (True = attend) is combined with causality if causal."""
        T = x.shape[1]
        allowed = torch.ones(T, T, dtype=torch.bool)
        if causal:
            allowed = torch.tril(allowed)  # query t sees keys 0..t
        if mask is not None:
            allowed = allowed & mask[:, 0]  # [B, T, T]
        heads = []
        for h in range(self.n_heads):
            g = h // self.n_rep  # the key/value head this query head shares
            q, k, v = self.w_q[h](x), self.w_k[g](x), self.w_v[g](x)  # [B, T, D] each
            if rope is not None:
                q, k = rotate_pairs(q, *rope), rotate_pairs(k, *rope)
            scores = (q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)).masked_fill(~allowed, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v)  # [B, T, D]
        return self.w_o(torch.cat(heads, dim=-1))  # [B, T, H*D] -> [B, T, C]


def make_pair(n_kv_heads: int, written_out: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    attn = Attention(DIM, HEADS, n_kv_heads, written_out=written_out).eval()
    ref = ReferenceMultiHeadAttention(DIM, HEADS, n_kv_heads).load_from(attn).eval()
    return attn, ref


def rope_for(T: int):
    return RotaryEmbedding(DIM // HEADS, max_seq_len=16).span(0, T)


def padding(side: str) -> Tensor:
    keep = torch.ones(2, 6, dtype=torch.long)
    if side == "right":
        keep[0, 4:] = 0
    else:
        keep[0, :2] = 0
    return keep


@pytest.mark.parametrize("case", ["mask", "causal", "mask+causal"])
def test_written_out_attention_is_sdpa(case):
    """The formula against torch's SDPA, values and gradients, with queries and keys of different lengths."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, t, d, requires_grad=True) for t, d in ((5, 8), (7, 8), (7, 6)))
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    kwargs = {"mask": dict(attn_mask=mask), "causal": dict(is_causal=True)}.get(case)
    if kwargs is None:  # SDPA refuses both at once; the written-out form applies both
        kwargs = dict(attn_mask=mask & torch.ones(5, 7, dtype=torch.bool).tril())
        ours = written_out_attention(q, k, v, mask, is_causal=True)
    else:
        ours = written_out_attention(q, k, v, **kwargs)
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(ours, expected, **TOL)
    g = torch.randn_like(ours)
    torch.testing.assert_close(
        torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g), **TOL
    )
    # softmax rows sum to one: values all ones -> output all ones
    torch.testing.assert_close(written_out_attention(q, k, torch.ones(2, 3, 7, 6), mask), torch.ones(2, 3, 5, 6))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("side", ["none", "right", "left"])
def test_written_out_module_equals_sdpa_module_with_gradients(n_kv_heads, side):
    """The two choices of `--model.attention` in one module: same output and same gradient for every weight and the
    input, causal, with padding masks, and with grouped-query heads (SDPA's enable_gqa path when there is no mask)."""
    sdpa, _ = make_pair(n_kv_heads)
    written, _ = make_pair(n_kv_heads, written_out=True)
    x = torch.randn(2, 6, DIM)
    mask = build_attention_mask(padding(side), 6) if side != "none" else None
    grads = []
    for attn in (sdpa, written):
        xi = x.clone().requires_grad_()
        out = attn(xi, rope=rope_for(6), mask=mask)
        out.pow(2).sum().backward()
        grads.append((out, xi.grad, *(p.grad for p in attn.parameters())))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@IMPLEMENTATIONS
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_causal_matches_reference(n_kv_heads, written_out):
    attn, ref = make_pair(n_kv_heads, written_out)
    x = torch.randn(2, 6, DIM)
    rope = rope_for(6)
    out = attn(x, rope=rope)  # mask None -> is_causal
    torch.testing.assert_close(out, ref(x, rope=rope), **TOL)
    # causality: changing the last token changes nothing before it
    x2 = x.clone()
    x2[:, -1] += 1.0
    torch.testing.assert_close(attn(x2, rope=rope)[:, :-1], out[:, :-1], **TOL)


@IMPLEMENTATIONS
@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_mask_matches_reference(n_kv_heads, side, written_out):
    attn, ref = make_pair(n_kv_heads, written_out)
    x = torch.randn(2, 6, DIM)
    keep = padding(side)
    mask = build_attention_mask(keep, 6)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    out = attn(x, rope=rope_for(6), mask=mask)
    assert torch.isfinite(out).all()  # fully padded query rows must not produce NaN
    real = keep.bool()
    torch.testing.assert_close(out[real], ref(x, rope=rope_for(6), mask=mask)[real], **TOL)


@IMPLEMENTATIONS
def test_bidirectional_padding_mask(written_out):
    attn, ref = make_pair(2, written_out)
    x = torch.randn(2, 5, DIM)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mask = keep.bool()[:, None, None, :]  # padded keys hidden from every query, nothing else
    out = attn(x, rope=rope_for(5), mask=mask, causal=False)
    expected = ref(x, rope=rope_for(5), mask=mask, causal=False)
    torch.testing.assert_close(out[keep.bool()], expected[keep.bool()], **TOL)
    # without a mask and not causal every token sees every token, the future included
    x2 = x.clone()
    x2[1, -1] += 1.0
    full = attn(x, rope=rope_for(5), causal=False)
    torch.testing.assert_close(full, ref(x, rope=rope_for(5), causal=False), **TOL)
    assert not torch.allclose(attn(x2, rope=rope_for(5), causal=False)[1, 0], full[1, 0])


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


@IMPLEMENTATIONS
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_kv_cache_reproduces_full_attention(n_kv_heads, written_out):
    attn, _ = make_pair(n_kv_heads, written_out)
    rope = RotaryEmbedding(DIM // HEADS, max_seq_len=16)
    x = torch.randn(2, 7, DIM)
    full = attn(x, rope=rope.span(0, 7))
    cache = KVCache(1)
    # a 3-token prompt, then a 2-token chunk (needs the bottom-right causal mask), then single tokens
    pieces, start = [], 0
    for length in (3, 2, 1, 1):
        mask = build_attention_mask(None, length, start)
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


def test_llamalm_with_written_out_attention_equals_sdpa():
    """`--model.attention written_out` through the whole model: the same parameters (a checkpoint of one loads into
    the other), logits under padding, every gradient of the loss, and cached generation."""
    from {{ cookiecutter.package }}.config import ModelConfig
    from {{ cookiecutter.package }}.model.lm import LlamaLM

    shape = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, multiple_of=16)
    sdpa = LlamaLM(ModelConfig(**shape))
    written = LlamaLM(ModelConfig(**shape, attention="written_out"))
    written.load_state_dict(sdpa.state_dict())
    assert all(layer.self_attn.written_out for layer in written.layers)
    torch.manual_seed(1)
    ids = torch.randint(0, 61, (2, 9))
    keep = torch.ones(2, 9, dtype=torch.long)
    keep[1, 6:] = 0  # right padding in row 1
    labels = ids.masked_fill(keep == 0, -100)
    for model in (sdpa, written):
        model(ids, attention_mask=keep, labels=labels).loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(written(ids, keep).logits, sdpa(ids, keep).logits, **TOL)
    for (name, a), b in zip(sdpa.named_parameters(), written.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, **TOL, msg=name)
    prompt = ids[:, :3]
    assert torch.equal(written.generate(prompt, 6, temperature=0), sdpa.generate(prompt, 6, temperature=0))
