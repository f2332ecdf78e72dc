"""An encoder-decoder Transformer (the shape of "Attention Is All You Need"), and a task it learns in seconds.

    python -m <package>.model.seq2seq      # learns to sort digit strings on a CPU, prints exact-match accuracy

source ids [B, S] -> TransformerEncoder: embed, n_layers x EncoderBlock (self-attention that sees the whole source,
padding hidden), norm -> memory [B, S, C]
target ids [B, T] -> embed, n_layers x CrossDecoderBlock (causal self-attention, cross-attention: queries from the
target, keys and values from memory; MLP), norm -> lm_head -> logits [B, T, V]

The blocks are the language model's (`DecoderBlock`, `Attention`, RMSNorm, SwiGLU, RoPE) with the two changes an
encoder-decoder needs; the language model itself never uses this module. Where the decoder-only model learns to
continue one sequence, this one reads a whole input first and writes a different sequence from it: translation,
summarisation, or here, sorting "31415" into "11345". Each output step cross-attends to the whole source to find the
smallest digit it has not written yet, and its causal self-attention over what it wrote says which those are.
200 steps of 128 random strings (about 10 s on two CPU cores) sort 93-94% of new strings exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .attention import Attention, RotaryEmbedding, build_attention_mask
from .transformer import DecoderBlock, RMSNorm, block_options, init_weights, residual_dropout, swiglu_hidden_dim


def padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """[B, S] (1 real, 0 pad) -> [B, 1, 1, S] bool (True = real key), or None when nothing is padded.

    One row broadcast over every query: bidirectional self-attention and cross-attention only hide padded keys.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.to(torch.bool)[:, None, None, :]


class EncoderBlock(DecoderBlock):
    """DecoderBlock without the causal mask: every token sees every real (non-padding) token."""

    def forward(self, x: Tensor, *, rope: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), rope=rope, mask=mask, causal=False)
        x = x + residual_dropout(h, self.dropout, self.training)
        return x + self.mlp(self.post_attention_layernorm(x))


class CrossAttention(Attention):
    """Queries from the decoder stream x [B, T, C], keys and values from the encoder output `memory` [B, S, C].

    No rotary positions (the two sequences share no position axis) and no causal mask (the whole source is known).
    """

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor | None = None) -> Tensor:  # -> [B, T, C]
        q = self.split_heads(self.q_proj(x), self.n_heads)  # [B, H, T, D]
        k = self.split_heads(self.k_proj(memory), self.n_kv_heads)  # [B, K, S, D]
        v = self.split_heads(self.v_proj(memory), self.n_kv_heads)  # [B, K, S, D]
        return self.o_proj(self.merge_heads(self.attend(q, k, v, mask, is_causal=False)))


class CrossDecoderBlock(DecoderBlock):
    """DecoderBlock with a cross-attention step between its self-attention and its MLP."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden_dim: int, **options):
        super().__init__(dim, n_heads, n_kv_heads, hidden_dim, **options)  # options: DecoderBlock's keywords
        self.cross_attn_layernorm = RMSNorm(dim, self.input_layernorm.eps)
        attention = self.self_attn
        self.cross_attn = CrossAttention(
            dim, n_heads, n_kv_heads, dropout=attention.dropout, written_out=attention.written_out
        )

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
        x = x + residual_dropout(h, self.dropout, self.training)
        h = self.cross_attn(self.cross_attn_layernorm(x), memory, memory_mask)
        x = x + residual_dropout(h, self.dropout, self.training)
        return x + self.mlp(self.post_attention_layernorm(x))


class TransformerEncoder(nn.Module):
    """Token embedding, rotary positions, a stack of EncoderBlocks, final norm: input_ids [B, S] -> [B, S, C]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        hidden = swiglu_hidden_dim(c.dim, c.multiple_of, c.hidden_dim)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.rope = RotaryEmbedding(c.dim // c.n_heads, c.max_seq_len, c.rope_theta)
        self.layers = nn.ModuleList(
            EncoderBlock(c.dim, c.n_heads, c.n_kv_heads, hidden, **block_options(c)) for _ in range(c.n_layers)
        )
        self.norm = RMSNorm(c.dim, c.norm_eps)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        rope = self.rope.span(0, input_ids.shape[1])
        mask = padding_mask(attention_mask)
        x = self.embed_tokens(input_ids)  # [B, S, C]
        for layer in self.layers:
            x = layer(x, rope=rope, mask=mask)
        return self.norm(x)


@dataclass
class Seq2SeqOutput:
    logits: Tensor  # [B, T, V]
    loss: Tensor | None = None


class EncoderDecoder(nn.Module):
    """A small seq2seq Transformer. Encoder and decoder share the embedding and config; the LM head is tied to it.

    Label convention as in HF T5/BART: `labels` [B, T] are the target tokens themselves (-100 = ignore); when
    `decoder_input_ids` is not given it is `labels` shifted right behind `decoder_start_token_id`, so position t
    predicts labels[t] having seen labels[:t].
    """

    def __init__(self, config: ModelConfig, *, decoder_start_token_id: int = 0, pad_token_id: int = 0):
        super().__init__()
        c = self.config = config
        self.decoder_start_token_id, self.pad_token_id = decoder_start_token_id, pad_token_id
        hidden = swiglu_hidden_dim(c.dim, c.multiple_of, c.hidden_dim)
        self.encoder = TransformerEncoder(c)
        self.layers = nn.ModuleList(
            CrossDecoderBlock(c.dim, c.n_heads, c.n_kv_heads, hidden, **block_options(c)) for _ in range(c.n_layers)
        )
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        init_weights(self, c.init_std, 2 * c.n_layers)
        self.lm_head.weight = self.encoder.embed_tokens.weight  # one table for input and output tokens

    def shift_right(self, labels: Tensor) -> Tensor:
        start = torch.full_like(labels[:, :1], self.decoder_start_token_id)
        shifted = torch.cat((start, labels[:, :-1]), dim=1)
        return shifted.masked_fill(shifted == -100, self.pad_token_id)  # -100 is not a token id

    def decode(
        self, decoder_input_ids: Tensor, memory: Tensor, memory_mask: Tensor | None, attention_mask: Tensor | None
    ) -> Tensor:
        """decoder_input_ids [B, T] and the encoder's memory [B, S, C] -> logits [B, T, V]."""
        T = decoder_input_ids.shape[1]
        self_mask = build_attention_mask(attention_mask, T)
        rope = self.encoder.rope.span(0, T)
        x = self.encoder.embed_tokens(decoder_input_ids)  # [B, T, C]
        for layer in self.layers:
            x = layer(x, memory, rope=rope, self_mask=self_mask, memory_mask=memory_mask)
        return self.lm_head(self.norm(x))

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
        logits = self.decode(decoder_input_ids, memory, padding_mask(attention_mask), decoder_attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return Seq2SeqOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def generate(
        self, input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int, eos_token_id: int
    ) -> Tensor:
        """Greedy decoding: source [B, S] -> target [B, <= max_new_tokens], padded after each row's EOS.

        The encoder runs once; the decoder re-reads everything it wrote at each step (no KV cache: the targets here
        are a few tokens long). Call it in eval mode.
        """
        memory, memory_mask = self.encoder(input_ids, attention_mask), padding_mask(attention_mask)
        out = torch.full_like(input_ids[:, :1], self.decoder_start_token_id)  # [B, 1]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            next_token = self.decode(out, memory, memory_mask, None)[:, -1].argmax(dim=-1)  # [B]
            next_token = next_token.masked_fill(done, self.pad_token_id)
            done = done | (next_token == eos_token_id)
            out = torch.cat((out, next_token[:, None]), dim=1)
            if bool(done.all()):
                break
        return out[:, 1:]


# ----------------------------------------------------------------------------------------------------------------------
# The example: sort a string of digits

PAD, START, EOS, FIRST_DIGIT = 0, 1, 2, 3  # token ids; digit d is token FIRST_DIGIT + d
MAX_DIGITS = 6
EXAMPLE_CONFIG = ModelConfig(
    vocab_size=FIRST_DIGIT + 10, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, multiple_of=32
)


def sorting_batch(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """n random strings of 1..MAX_DIGITS digits: (source ids [n, L], source mask [n, L], labels [n, L + 1]).

    The source is right-padded with PAD; the labels are the same digits in ascending order, then EOS, then -100.
    """
    lengths = torch.randint(1, MAX_DIGITS + 1, (n,), generator=generator)  # [n]
    digits = torch.randint(0, 10, (n, MAX_DIGITS), generator=generator) + FIRST_DIGIT  # [n, L]
    real = torch.arange(MAX_DIGITS)[None, :] < lengths[:, None]  # [n, L]
    # Padding sorts last when it is the largest value; it then becomes -100 again.
    ordered = digits.masked_fill(~real, FIRST_DIGIT + 10).sort(dim=1).values
    labels = torch.full((n, MAX_DIGITS + 1), -100)
    labels[:, :MAX_DIGITS] = ordered.masked_fill(~real, -100)
    labels[torch.arange(n), lengths] = EOS
    return digits.masked_fill(~real, PAD), real.long(), labels


def train_sorting(steps: int = 200, batch_size: int = 128, seed: int = 0, log_every: int = 0) -> EncoderDecoder:
    """A plain training loop: AdamW, a fresh random batch each step, the learning rate warmed up over 50 steps and
    then decayed to zero along a cosine (the decay is what takes exact match from ~0.8 to above 0.9 here).
    Returns the model in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = EncoderDecoder(EXAMPLE_CONFIG, decoder_start_token_id=START, pad_token_id=PAD)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / 50) * 0.5 * (1 + math.cos(math.pi * i / steps))
    )
    for step in range(1, steps + 1):
        source, source_mask, labels = sorting_batch(batch_size, generator)
        loss = model(source, source_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and step % log_every == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    return model.eval()


def exact_match(model: EncoderDecoder, n: int = 500, seed: int = 1) -> float:
    """Share of n fresh strings whose greedy output is exactly the sorted digits followed by EOS."""
    source, source_mask, labels = sorting_batch(n, torch.Generator().manual_seed(seed))
    out = model.generate(source, source_mask, max_new_tokens=labels.shape[1], eos_token_id=EOS)
    out = F.pad(out, (0, labels.shape[1] - out.shape[1]), value=PAD)  # generation stops once every row ended
    return (out == labels.masked_fill(labels == -100, PAD)).all(dim=1).float().mean().item()


def as_text(ids: Tensor) -> str:
    return "".join(str(int(t) - FIRST_DIGIT) for t in ids if int(t) >= FIRST_DIGIT)


def main() -> None:
    start = time.perf_counter()
    model = train_sorting(log_every=50)
    print(f"exact match on 500 new strings: {exact_match(model):.3f} ({time.perf_counter() - start:.0f} s)")
    source, source_mask, _ = sorting_batch(4, torch.Generator().manual_seed(2))
    for row, out in zip(source, model.generate(source, source_mask, MAX_DIGITS + 1, EOS), strict=True):
        print(as_text(row).rjust(MAX_DIGITS), "->", as_text(out))


if __name__ == "__main__":
    main()
