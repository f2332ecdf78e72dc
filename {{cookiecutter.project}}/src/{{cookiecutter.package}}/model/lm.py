"""LlamaLM: a decoder-only language model with the Llama architecture, written to be read top to bottom.

token ids [B, T] -> embed_tokens -> n_layers x DecoderBlock (RMSNorm, GQA attention with RoPE, SwiGLU) -> norm
-> lm_head -> logits [B, T, V].

Parameter names are Hugging Face Llama's without the `model.` prefix (embed_tokens, layers.{i}.self_attn.q_proj,
..., norm, lm_head), so `model.hf.export_hf` is a key copy, LoRA targets ("q_proj", "v_proj", ...) are the usual ones,
and logits match transformers' LlamaForCausalLM on the same weights (tests/test_hf.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .attention import KVCache, RotaryEmbedding, build_attention_mask
from .transformer import DecoderBlock, RMSNorm, init_weights, swiglu_hidden_dim

__all__ = ["KVCache", "LMOutput", "LlamaLM"]


@dataclass
class LMOutput:
    logits: Tensor  # [B, T, V]
    loss: Tensor | None = None  # mean CE over labels != -100; labels are shifted inside forward (HF convention)
    past_key_values: KVCache | None = None


class LlamaLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        hidden = swiglu_hidden_dim(c.dim, c.multiple_of, c.hidden_dim)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(
            DecoderBlock(c.dim, c.n_heads, c.n_kv_heads, hidden, norm_eps=c.norm_eps, dropout=c.dropout, layer_idx=i)
            for i in range(c.n_layers)
        )
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        # Derived from the config, not learned, not saved (non-persistent buffers): one table shared by all layers.
        self.rope = RotaryEmbedding(c.dim // c.n_heads, c.max_seq_len, c.rope_theta)
        init_weights(self, c.init_std, c.n_layers)
        if c.tie_embeddings:
            # One [V, C] matrix both reads tokens in and scores them out: fewer parameters, and for small models
            # the shared table trains better because every output gradient also updates the input embedding.
            self.lm_head.weight = self.embed_tokens.weight

    # ------------------------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,  # [B, T]
        attention_mask: Tensor | None = None,  # None | [B, S] 1 keep / 0 pad | [B, 1, T, S] bool (True = attend)
        labels: Tensor | None = None,  # [B, T], -100 = ignore
        position_ids: Tensor | None = None,  # [T] or [B, T]; default past_len .. past_len + T - 1
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        **kwargs,  # ignored: peft and HF-style callers pass extra keys (inputs_embeds=None, return_dict, ...)
    ) -> LMOutput:
        B, T = input_ids.shape
        if use_cache and past_key_values is None:
            past_key_values = KVCache(len(self.layers))
        past_len = past_key_values.seq_len() if past_key_values is not None else 0

        # Default positions come straight off the rotary table as slices (no gather, no host sync).
        rope = self.rope(position_ids) if position_ids is not None else self.rope.span(past_len, T)
        # None when nothing is padded and there is no past: attention then uses SDPA's is_causal fast path.
        mask = build_attention_mask(attention_mask, T, past_len, causal=True)

        x = self.embed_tokens(input_ids)  # [B, T, C]
        for layer in self.layers:
            x = layer(x, rope=rope, mask=mask, cache=past_key_values)
        logits = self.lm_head(self.norm(x))  # [B, T, V]

        loss = None
        if labels is not None:
            # Position t predicts token t+1. Shift the labels left (and pad with -100) rather than slicing the
            # logits: logits[:, :-1] would force a copy of the whole [B, T, V] tensor before the flatten.
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, T]
            loss = cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return LMOutput(logits=logits, loss=loss, past_key_values=past_key_values if use_cache else None)

    # ------------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,  # [B, T] prompts of equal length (no padding)
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample up to `max_new_tokens` tokens: -> [B, T + new]. temperature == 0 -> greedy (argmax).

        With the cache each step feeds only the newest token; without it the whole sequence is re-run (slow, kept for
        the equivalence test). Rows that produced EOS keep emitting EOS; generation stops once every row has.
        """
        was_training = self.training
        self.eval()
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        eos = eos.to(input_ids.device)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        cache = KVCache(len(self.layers)) if use_cache else None
        tokens, step_input = input_ids, input_ids
        for _ in range(max_new_tokens):
            out = self(step_input, past_key_values=cache, use_cache=use_cache)
            next_token = sample_next(out.logits[:, -1, :], temperature, top_k, top_p, generator)  # [B]
            if eos.numel():
                next_token = torch.where(done, eos[0], next_token)  # finished rows pad with EOS
                done = done | torch.isin(next_token, eos)
            tokens = torch.cat((tokens, next_token[:, None]), dim=1)
            step_input = next_token[:, None] if use_cache else tokens
            if eos.numel() and bool(done.all()):
                break
        self.train(was_training)
        return tokens

    # ------------------------------------------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (a tied matrix counted once). non_embedding drops the input embedding table unless it is
        tied to lm_head: a lookup costs no FLOPs, but the output projection does, so this is the N of 6N."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.lm_head.weight is not self.embed_tokens.weight:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matmuls (forward 2N, backward 4N) plus attention scores and the
        weighted sum, 12 * L * H * Q * T (PaLM appendix B; nanoGPT's estimate_mfu)."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layers * c.n_heads * (c.dim // c.n_heads) * seq_len


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over rows whose target != -100; the same numbers as F.cross_entropy, a cheaper backward.

    Why not F.cross_entropy: it saves log-probabilities, and its backward allocates a zero [N, V] tensor, scatters the
    targets into it, then allocates the [N, V] gradient and exponentiates all N*V log-probabilities again. Here the
    forward saves the probabilities and the backward turns them, in place, into the gradient
    (softmax - one_hot(target)) * scale: one multiply and a scatter, no exp, no new [N, V] tensor. Each [N, V]
    buffer avoided matters: with V = 8000 it is 65 MB, too big for the allocator's free lists, so every fresh one is
    new pages from the OS (~20 ms on a 2-core CPU).
    The price: backward may run only once per forward (retain_graph=True and a second backward raise an error).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:  # logits [N, V], targets [N]
        probs = torch.softmax(logits.float(), dim=-1)  # [N, V], fp32 even when logits are bf16
        valid = targets != -100  # [N]
        safe = targets.clamp(min=0)  # ignored rows point at token 0; their weight below is 0
        p_target = probs.gather(1, safe[:, None]).squeeze(1)  # [N]
        logp = p_target.log()
        tiny = p_target < 1e-30  # p underflows (loss > ~69): take those rows from an exact log_softmax instead
        if bool(tiny.any()):
            exact = torch.log_softmax(logits.float(), dim=-1).gather(1, safe[:, None]).squeeze(1)
            logp = torch.where(tiny, exact, logp)
        n_valid = valid.sum()
        ctx.save_for_backward(probs, safe, valid, n_valid)
        ctx.logits_dtype = logits.dtype
        ctx.consumed = False
        return -(logp * valid).sum() / n_valid  # 0/0 = nan when nothing is labelled, like F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if ctx.consumed:
            raise RuntimeError("cross_entropy: a second backward through the same loss is not supported")
        ctx.consumed = True
        probs, safe, valid, n_valid = ctx.saved_tensors
        scale = (valid.to(probs.dtype) * (grad_loss / n_valid))[:, None]  # [N, 1]; 0 for ignored rows
        grad = probs.mul_(scale)  # d loss / d logits = (softmax - one_hot(target)) * scale, built in place
        grad.scatter_add_(1, safe[:, None], -scale)
        return grad.to(ctx.logits_dtype), None


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean CE of logits [N, V] against targets [N] (-100 = ignore). Equals F.cross_entropy(..., ignore_index=-100)."""
    return _SoftmaxCrossEntropy.apply(logits, targets)


def sample_next(
    logits: Tensor,  # [B, V] of the last position
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row: greedy at temperature 0, else sample from the temperature-scaled, filtered softmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1] the k-th largest score
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus: keep the smallest set of most likely tokens whose probability mass reaches top_p.
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already reaches top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
