"""The token cache: documents tokenized once into packed token arrays on disk, reused until an input changes.

    documents ──tokenize──> d1 <eos> d2 <eos> d3 <eos> ...     one flat stream of token ids
              ──split────> chunks of `chunk_tokens`; every ~1/val_fraction-th chunk goes to validation
              ──cache────> <cache_dir>/tokens-<hash>/{train.bin, val.bin, meta.json}   (numpy memmap, uint16/uint32)

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
from transformers import PreTrainedTokenizerBase

from .sources import DEFAULT_SUFFIXES, corpus_files, iter_documents
from .tokenizer import tokenizer_fingerprint

CACHE_FORMAT = 1  # bump when the on-disk layout or the packing rule changes: old entries are then ignored


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


# ----------------------------------------------------------------------------------------------------------------------
# Cache entries: keyed by content, published atomically, read back as memmaps
# ----------------------------------------------------------------------------------------------------------------------
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


def atomic_build(final: Path, build: Callable[[Path], None]) -> bool:
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
    files = corpus_files(path, suffixes)
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

        atomic_build(entry, build)
    train, val, meta = load_token_cache(entry)
    return TokenCache(train, val, meta, entry, hit)
