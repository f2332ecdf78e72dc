"""LlamaLM: a decoder-only language model with the Llama architecture, written to be read top to bottom.

token ids [B, T] -> embed_tokens -> n_layers x DecoderBlock (RMSNorm, GQA attention with RoPE, SwiGLU) -> norm
-> lm_head -> logits [B, T, V] (or, given labels, the loss: see `linear_cross_entropy`). `config.attention` picks how
attention is computed: SDPA, or the formula written out (`model.attention.written_out_attention`) to step through.

Parameter names are Hugging Face Llama's without the `model.` prefix (embed_tokens, layers.{i}.self_attn.q_proj,
..., norm, lm_head), so `model.hf.export_hf` is a key copy, LoRA targets ("q_proj", "v_proj", ...) are the usual ones,
and logits match transformers' LlamaForCausalLM on the same weights (tests/test_hf.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .attention import KVCache, RotaryEmbedding, build_attention_mask
from .transformer import DecoderBlock, RMSNorm, block_options, init_weights, swiglu_hidden_dim

__all__ = ["KVCache", "LMOutput", "LlamaLM"]


@dataclass
class LMOutput:
    # [B, T, V]; None when labels are given: the loss is then computed block by block from the hidden states and the
    # whole logits tensor is never built (call the model without labels to get logits)
    logits: Tensor | None
    loss: Tensor | None = None  # mean CE over labels != -100; labels are shifted inside forward (HF convention)
    past_key_values: KVCache | None = None


class LlamaLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        hidden = swiglu_hidden_dim(c.dim, c.multiple_of, c.hidden_dim)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(
            DecoderBlock(c.dim, c.n_heads, c.n_kv_heads, hidden, layer_idx=i, **block_options(c))
            for i in range(c.n_layers)
        )
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        # Derived from the config, not learned, not saved (non-persistent buffers): one table shared by all layers.
        self.rope = RotaryEmbedding(c.dim // c.n_heads, c.max_seq_len, c.rope_theta, c.rope_scaling)
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
        mask = build_attention_mask(attention_mask, T, past_len)

        x = self.embed_tokens(input_ids)  # [B, T, C]
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                # Keep only the block's input; its activations are recomputed in backward (~1/3 more compute for a
                # fraction of the memory: what lets a bigger model or batch fit).
                x = checkpoint(layer, x, rope=rope, mask=mask, cache=past_key_values, use_reentrant=False)
            else:
                x = layer(x, rope=rope, mask=mask, cache=past_key_values)
        h = self.norm(x)  # [B, T, C]

        if labels is None:
            return LMOutput(logits=self.lm_head(h), past_key_values=past_key_values if use_cache else None)
        # Position t predicts token t+1: shift the labels left (pad with -100) instead of slicing the hidden states.
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, T]
        h, targets = h.view(B * T, -1), targets.reshape(B * T)
        if type(self.lm_head) is nn.Linear:
            loss = linear_cross_entropy(h, self.lm_head.weight, targets)
        else:  # a LoRA-wrapped (or otherwise replaced) head computes more than h @ W^T: go through the module
            loss = chunked_cross_entropy(h, self.lm_head, targets)
        return LMOutput(logits=None, loss=loss, past_key_values=past_key_values if use_cache else None)

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


# The loss is computed in this many row blocks: enough that one block's fp32 logits are a small share of the full
# [N, V] tensor (and, on a CPU, small enough for the allocator to reuse instead of mapping fresh pages every step), few
# enough that the extra kernel launches are noise on a GPU. torchtune's chunked output loss uses the same 8.
LOSS_CHUNKS = 8


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, with its gradients computed in the same pass.

    The logits exist one block of rows at a time: a block is projected, turned into log-probabilities (fp32), its
    loss summed, and, when gradients are wanted, turned in place into d loss / d logits = softmax - one_hot, which is
    immediately multiplied back into the block's share of d/d hidden and d/d weight. What backward keeps is those two
    gradients ([N, C] and [V, C]) instead of [N, V] log-probabilities: for GPT-2's 50k vocabulary at 12k tokens per
    step that is 0.2 GB instead of 2.5 GB, and no full-size buffer is ever allocated (the same idea as llm.c's fused
    classifier and Liger's fused linear cross-entropy, in plain PyTorch ops). Backward only scales the saved
    gradients, so nothing saved is mutated or aliased and torch.compile traces it whole.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, n_chunks: int, grad_mode: bool) -> Tensor:
        # needs_input_grad follows requires_grad alone, and grad mode always reads off in here: grad_mode is the
        # caller's, so an evaluation under no_grad computes the loss without the two gradient matmuls per block.
        need_h, need_w = grad_mode and ctx.needs_input_grad[0], grad_mode and ctx.needs_input_grad[1]
        valid = targets != -100  # [N]
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_h = []
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        blocks = zip(
            hidden.tensor_split(n_chunks), targets.tensor_split(n_chunks), valid.tensor_split(n_chunks), strict=True
        )
        for h, t, keep in blocks:  # h [n, C], t [n], keep [n]
            logp = torch.log_softmax((h @ weight.t()).float(), dim=-1)  # [n, V], the only block-sized buffer
            safe = t.clamp(min=0)[:, None]  # ignored rows point at token 0; keep zeroes them
            total = total - (logp.gather(1, safe).squeeze(1) * keep).sum()
            if need_h or need_w:
                grad = logp.exp_()  # softmax, in the same buffer
                grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))  # - one_hot(target)
                grad.mul_(keep[:, None])
                if need_h:
                    grad_h.append(grad.to(h.dtype) @ weight)  # [n, C]
                if need_w:
                    grad_w.add_(grad.t() @ h.to(grad.dtype))  # [V, C]
        n_valid = valid.sum()
        ctx.save_for_backward(torch.cat(grad_h) if need_h else None, grad_w, n_valid)
        ctx.weight_dtype = weight.dtype
        return total / n_valid  # 0 / 0 = nan when nothing is labelled, as F.cross_entropy gives

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        # The mean over labelled tokens, times the incoming gradient. With none labelled every saved gradient row is 0
        # and stays 0 (F.cross_entropy's gradient then is 0 too), not 0 * inf.
        scale = grad_loss / n_valid.clamp(min=1)
        dh = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, n_chunks: int = LOSS_CHUNKS) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` (an output layer without bias) against ``targets``.

    hidden [N, C], weight [V, C], targets [N] (-100 = ignore) -> scalar; equals
    ``F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100)`` in value and gradients, without
    ever building the [N, V] logits (see :class:`_LinearCrossEntropy`). Under bf16 autocast the matmuls run in bf16
    and the softmax and loss in fp32, as they would for the unfused layer.
    """
    return _LinearCrossEntropy.apply(hidden, weight, targets, n_chunks, torch.is_grad_enabled())


def chunked_cross_entropy(hidden: Tensor, head: nn.Module, targets: Tensor, n_chunks: int = LOSS_CHUNKS) -> Tensor:
    """Mean cross-entropy of ``head(hidden)`` against ``targets`` for any ``head`` module (a LoRA-wrapped lm_head
    included), without ever building the whole logits tensor: the same as :func:`linear_cross_entropy` for a plain
    linear head, but through the module and autograd, which keeps each block's log-probabilities for backward."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.tensor_split(n_chunks), targets.tensor_split(n_chunks), strict=True):
        total = total + F.cross_entropy(head(h).float(), t, ignore_index=-100, reduction="sum")
    return total / (targets != -100).sum()


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
