"""Pretraining data: read documents, tokenize them once into packed token arrays, cut training windows.

    documents ──tokenize──> d1 <eos> d2 <eos> d3 <eos> ...     one flat stream of token ids
              ──split────> chunks of `chunk_tokens`; every ~1/val_fraction-th chunk goes to validation
              ──cache────> <cache_dir>/tokens-<hash>/{train.bin, val.bin, meta.json}   (numpy memmap, uint16/uint32)
              ──windows──> TokenWindows: {"input_ids": [B, T], "labels": [B, T]}

The cache key hashes the input files' bytes, the tokenizer and the split settings, so editing a file or changing the
tokenizer re-tokenizes, and everything else reuses the arrays. Cache entries are written to a temporary directory
and renamed into place, so an interrupted run never leaves a half-written entry behind.

Validation chunks are spread evenly over the stream (not just its tail) so that, for the built-in corpus, every play
and genre is represented in the validation loss.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from . import builtin
from .jsonl import iter_jsonl
from .tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer

DEFAULT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl")
CACHE_FORMAT = 1  # bump when the on-disk layout or the packing rule changes: old entries are then ignored
_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages"}


# ----------------------------------------------------------------------------------------------------------------------
# Readers: every reader yields documents (str); one document = one file, or one JSONL record
# ----------------------------------------------------------------------------------------------------------------------
def read_text_file(path: str | Path) -> Iterator[str]:
    # errors="replace": one badly encoded byte should not stop a corpus of thousands of files.
    yield Path(path).read_text(encoding="utf-8", errors="replace")


def jsonl_texts(path: str | Path, text_key: str = "text") -> Iterator[str]:
    """The ``text_key`` string of every record of a JSONL corpus file, streamed."""
    for lineno, record in iter_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string field {text_key!r}")
        yield record[text_key]


def source_files(path: str | Path, suffixes: Sequence[str] = DEFAULT_SUFFIXES) -> list[Path]:
    """The files a data path stands for: the file itself, or every file with one of `suffixes` below a directory
    (recursive, sorted, skipping hidden directories and __pycache__)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path not found: {path}")
    if path.is_file():
        return [path]
    wanted = {s.lower() for s in suffixes}
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
        files += [Path(root) / n for n in sorted(names) if Path(n).suffix.lower() in wanted and not n.startswith(".")]
    if not files:
        raise ValueError(f"no files with suffixes {', '.join(sorted(wanted))} under {path}")
    return files


def read_text_dir(
    path: str | Path, suffixes: Sequence[str] = DEFAULT_SUFFIXES, text_key: str = "text"
) -> Iterator[str]:
    for file in source_files(path, suffixes):
        yield from _read_file(file, text_key)


def _read_file(file: Path, text_key: str) -> Iterator[str]:
    return jsonl_texts(file, text_key) if file.suffix.lower() == ".jsonl" else read_text_file(file)


def iter_documents(
    path: str | Path | None, *, suffixes: Sequence[str] = DEFAULT_SUFFIXES, text_key: str = "text"
) -> Iterator[str]:
    """Documents of a data path: None = the built-in Shakespeare corpus (one document per play)."""
    if path is None:
        for play in builtin.split_plays(builtin.read_corpus_text()):
            yield play.text
        return
    for file in source_files(path, suffixes):
        yield from _read_file(file, text_key)


def _corpus_files(path: str | Path | None, suffixes: Sequence[str]) -> list[Path]:
    return [builtin.BUILTIN_CORPUS] if path is None else source_files(path, suffixes)


def content_hash(files: Sequence[Path], **settings: object) -> str:
    """sha256 over the files' names and bytes plus the given settings (the cache key)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for file in files:
        h.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint; it holds every id while vocab_size <= 65536 (ids < 2**16)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_val_chunk(index: int, val_fraction: float) -> bool:
    """Chunk `index` goes to validation: exactly floor(n * val_fraction) of the first n chunks, evenly spaced."""
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


def _encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: parallel, and no "sequence too long" warnings
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


class _Packer:
    """Streams token ids into train.bin / val.bin chunk by chunk, so memory stays O(chunk_tokens)."""

    def __init__(self, files: dict[str, BinaryIO], dtype: np.dtype, val_fraction: float, chunk_tokens: int):
        self.files = files  # {"train": ..., "val": ...}, opened for binary writing by the caller
        self.counts = {"train": 0, "val": 0}
        self.dtype, self.val_fraction, self.chunk_tokens = dtype, val_fraction, chunk_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.chunks = 0
        self.pending: np.ndarray | None = None  # the last full chunk, held back for the tiny-corpus rule in finish()

    def add(self, ids: list[int]) -> None:
        self.buffer.append(np.asarray(ids, dtype=self.dtype))
        self.buffered += len(ids)
        while self.buffered >= self.chunk_tokens:
            flat = np.concatenate(self.buffer)
            self._push(flat[: self.chunk_tokens])
            rest = flat[self.chunk_tokens :]
            self.buffer, self.buffered = [rest], len(rest)

    def _push(self, chunk: np.ndarray) -> None:
        if self.pending is not None:
            self._write(self.pending, self.chunks - 1)
        self.pending = chunk
        self.chunks += 1

    def _write(self, chunk: np.ndarray, index: int, split: str | None = None) -> None:
        split = split or ("val" if is_val_chunk(index, self.val_fraction) else "train")
        self.files[split].write(chunk.tobytes())
        self.counts[split] += len(chunk)

    def finish(self) -> dict[str, int]:
        tail = [self.pending] if self.pending is not None else []
        rest = np.concatenate(self.buffer) if self.buffer else np.empty(0, self.dtype)
        tail_indices = ([self.chunks - 1] if self.pending is not None else []) + ([self.chunks] if len(rest) else [])
        tail_chunks = [*tail, rest] if len(rest) else tail
        no_val_yet = self.counts["val"] == 0 and not any(is_val_chunk(i, self.val_fraction) for i in tail_indices)
        if self.val_fraction > 0 and no_val_yet and tail_chunks:
            # Too few chunks for the even rule to pick one: hold out the last val_fraction of the stream instead.
            flat = np.concatenate(tail_chunks)
            total = self.counts["train"] + len(flat)
            n_val = min(len(flat) - 1, max(1, round(total * self.val_fraction)))
            self._write(flat[: len(flat) - n_val], -1, "train")
            self._write(flat[len(flat) - n_val :], -1, "val")
        else:
            for chunk, index in zip(tail_chunks, tail_indices, strict=True):
                self._write(chunk, index)
        return dict(self.counts)


def pack_documents(
    documents: Iterator[str],
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    *,
    val_fraction: float = 0.05,
    chunk_tokens: int = 4096,
    batch_docs: int = 256,
) -> dict:
    """Tokenize `documents` into out_dir/{train,val}.bin (EOS after every document); returns the meta dict."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token, which separates documents in the packed stream")
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    n_docs = 0
    batch: list[str] = []
    with open(out_dir / "train.bin", "wb") as train_f, open(out_dir / "val.bin", "wb") as val_f:
        packer = _Packer({"train": train_f, "val": val_f}, dtype, val_fraction, chunk_tokens)

        def flush() -> None:
            for ids in _encode_batch(tokenizer, batch):
                packer.add([*ids, eos])
            batch.clear()

        for doc in documents:
            if doc.strip():
                batch.append(doc)
                n_docs += 1
                if len(batch) >= batch_docs:
                    flush()
        flush()
        counts = packer.finish()
    if n_docs == 0:
        raise ValueError("the corpus is empty: no document has any non-whitespace text")
    return {
        "format": CACHE_FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_token_id": eos,
        "documents": n_docs,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "val_fraction": val_fraction,
        "chunk_tokens": chunk_tokens,
    }


def _memmap(path: Path, dtype: str, length: int) -> np.ndarray:
    if length == 0:  # np.memmap refuses empty files
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(length,))


def load_token_cache(entry: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train, val, meta) of a cache entry written by tokenize_corpus; the arrays are read-only memmaps."""
    meta = json.loads((entry / "meta.json").read_text())
    return (
        _memmap(entry / "train.bin", meta["dtype"], meta["train_tokens"]),
        _memmap(entry / "val.bin", meta["dtype"], meta["val_tokens"]),
        meta,
    )


def _atomic_build(final: Path, build: Callable[[Path], None]) -> bool:
    """Run build(tmp_dir) and rename tmp_dir to `final`. Returns False if another process got there first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        os.replace(tmp, final)  # atomic on POSIX; fails if `final` exists and is not empty
        return True
    except OSError:
        if (final / "meta.json").is_file() or (final / "tokenizer.json").is_file():
            return False  # a concurrent process (another DDP rank) finished first: use its entry
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class TokenCache:
    train: np.ndarray  # [N_train] uint16|uint32 memmap
    val: np.ndarray  # [N_val]
    meta: dict
    path: Path  # the cache entry directory
    cache_hit: bool  # True: reused, nothing was tokenized


def tokenize_corpus(
    path: str | Path | None,
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | Path,
    *,
    val_fraction: float = 0.05,
    chunk_tokens: int = 4096,
    suffixes: Sequence[str] = DEFAULT_SUFFIXES,
    text_key: str = "text",
) -> TokenCache:
    """Tokenize the corpus at `path` (None = built-in) once; later calls with the same inputs reuse the arrays."""
    files = _corpus_files(path, suffixes)
    key = content_hash(
        files,
        tokenizer=hashlib.sha256(tokenizer_fingerprint(tokenizer).encode()).hexdigest(),
        val_fraction=val_fraction,
        chunk_tokens=chunk_tokens,
        text_key=text_key,
        format=CACHE_FORMAT,
    )
    entry = Path(cache_dir) / f"tokens-{key[:20]}"
    hit = (entry / "meta.json").is_file()
    if not hit:

        def build(tmp: Path) -> None:
            docs = iter_documents(path, suffixes=suffixes, text_key=text_key)
            meta = pack_documents(docs, tokenizer, tmp, val_fraction=val_fraction, chunk_tokens=chunk_tokens)
            meta.update(key=key, source=str(path) if path is not None else "builtin", files=len(files))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the entry complete

        _atomic_build(entry, build)
    train, val, meta = load_token_cache(entry)
    return TokenCache(train, val, meta, entry, hit)


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


def prepare_corpus(
    path: str | Path | None = None,
    *,
    tokenizer: str | Path | None = None,
    vocab_size: int = 4096,
    cache_dir: str | Path = ".cache/data",
    val_fraction: float = 0.05,
    text_key: str = "text",
    suffixes: Sequence[str] = DEFAULT_SUFFIXES,
    chunk_tokens: int = 4096,
    log: Callable[[str], None] | None = print,
) -> PreparedCorpus:
    """Data path (None = built-in Shakespeare) -> tokenizer + packed train/val token arrays, all cached.

    tokenizer: a tokenizer directory, a tokenizer.json, or a hub id; None = train a byte-level BPE of `vocab_size`
    on the corpus itself (cached under cache_dir/tokenizer-<hash>, keyed by the corpus bytes and vocab_size).
    Under DDP call it on rank 0 first and then on the other ranks after a barrier (concurrent calls are safe, but
    would tokenize the corpus once per rank).
    """
    say = log or (lambda _msg: None)
    files = _corpus_files(path, suffixes)  # raises FileNotFoundError / ValueError early, before any work
    source = "the built-in Shakespeare corpus" if path is None else str(path)
    tokenizer_hit = False
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        tok_path = Path(tokenizer)
        tok_dir: Path | None = (tok_path.parent if tok_path.is_file() else tok_path) if tok_path.exists() else None
    else:
        key = content_hash(files, vocab_size=vocab_size, text_key=text_key, format=CACHE_FORMAT)
        tok_dir = Path(cache_dir) / f"tokenizer-{key[:20]}"
        tokenizer_hit = (tok_dir / "tokenizer.json").is_file()
        if not tokenizer_hit:
            say(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {source}")

            def build(tmp: Path) -> None:
                train_tokenizer(iter_documents(path, suffixes=suffixes, text_key=text_key), vocab_size, tmp)

            _atomic_build(tok_dir, build)
        tok = load_tokenizer(tok_dir)
    cache = tokenize_corpus(
        path, tok, cache_dir, val_fraction=val_fraction, chunk_tokens=chunk_tokens, suffixes=suffixes, text_key=text_key
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

    mode="random":     each batch draws B window starts uniformly from a torch.Generator seeded by
                       (seed, rank, batch index). The state is that batch index alone, so resume is exact on every
                       rank even when only rank 0's state was checkpointed.
    mode="sequential": walks non-overlapping windows in order (wrapping around); step k hands rank r the windows
                       k*B*world_size + r*B ... + B - 1, so ranks never see the same window within an epoch.
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
        self.step = 0  # batches produced so far (per rank; equal on all ranks)
        self.generator = torch.Generator()

    def next_batch(self) -> dict[str, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        if self.mode == "random":
            self.generator.manual_seed(_mix_seed(self.seed, self.rank, self.step))
            starts = torch.randint(0, len(self.tokens) - T + 1, (B,), generator=self.generator).tolist()
        else:
            first = self.step * B * self.world_size + self.rank * B
            starts = [((first + j) % self.num_windows) * T for j in range(B)]
        self.step += 1
        return _windows(self.tokens, starts, T)

    @property
    def epoch(self) -> float:
        """Tokens seen by all ranks / tokens in the array."""
        return self.step * self.batch_size * self.world_size * self.seq_len / len(self.tokens)

    def state_dict(self) -> dict:
        return {"mode": self.mode, "seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode or state.get("seed") != self.seed:
            raise ValueError(
                f"data state is for mode={state.get('mode')!r} seed={state.get('seed')!r}, "
                f"but this source has mode={self.mode!r} seed={self.seed!r}"
            )
        self.step = int(state["step"])


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
