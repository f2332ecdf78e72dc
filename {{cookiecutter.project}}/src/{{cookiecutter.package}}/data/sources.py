"""Where pretraining text comes from: ``data.source`` -> a :class:`Source` -> a stream of text pieces.

    None / "builtin"        the built-in Shakespeare, one document per play
    a file, folder or glob  every file read by its format (magic bytes first, then the suffix): text (.txt .md ...,
                            one document per file, read in bounded pieces), JSONL (one document per record),
                            parquet and Arrow (one document per row of the `text_key` column, read batch by batch)
    a saved datasets folder what ``datasets.Dataset.save_to_disk`` wrote (a DatasetDict: its ``data.split``)
    a hub dataset id        ``datasets.load_dataset(id, data.subset, split=data.split, streaming=data.streaming)``

A source yields ``(text, end)`` pieces: ``end`` marks the last piece of a document (the packer puts EOS there), so
a 10 GB text file streams through in pieces of at most PIECE_CHARS characters and memory never holds a document.
Parquet, Arrow, saved datasets and hub data need the optional ``datasets`` package (the ``data`` extra).

:meth:`Source.fingerprint` is what cache keys hash: local files by path, size, modification time and their first and
last 64 KiB (never every byte), hub data by the resolved revision or the dataset's own fingerprint.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError
from . import builtin
from .jsonl import iter_jsonl
from .tokenizer import looks_like_hub_id

DEFAULT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl", ".parquet", ".arrow")
PIECE_CHARS = 1 << 20  # a text file is read in pieces of about this many characters, cut after a line break
ROW_BATCH = 1024  # rows read at a time from parquet / Arrow / datasets
SAMPLE_BYTES = 1 << 16  # head and tail bytes of every local file that go into the fingerprint
DATA_EXTRA = 'needs the `datasets` package (and pyarrow with it): pip install -e ".[data]"'
_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages"}
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_MAGIC = {b"PAR1": "parquet", b"ARROW1": "arrow", b"\xff\xff\xff\xff": "arrow"}  # Arrow: IPC file, IPC stream
_MAGIC.update({b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip"})

Piece = tuple[str, bool]  # (text, this piece ends its document)


def require_datasets(what: str) -> Any:
    """``import datasets``, or one line naming the extra."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{what} {DATA_EXTRA}") from None
    return datasets


# ----------------------------------------------------------------------------------------------------------------------
# Files by format
# ----------------------------------------------------------------------------------------------------------------------
def file_format(path: Path) -> str:
    """ "text" | "jsonl" | "parquet" | "arrow", from the magic bytes first and then the suffix; anything else that
    is not UTF-8 text (NUL bytes or invalid UTF-8 in the first 64 KiB) is refused with one line."""
    with open(path, "rb") as f:
        head = f.read(SAMPLE_BYTES)
    kind = next((k for magic, k in _MAGIC.items() if head.startswith(magic)), None)
    if kind in ("gzip", "zip"):
        raise ConfigError(f"{path}: a {kind} archive; decompress it first (text, JSONL, parquet or Arrow files)")
    if kind is None and path.suffix.lower() in (".parquet", ".arrow"):
        raise ConfigError(f"{path}: named {path.suffix} but not a {path.suffix[1:]} file (wrong magic bytes)")
    if kind is not None:
        return kind
    try:
        if b"\0" in head:
            raise UnicodeDecodeError("utf-8", head, head.index(b"\0"), head.index(b"\0") + 1, "NUL byte")
        head.decode("utf-8", errors="strict") if len(head) < SAMPLE_BYTES else _decode_prefix(head)
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: binary, not UTF-8 text ({err.reason} at byte {err.start}); give text, JSONL, parquet or Arrow"
        ) from None
    return "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "text"


def _decode_prefix(head: bytes) -> None:
    # A block cut mid-character is fine: drop up to 3 bytes of a trailing multi-byte sequence before decoding.
    for cut in range(4):
        try:
            head[: len(head) - cut].decode("utf-8")
            return
        except UnicodeDecodeError as err:
            if err.start < len(head) - 4 or cut == 3:
                raise


def text_pieces(path: Path) -> Iterator[Piece]:
    """One document per file, in pieces of about PIECE_CHARS cut after a line break (bounded memory)."""
    # errors="replace": one bad byte deep inside a checked file should not stop a corpus of thousands of files.
    with open(path, encoding="utf-8", errors="replace") as f:
        carry = ""
        while block := f.read(PIECE_CHARS):
            block = carry + block
            cut = block.rfind("\n") + 1 or len(block)
            piece, carry = block[:cut], block[cut:]
            if piece:
                yield piece, False
        yield carry, True  # the document's last piece (maybe empty: it still carries the end)


def jsonl_texts(path: str | Path, text_key: str = "text") -> Iterator[str]:
    """The ``text_key`` string of every record of a JSONL file, streamed."""
    for lineno, record in iter_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ConfigError(f"{path}:{lineno}: no string field {text_key!r} (data.text_key); the record has {keys}")
        yield record[text_key]


def _column_texts(batches: Iterator[Any], text_key: str) -> Iterator[str]:
    for batch in batches:
        yield from (t for t in batch.column(text_key).to_pylist() if t is not None)


def _check_column(path: Path, names: Sequence[str], text_key: str) -> None:
    if text_key not in names:
        raise ConfigError(f"{path}: no column {text_key!r} (data.text_key); the columns are {list(names)}")


def table_texts(path: Path, kind: str, text_key: str) -> Iterator[str]:
    """The `text_key` column of a parquet or Arrow (IPC file or stream) file, ROW_BATCH rows at a time; a damaged
    file is one line naming it."""
    require_datasets(f"reading {path.name}")
    import pyarrow as pa

    try:
        yield from (_parquet_texts if kind == "parquet" else _arrow_texts)(path, text_key)
    except (pa.ArrowException, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{path}: not a readable {kind} file ({reason})") from None


def _parquet_texts(path: Path, text_key: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    _check_column(path, pf.schema_arrow.names, text_key)
    yield from _column_texts(pf.iter_batches(batch_size=ROW_BATCH, columns=[text_key]), text_key)


def _arrow_texts(path: Path, text_key: str) -> Iterator[str]:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        is_file = source.read(6) == b"ARROW1"
        source.seek(0)
        reader = pa.ipc.open_file(source) if is_file else pa.ipc.open_stream(source)
        _check_column(path, reader.schema.names, text_key)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if is_file else iter(reader)
        yield from _column_texts(batches, text_key)


def file_pieces(path: Path, text_key: str) -> Iterator[Piece]:
    kind = file_format(path)
    if kind == "text":
        yield from text_pieces(path)
        return
    texts = jsonl_texts(path, text_key) if kind == "jsonl" else table_texts(path, kind, text_key)
    for text in texts:
        yield text, True


# ----------------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """What ``data.source`` stands for. kind: "builtin" | "files" | "saved" (save_to_disk folder) | "hub"."""

    kind: str
    spec: str
    files: tuple[Path, ...] = ()
    text_key: str = "text"
    subset: str | None = None
    split: str = "train"
    streaming: bool = False
    revision: str | None = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __str__(self) -> str:
        if self.kind == "hub":
            return f"hub dataset {self.spec}" + (f" ({self.subset})" if self.subset else "") + f" [{self.split}]"
        return "the built-in Shakespeare corpus" if self.kind == "builtin" else self.spec

    def pieces(self) -> Iterator[Piece]:
        """The (text, end) stream, the same on every call."""
        if self.kind == "builtin":
            for play in builtin.split_plays(builtin.read_corpus_text()):
                yield play.text, True
        elif self.kind == "files":
            for file in self.files:
                yield from file_pieces(file, self.text_key)
        else:
            for text in dataset_texts(self.dataset(), self.text_key, str(self)):
                yield text, True

    def documents(self) -> Iterator[str]:
        """Whole documents (joins a text file's pieces: for small corpora and tests)."""
        parts: list[str] = []
        for text, end in self.pieces():
            parts.append(text)
            if end:
                yield "".join(parts)
                parts = []

    def dataset(self) -> Any:
        """The `datasets` Dataset / IterableDataset of a saved folder or hub id (loaded once)."""
        if "dataset" not in self._cache:
            load = load_saved if self.kind == "saved" else load_hub
            self._cache["dataset"] = load(self)
        return self._cache["dataset"]

    def fingerprint(self) -> dict:
        """What identifies the data for cache keys, without reading it all."""
        if self.kind == "hub":
            return {"hub": self.spec, "subset": self.subset, "split": self.split, "version": hub_version(self)}
        return {"files": [file_fingerprint(f) for f in self.files], "text_key": self.text_key, "split": self.split}

    def size_chars(self) -> int | None:
        """About how many characters of text the source holds (the progress bar's total); None = unknown."""
        if self.kind == "hub":
            info = getattr(self.dataset(), "info", None)
            split = (info.splits or {}).get(self.split) if info is not None and info.splits else None
            return getattr(split, "num_bytes", None) or None
        return sum(file_chars(f, self.text_key) for f in self.files)


def file_chars(path: Path, text_key: str) -> int:
    """About how many characters of text a file holds: its size, or for parquet (compressed) the uncompressed size
    of its text column from the file's metadata."""
    if path.suffix.lower() != ".parquet":
        return path.stat().st_size
    require_datasets(f"reading {path.name}")
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path)
    if meta.num_row_groups == 0:
        return 0
    names = [meta.row_group(0).column(i).path_in_schema for i in range(meta.num_columns)]
    if text_key not in names:
        return path.stat().st_size
    column = names.index(text_key)
    return sum(meta.row_group(g).column(column).total_uncompressed_size for g in range(meta.num_row_groups))


def file_fingerprint(path: Path) -> list:
    """[path, size, mtime_ns, sha256 of the first and last SAMPLE_BYTES]: changes when the file does."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        f.seek(max(0, st.st_size - SAMPLE_BYTES))
        h.update(f.read(SAMPLE_BYTES))
    return [str(path.resolve()), st.st_size, st.st_mtime_ns, h.hexdigest()[:16]]


def _walk(root: Path, suffixes: Sequence[str]) -> list[Path]:
    wanted = {s.lower() for s in suffixes}
    files = []
    for top, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
        files += [Path(top) / n for n in sorted(names) if Path(n).suffix.lower() in wanted and not n.startswith(".")]
    if not files:
        raise ConfigError(f"no files with suffixes {', '.join(sorted(wanted))} under {root}")
    return files


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in DEFAULT_SUFFIXES + (".json", ".gz")


def resolve_source(
    spec: str | Path | None,
    *,
    text_key: str = "text",
    subset: str | None = None,
    split: str = "train",
    streaming: bool = False,
    revision: str | None = None,
    suffixes: Sequence[str] = DEFAULT_SUFFIXES,
) -> Source:
    """``data.source`` -> a Source; a missing path, a glob that matches nothing or an empty folder is one line."""
    opts = {"text_key": text_key, "subset": subset, "split": split, "streaming": streaming, "revision": revision}
    if spec is None or str(spec) == "builtin":
        return Source("builtin", "builtin", (builtin.BUILTIN_CORPUS,), **opts)
    spec = str(spec)
    path = Path(spec).expanduser()
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise ConfigError(f"data source {spec}: no file matches this pattern")
        return Source("files", spec, tuple(files), **opts)
    if path.is_file():
        return Source("files", spec, (path,), **opts)
    if path.is_dir():
        if any((path / marker).is_file() for marker in _SAVED_MARKERS):
            saved = tuple(sorted(p for p in path.rglob("*") if p.is_file()))
            return Source("saved", spec, saved, **opts)
        return Source("files", spec, tuple(_walk(path, suffixes)), **opts)
    if looks_like_hub_id(spec) and not _looks_like_path(spec):
        return Source("hub", spec, (), **opts)
    raise ConfigError(f"data source not found: {spec} (not a file, folder, glob or hub dataset id)")


# ----------------------------------------------------------------------------------------------------------------------
# `datasets`: saved folders and the hub
# ----------------------------------------------------------------------------------------------------------------------
def load_saved(source: Source) -> Any:
    datasets = require_datasets(f"reading the saved dataset {source.spec}")
    ds = datasets.load_from_disk(source.spec)
    if isinstance(ds, datasets.DatasetDict):
        if source.split not in ds:
            raise ConfigError(f"{source.spec}: no split {source.split!r} (data.split); it has {sorted(ds)}")
        ds = ds[source.split]
    return ds


def offline_hint(name: str, subset: str | None) -> str:
    subset_arg = f", {subset!r}" if subset else ""
    return (
        f"download it where there is a network: `hf download {name} --repo-type dataset --local-dir DIR` "
        f"(or `--include` a subset's files) and set --data.source DIR, or "
        f"datasets.load_dataset({name!r}{subset_arg}).save_to_disk(DIR) and --data.source DIR"
    )


def load_hub(source: Source) -> Any:
    datasets = require_datasets(f"reading the hub dataset {source.spec}")
    try:
        return datasets.load_dataset(
            source.spec, source.subset, split=source.split, streaming=source.streaming, revision=source.revision
        )
    except (ConnectionError, OSError) as err:  # offline (HF_HUB_OFFLINE or no network), or no such dataset
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ConfigError(f"{source}: cannot load it ({reason}); {offline_hint(source.spec, source.subset)}") from None


def hub_version(source: Source) -> str:
    """The data's identity without reading it: a loaded dataset's fingerprint (its cached files), or for a stream
    the hub revision it resolved to."""
    if source.revision and len(source.revision) == 40:  # a commit sha pins the data already
        return source.revision
    ds = source.dataset()
    fingerprint = getattr(ds, "_fingerprint", None)
    if fingerprint and not source.streaming:
        return str(fingerprint)
    from huggingface_hub import HfApi

    try:
        return str(HfApi().dataset_info(source.spec, revision=source.revision).sha)
    except Exception as err:  # any hub failure means the same here: no revision to key the cache on
        raise ConfigError(
            f"{source}: cannot resolve its revision ({type(err).__name__}); pin --data.revision"
        ) from None


def dataset_texts(ds: Any, text_key: str, where: str) -> Iterator[str]:
    names = ds.column_names
    if names is not None and text_key not in names:
        raise ConfigError(f"{where}: no column {text_key!r} (data.text_key); the columns are {list(names)}")
    for batch in ds.select_columns([text_key]).iter(batch_size=ROW_BATCH):
        yield from (t for t in batch[text_key] if t is not None)
