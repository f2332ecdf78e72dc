"""The token cache: a source tokenized once into packed token arrays on disk, reused until an input changes.

    pieces ──encode_batch──> staging shards  <cache_dir>/tokens-<key>.staging/{shard-00000.bin, ..., manifest.json}
           ──assemble─────> d1 <eos> d2 <eos> ... in chunks of `chunk_tokens`, every ~1/val_fraction-th to validation
           ──publish──────> <cache_dir>/tokens-<key>/{train.bin, val.bin, meta.json}   (numpy memmap, uint16/uint32)

Preparation is resumable: a shard (about SHARD_CHARS characters of text) is written to a temporary name, renamed,
and only then listed in the staging manifest, so a killed run leaves complete listed shards and at most one unlisted
partial file, which the next run deletes before it skips the listed shards' pieces and goes on. The entry the loop
reads appears only after every shard is done (built in a temporary directory and renamed into place), and the
output is byte-identical to an uninterrupted run's: every piece is encoded on its own, so batching and shard
boundaries never change a token.

The key hashes the source's fingerprint (local files by path, size, mtime and a sample; hub data by revision), the
tokenizer and the split settings, so editing a file or changing the tokenizer re-tokenizes, nothing else does.

Parallelism: `tokenizers`' Rust encode_batch already spreads a batch over every core (its own thread pool, without
the GIL). ``bench prepare`` measured the whole preparation at 0.84-0.86x the library's encode alone on 2 cores; most
of the rest is taking the ids out of the library as Python lists (``Encoding.ids``) and into numpy. Reading the next
batch in a background thread measured slower there (0.76x: it competes with the encoder's threads and for the GIL).
Validation chunks are spread evenly over the stream (not just its tail) so every part of the corpus is represented.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from transformers import PreTrainedTokenizerBase

from ..config import ConfigError
from .sources import Piece, Source
from .tokenizer import tokenizer_fingerprint

CACHE_FORMAT = 2  # bump when the on-disk layout or the packing rule changes: old entries are then ignored
SHARD_CHARS = 64 << 20  # characters of text per staging shard: what a killed preparation can lose at most
BATCH_CHARS = 4 << 20  # characters per encode_batch call: enough to keep every core busy, bounded memory
BATCH_PIECES = 4096
COPY_TOKENS = 1 << 22  # tokens moved at a time from the shards into train.bin / val.bin


# ----------------------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint; it holds every id while vocab_size <= 65536 (ids < 2**16)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_val_chunk(index: int, val_fraction: float) -> bool:
    """Chunk `index` goes to validation: exactly floor(n * val_fraction) of the first n chunks, evenly spaced."""
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: parallel, no offsets, no "sequence too long" warnings
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


class _Packer:
    """Streams token ids into train.bin / val.bin chunk by chunk, so memory stays O(what one add() brings)."""

    def __init__(self, files: dict[str, BinaryIO], dtype: np.dtype, val_fraction: float, chunk_tokens: int):
        self.files = files  # {"train": ..., "val": ...}, opened for binary writing by the caller
        self.counts = {"train": 0, "val": 0}
        self.dtype, self.val_fraction, self.chunk_tokens = dtype, val_fraction, chunk_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.chunks = 0
        self.pending: np.ndarray | None = None  # the last full chunk, held back for the tiny-corpus rule in finish()

    def add(self, ids: np.ndarray) -> None:
        self.buffer.append(ids)
        self.buffered += len(ids)
        if self.buffered < self.chunk_tokens:
            return
        flat = np.concatenate(self.buffer)
        full = len(flat) // self.chunk_tokens * self.chunk_tokens
        for start in range(0, full, self.chunk_tokens):
            self._push(flat[start : start + self.chunk_tokens])
        rest = flat[full:].copy()  # drop the reference to `flat`
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


# ----------------------------------------------------------------------------------------------------------------------
# Staging: resumable shards of the token stream
# ----------------------------------------------------------------------------------------------------------------------
class Staging:
    """<entry>.staging/: published shards listed in manifest.json; anything else there is a killed run's leftover."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.path / "manifest.json"
        listed = json.loads(manifest.read_text()) if manifest.is_file() else {}
        self.shards: list[dict] = listed.get("shards", []) if listed.get("key") == key else []
        self.itemsize = 0

    def keep_complete(self, itemsize: int) -> None:
        """Keep the listed shards up to the first missing or short one; delete every other file."""
        self.itemsize = itemsize
        good = 0
        for shard in self.shards:
            file = self.path / shard["file"]
            if not file.is_file() or file.stat().st_size != shard["tokens"] * itemsize:
                break
            good += 1
        self.shards = self.shards[:good]
        keep = {s["file"] for s in self.shards} | {"manifest.json"}
        for file in self.path.iterdir():
            if file.name not in keep:
                file.unlink()
        self._write_manifest()

    def _write_manifest(self) -> None:
        tmp = self.path / ".manifest.json.tmp"
        tmp.write_text(json.dumps({"key": self.key, "shards": self.shards}, indent=1) + "\n")
        os.replace(tmp, self.path / "manifest.json")

    def publish(self, tmp: Path, record: dict) -> None:
        """Rename a finished shard into place, then list it (the order a kill cannot break)."""
        record["file"] = f"shard-{len(self.shards):05d}.bin"
        os.replace(tmp, self.path / record["file"])
        self.shards.append(record)
        self._write_manifest()

    def blocks(self, dtype: np.dtype, block: int) -> Iterator[np.ndarray]:
        """The shards' tokens in order, `block` at a time, read (not memory-mapped: resident memory stays flat)."""
        for shard in self.shards:
            with open(self.path / shard["file"], "rb") as f:
                while len(ids := np.fromfile(f, dtype=dtype, count=block)):
                    yield ids


@dataclass
class _Shard:
    """The shard being written: its partial file and what it covers so far."""

    file: BinaryIO
    tmp: Path
    tokens: int = 0
    documents: int = 0
    pieces: int = 0
    chars: int = 0


def _encode_into(
    batch: list[Piece], tokenizer, eos: int, dtype: np.dtype, in_doc: bool
) -> tuple[np.ndarray, int, bool]:
    """Token ids of a batch of pieces, EOS after each document that had text; (ids, documents ended, in_doc)."""
    wanted = [i for i, (text, _) in enumerate(batch) if text and not text.isspace()]
    ids = iter(encode_batch(tokenizer, [batch[i][0] for i in wanted]))
    wanted_set, parts, documents = set(wanted), [], 0
    for i, (_, end) in enumerate(batch):
        if i in wanted_set:
            parts.append(np.asarray(next(ids), dtype=dtype))
            in_doc = True
        if end and in_doc:
            parts.append(np.array([eos], dtype=dtype))
            documents, in_doc = documents + 1, False
    return (np.concatenate(parts) if parts else np.empty(0, dtype)), documents, in_doc


# ----------------------------------------------------------------------------------------------------------------------
# Preparation
# ----------------------------------------------------------------------------------------------------------------------
class Progress:
    """Characters of text done (ETA from the source's size) and tokens/s: a tqdm bar on a terminal, else a plain line
    every LINE_SECONDS (batch jobs' logs); silent when not enabled."""

    LINE_SECONDS = 60.0

    def __init__(self, total: int | None, done: int, enabled: bool):
        self.total, self.done, self.enabled, self.bar = total, done, enabled, None
        self.start = self.last_line = time.perf_counter()
        self.tokens, self.chars = 0, 0
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, desc="tokenize", dynamic_ncols=True)

    def update(self, chars: int, tokens: int) -> None:
        self.tokens, self.chars, self.done = self.tokens + tokens, self.chars + chars, self.done + chars
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(chars)
            self.bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s", refresh=False)
        elif self.enabled and now - self.last_line >= self.LINE_SECONDS:
            self.last_line = now
            print(self.line(rate, now), file=sys.stderr, flush=True)

    def line(self, rate: float, now: float) -> str:
        from tqdm import tqdm

        of = f" of ~{self.total / 1e9:.2f} GB" if self.total else ""
        eta = ""
        if self.total and self.chars:
            left = max(self.total - self.done, 0) * (now - self.start) / self.chars
            eta = f", ETA {tqdm.format_interval(left)}"
        return f"tokenize: {self.done / 1e9:.2f} GB{of}, {rate / 1e6:.2f}M tok/s{eta}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def batches(pieces: Iterator[Piece], skip: int) -> Iterator[list[Piece]]:
    """The pieces after the first `skip`, in batches of about BATCH_CHARS characters or BATCH_PIECES pieces."""
    batch, chars = [], 0
    for piece in itertools.islice(pieces, skip, None):
        batch.append(piece)
        chars += len(piece[0])
        if chars >= BATCH_CHARS or len(batch) >= BATCH_PIECES:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_shards(
    source: Source, tokenizer: PreTrainedTokenizerBase, staging: Staging, *, shard_chars: int, progress: Progress
) -> None:
    """Tokenize the source's pieces after the staged shards' into new shards of about shard_chars characters."""
    dtype = token_dtype(len(tokenizer))
    eos = tokenizer.eos_token_id
    skip = sum(s["pieces"] for s in staging.shards)
    in_doc = bool(staging.shards and staging.shards[-1]["in_doc"])
    shard: _Shard | None = None
    for batch in batches(source.pieces(), skip):
        if shard is None:
            tmp = staging.path / f".shard-{len(staging.shards):05d}.tmp"
            # Closed when the shard is published; a killed run's partial file is deleted by the next run.
            shard = _Shard(open(tmp, "wb"), tmp)  # noqa: SIM115
        ids, documents, in_doc = _encode_into(batch, tokenizer, eos, dtype, in_doc)
        shard.file.write(ids.tobytes())
        chars = sum(len(text) for text, _ in batch)
        shard.tokens, shard.documents = shard.tokens + len(ids), shard.documents + documents
        shard.pieces, shard.chars = shard.pieces + len(batch), shard.chars + chars
        progress.update(chars, len(ids))
        if shard.chars >= shard_chars:
            _publish(staging, shard, in_doc)
            shard = None
    if shard is not None:
        _publish(staging, shard, in_doc)


def _publish(staging: Staging, shard: _Shard, in_doc: bool) -> None:
    shard.file.close()
    record = {"tokens": shard.tokens, "documents": shard.documents, "pieces": shard.pieces, "chars": shard.chars}
    staging.publish(shard.tmp, {**record, "in_doc": in_doc})


def assemble(staging: Staging, out_dir: Path, dtype: np.dtype, val_fraction: float, chunk_tokens: int) -> dict:
    """The staged shards, in order, into out_dir/{train,val}.bin by the chunk rule; returns the token counts."""
    with open(out_dir / "train.bin", "wb") as train_f, open(out_dir / "val.bin", "wb") as val_f:
        packer = _Packer({"train": train_f, "val": val_f}, dtype, val_fraction, chunk_tokens)
        for ids in staging.blocks(dtype, COPY_TOKENS):
            packer.add(ids)
        return packer.finish()


def cache_key(**parts: object) -> str:
    """sha256 of the parts (JSON, sorted keys): the name of a cache entry."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on lock_path: two preparations of one entry (two runs, two DDP ranks) take turns."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; rank 0 still prepares before the others (see prepare_data)
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------------------------
# Cache entries: published atomically, read back as memmaps
# ----------------------------------------------------------------------------------------------------------------------
def _memmap(path: Path, dtype: str, length: int) -> np.ndarray:
    if length == 0:  # np.memmap refuses empty files
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(length,))


def load_token_cache(entry: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train, val, meta) of a cache entry written by prepare_tokens; the arrays are read-only memmaps."""
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


def prepare_tokens(
    source: Source,
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | Path,
    *,
    val_fraction: float = 0.05,
    chunk_tokens: int = 4096,
    shard_chars: int = SHARD_CHARS,
    progress: bool = False,
) -> TokenCache:
    """Tokenize `source` once (resuming a killed run's shards); later calls with the same inputs reuse the arrays."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token, which separates documents in the packed stream")
    tok_key = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode()).hexdigest()
    split = {"val_fraction": val_fraction, "chunk_tokens": chunk_tokens}
    key = cache_key(data=source.fingerprint(), tokenizer=tok_key, format=CACHE_FORMAT, **split)
    entry = Path(cache_dir) / f"tokens-{key[:20]}"
    hit = (entry / "meta.json").is_file()
    if not hit:
        with exclusive(Path(cache_dir) / "locks" / f"tokens-{key[:20]}"):
            if not (entry / "meta.json").is_file():
                _build_entry(source, tokenizer, entry, key, split, shard_chars, progress)
    train, val, meta = load_token_cache(entry)
    return TokenCache(train, val, meta, entry, hit)


def _build_entry(source, tokenizer, entry: Path, key: str, split: dict, shard_chars: int, progress: bool) -> None:
    dtype = token_dtype(len(tokenizer))
    staging = Staging(entry.with_name(entry.name + ".staging"), key)
    staging.keep_complete(dtype.itemsize)
    bar = Progress(source.size_chars(), sum(s["chars"] for s in staging.shards), progress)
    try:
        encode_shards(source, tokenizer, staging, shard_chars=shard_chars, progress=bar)
    finally:
        bar.close()
    documents = sum(s["documents"] for s in staging.shards)
    if documents == 0:
        shutil.rmtree(staging.path, ignore_errors=True)
        raise ConfigError(f"data source {source}: empty, no document has any non-whitespace text")

    def build(tmp: Path) -> None:
        counts = assemble(staging, tmp, dtype, **split)
        meta = {"format": CACHE_FORMAT, "dtype": dtype.name, "vocab_size": len(tokenizer), **split}
        meta.update(eos_token_id=tokenizer.eos_token_id, documents=documents, shards=len(staging.shards))
        meta.update(train_tokens=counts["train"], val_tokens=counts["val"], key=key, source=str(source))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the entry complete

    atomic_build(entry, build)
    shutil.rmtree(staging.path, ignore_errors=True)
