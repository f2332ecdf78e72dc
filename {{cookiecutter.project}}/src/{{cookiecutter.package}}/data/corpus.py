"""The pretraining corpus: a data source -> a tokenizer and packed train/val token arrays -> training windows.

    data.source ──sources.py─────> (text, end) pieces (files by format, datasets, hub; none = the built-in plays)
                ──tokenizer.py───> a byte-level BPE trained on a bounded sample of them (cached), unless one is given
                ──token_cache.py─> d1 <eos> d2 <eos> ... split into train/val, cached as memmaps (resumable)
                ──windows────────> TokenWindows: {"input_ids": [B, T], "labels": [B, T]}

:func:`prepare_corpus` is the one call the pretrain entry point makes for its data; :class:`TokenWindows` is its
training batch source and :class:`EvalWindows` its fixed validation batches.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from ..config import ConfigError
from ..config.pretrain import DataConfig
from .sources import Source, resolve_source
from .token_cache import CACHE_FORMAT, atomic_build, cache_key, exclusive, prepare_tokens
from .tokenizer import load_tokenizer, train_tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# The one call the pretrain entry point makes
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class PreparedCorpus:
    tokenizer: PreTrainedTokenizerBase
    tokenizer_dir: Path | None  # where the tokenizer lives on disk (copy it next to checkpoints); None for hub ids
    train: np.ndarray  # [N_train] token ids (memmap)
    val: np.ndarray  # [N_val]
    meta: dict  # dtype, vocab_size, documents, train_tokens, val_tokens, ...
    cache_path: Path
    cache_hit: bool  # the token arrays were reused
    tokenizer_cache_hit: bool  # a trained tokenizer was reused (False also when a tokenizer was given)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def sample_texts(source: Source, max_bytes: int) -> Iterator[str]:
    """The source's first `max_bytes` of text (UTF-8), whole pieces: what a tokenizer trains on."""
    seen = 0
    for text, _ in source.pieces():
        if seen >= max_bytes:
            return
        seen += len(text.encode("utf-8"))
        yield text


def trained_tokenizer(
    source: Source, vocab_size: int, cache_dir: Path, sample_bytes: int, say: Callable[[str], None]
) -> tuple[Path, bool]:
    """A byte-level BPE trained on the source's first sample_bytes, cached by source, vocab and sample size;
    returns (its directory, whether it was reused)."""
    key = cache_key(data=source.fingerprint(), vocab_size=vocab_size, sample_bytes=sample_bytes, format=CACHE_FORMAT)
    tok_dir = Path(cache_dir) / f"tokenizer-{key[:20]}"
    if (tok_dir / "tokenizer.json").is_file():
        return tok_dir, True
    with exclusive(Path(cache_dir) / "locks" / f"tokenizer-{key[:20]}"):
        if not (tok_dir / "tokenizer.json").is_file():
            say(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on up to {sample_bytes:,} bytes of {source}")
            atomic_build(tok_dir, lambda tmp: train_tokenizer(sample_texts(source, sample_bytes), vocab_size, tmp))
    return tok_dir, False


def prepare_corpus(
    source: str | Path | Source | None = None,
    *,
    tokenizer: str | Path | None = None,
    vocab_size: int = 4096,
    cache_dir: str | Path = ".cache/data",
    val_fraction: float = 0.05,
    chunk_tokens: int = 4096,
    train_sample_bytes: int = DataConfig.train_sample_bytes,
    log: Callable[[str], None] | None = print,
    **source_options,
) -> PreparedCorpus:
    """data.source (None = built-in Shakespeare) -> tokenizer + packed train/val token arrays, all cached.

    source_options: text_key, subset, split, streaming, revision, suffixes (see sources.resolve_source).
    tokenizer: a tokenizer directory, a tokenizer.json, or a hub id; None = train a byte-level BPE of `vocab_size`
    on the first `train_sample_bytes` of the source (cached under cache_dir/tokenizer-<key>).
    Under DDP call it on rank 0 first and then on the other ranks after a barrier (concurrent calls are safe, but
    would wait for each other).
    """
    say = log or (lambda _msg: None)
    if not isinstance(source, Source):  # a missing path, an empty folder: one line, before any work
        source = resolve_source(source, **source_options)
    tokenizer_hit = False
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        tok_path = Path(tokenizer)
        tok_dir: Path | None = (tok_path.parent if tok_path.is_file() else tok_path) if tok_path.exists() else None
    else:
        tok_dir, tokenizer_hit = trained_tokenizer(source, vocab_size, Path(cache_dir), train_sample_bytes, say)
        tok = load_tokenizer(tok_dir)
    cache = prepare_tokens(
        source, tok, cache_dir, val_fraction=val_fraction, chunk_tokens=chunk_tokens, progress=log is not None
    )
    m = cache.meta
    say(
        f"data: {source}: {m['documents']} documents, {m['train_tokens']:,} train + {m['val_tokens']:,} val tokens "
        f"({m['dtype']}, vocab {m['vocab_size']}) {'reused from' if cache.cache_hit else 'cached in'} {cache.path}"
    )
    return PreparedCorpus(tok, tok_dir, cache.train, cache.val, m, cache.path, cache.cache_hit, tokenizer_hit)


# ----------------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------------
def _windows(tokens: np.ndarray, starts: Sequence[int], seq_len: int) -> dict[str, torch.Tensor]:
    x = torch.from_numpy(np.stack([np.asarray(tokens[s : s + seq_len], dtype=np.int64) for s in starts]))  # [B, T]
    # labels == input_ids: the model shifts them inside forward (HF convention), so no token is lost at the edge.
    return {"input_ids": x, "labels": x.clone()}


def _check_length(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if tokens.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D token array, got shape {tuple(tokens.shape)}")
    if len(tokens) < seq_len:
        raise ValueError(
            f"{what} has {len(tokens)} tokens, fewer than one window of seq_len={seq_len}: "
            "use a larger corpus, a smaller seq_len or (for validation) a larger val_fraction"
        )


def _mix_seed(*parts: int) -> int:
    # splitmix64-style mixing: nearby (seed, rank, step) triples give unrelated generator seeds.
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x >> 1  # torch seeds must fit in a signed 64-bit int


class TokenWindows:
    """The pretraining BatchSource: windows of `seq_len` tokens from a packed token array.

    The position is global: ``consumed``, the windows all ranks together have drawn so far. Each call of
    :meth:`next_batch` hands every rank B windows and moves it on by B x world_size, so a checkpoint written by any
    rank, on any number of ranks, holds the same one integer.

    mode="sequential": global window n is the n-th non-overlapping window (wrapping around, the short tail skipped);
                       a call hands rank r the windows consumed + r*B ... + B - 1. With grad_accum A, optimizer step
                       s thus trains on windows s*A*B*W + g for g in 0 .. A*B*W - 1 (g = micro-batch*B*W + rank*B +
                       row): which windows a step sees depends only on s and the global batch, not on how it is
                       split into ranks and micro-batches, and a resume on another world size with the same global
                       batch continues at the exact next window.
    mode="random":     each call draws B window starts uniformly from a torch.Generator seeded by (seed, rank, k),
                       k = consumed // (B x world_size), the number of calls before it. On the same world size a
                       resume draws exactly what the uninterrupted run would have drawn. On another one, k is
                       re-derived from the global position: each rank draws what a run started on the new world size
                       would draw at that point (same global step, new rank streams).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        *,
        mode: str = "random",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if mode not in ("random", "sequential"):
            raise ValueError(f"mode must be 'random' or 'sequential', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        _check_length(tokens, seq_len, "the training corpus")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.mode, self.seed, self.rank, self.world_size = mode, seed, rank, world_size
        self.num_windows = len(tokens) // seq_len  # sequential windows (the tail shorter than seq_len is skipped)
        if mode == "sequential" and self.num_windows < batch_size * world_size:
            raise ValueError(
                f"the training corpus holds {self.num_windows} windows of {seq_len} tokens, fewer than one global "
                f"batch of {batch_size} x {world_size} ranks"
            )
        self.consumed = 0  # windows drawn by all ranks together (the same number on every rank)
        self.generator = torch.Generator()

    def window_starts(self) -> list[int]:
        """This rank's token offsets for the next batch (what :meth:`next_batch` reads; the position stays)."""
        B, T = self.batch_size, self.seq_len
        if self.mode == "random":
            self.generator.manual_seed(_mix_seed(self.seed, self.rank, self.consumed // (B * self.world_size)))
            return torch.randint(0, len(self.tokens) - T + 1, (B,), generator=self.generator).tolist()
        first = self.consumed + self.rank * B
        return [((first + j) % self.num_windows) * T for j in range(B)]

    def next_batch(self) -> dict[str, torch.Tensor]:
        starts = self.window_starts()
        self.consumed += self.batch_size * self.world_size
        return _windows(self.tokens, starts, self.seq_len)

    @property
    def epoch(self) -> float:
        """Tokens seen by all ranks / tokens in the array."""
        return self.consumed * self.seq_len / len(self.tokens)

    def state_dict(self) -> dict:
        """The global position and what it is counted in; ``world_size`` and ``batch_size`` only say how it was
        drawn (train/loop.py leaves a change of world size to :meth:`load_state_dict` because of them)."""
        return {
            "mode": self.mode, "seed": self.seed, "seq_len": self.seq_len, "windows": self.consumed,
            "world_size": self.world_size, "batch_size": self.batch_size,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if "windows" not in state:  # written before the position was global: batches drawn per rank, same split
            split = {"world_size": self.world_size, "batch_size": self.batch_size, "seq_len": self.seq_len}
            state = state | split | {"windows": int(state["step"]) * self.batch_size * self.world_size}
        saved = {key: state.get(key) for key in ("mode", "seed", "seq_len")}
        if saved != {"mode": self.mode, "seed": self.seed, "seq_len": self.seq_len}:
            raise ConfigError(
                f"the checkpoint's data position is for data.sampling={saved['mode']!r}, train.seed={saved['seed']!r}, "
                f"data.seq_len={saved['seq_len']!r}, but this run has {self.mode!r}, {self.seed!r}, {self.seq_len!r}: "
                "resume with the checkpoint's settings"
            )
        self.consumed = int(state["windows"])
        drawn_by = (int(state["world_size"]), int(state["batch_size"]))
        if drawn_by != (self.world_size, self.batch_size) and self.rank == 0:
            print(self._regrouped(*drawn_by), file=sys.stderr, flush=True)

    def _regrouped(self, world_size: int, batch_size: int) -> str:
        """The one line that says how a position saved by another split of the global batch continues."""
        was, now = f"{world_size} rank(s) x {batch_size}", f"{self.world_size} rank(s) x {self.batch_size}"
        if self.mode == "sequential":
            return (
                f"data: windows per call {was} -> {now}: sequential sampling continues the global order at window "
                f"{self.consumed:,} (no window repeated or skipped)"
            )
        return (
            f"data: windows per call {was} -> {now}: random sampling keeps the global position ({self.consumed:,} "
            "windows) and re-derives each rank's stream from it, as a run started with this split would draw"
        )


class EvalWindows:
    """A fixed set of validation batches: `num_batches` x B windows spread evenly over the array.

    Iterate it as often as you like; every pass yields the same batches. Under DDP each rank gets its own share.
    num_batches=None covers the array once with non-overlapping windows.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        num_batches: int | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_length(tokens, seq_len, "the validation split")
        per_batch = batch_size * world_size
        if num_batches is None:
            num_batches = max(1, len(tokens) // seq_len // per_batch)
        n = num_batches * per_batch
        last = len(tokens) - seq_len
        all_starts = [round(i * last / max(1, n - 1)) for i in range(n)]  # evenly spaced, first and last included
        self.batches = [
            all_starts[b * per_batch + rank * batch_size : b * per_batch + (rank + 1) * batch_size]
            for b in range(num_batches)
        ]
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for starts in self.batches:
            yield _windows(self.tokens, starts, self.seq_len)
