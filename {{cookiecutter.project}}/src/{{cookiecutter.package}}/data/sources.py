"""Where pretraining documents come from: a data path -> the files it stands for -> documents (str).

One document = one file, or one record of a JSONL file; no path = the built-in Shakespeare corpus, one document per
play. :func:`corpus_files` names the files a path stands for (the token and tokenizer caches hash their bytes), and
:func:`iter_documents` streams the documents out of them (tokenizer training and packing read them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import builtin
from .jsonl import iter_jsonl

DEFAULT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl")
_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages"}


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


def corpus_files(path: str | Path | None, suffixes: Sequence[str] = DEFAULT_SUFFIXES) -> list[Path]:
    """The files behind a data path, None = the built-in corpus: what a cache key hashes."""
    return [builtin.BUILTIN_CORPUS] if path is None else source_files(path, suffixes)


def iter_documents(
    path: str | Path | None, *, suffixes: Sequence[str] = DEFAULT_SUFFIXES, text_key: str = "text"
) -> Iterator[str]:
    """Documents of a data path: None = the built-in Shakespeare corpus (one document per play)."""
    if path is None:
        for play in builtin.split_plays(builtin.read_corpus_text()):
            yield play.text
        return
    for file in source_files(path, suffixes):
        yield from jsonl_texts(file, text_key) if file.suffix.lower() == ".jsonl" else read_text_file(file)
