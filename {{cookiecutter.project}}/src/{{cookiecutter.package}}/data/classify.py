"""Text classification data: CSV or JSONL rows with a text and a label -> token ids + class ids.

- Files: ``.csv`` / ``.tsv`` (header row required) or ``.jsonl`` / ``.json`` (one object per line). The columns are
  ``data.text_key`` and ``data.label_key`` (default ``text`` / ``label``); labels are read as strings.
- The label set is inferred from the training rows, sorted, and saved as ``label_map.json``
  (``{"labels": [...]}``, the index is the class id); a label seen only at evaluation is an error, because the
  classifier head has no output for it.
- The builtin data set (``data/builtin/classify.jsonl``: Shakespeare passages labelled comedy / tragedy / history)
  carries a ``split`` column that is used as the train / validation split.
- Batches are right-padded (``attention_mask`` 0 on padding). HF sequence classifiers pool the last non-padding
  token, found from ``config.pad_token_id``, which therefore must be set (finetune.py does it).
"""

from __future__ import annotations

import csv
import functools
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError
from .jsonl import iter_jsonl
from .sft import holdout

LABEL_MAP_FILE = "label_map.json"


def load_rows(path: str | Path, text_key: str = "text", label_key: str = "label") -> list[dict[str, Any]]:
    """All rows of a CSV/TSV/JSONL file as dicts; checks the two columns exist and the file is not empty."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            rows = [(lineno, row) for lineno, row in enumerate(reader, start=2)]
            columns = list(reader.fieldnames or [])
        if not columns:
            raise ConfigError(f"{path}: no examples (the file is empty)")
        missing = [k for k in (text_key, label_key) if k not in columns]
        if missing:
            raise ConfigError(
                f"{path}: missing column(s) {missing}; the header has {columns} (data.text_key/label_key)"
            )
    elif suffix in (".jsonl", ".json"):
        rows = list(iter_jsonl(path))
        for lineno, row in rows:
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in (text_key, label_key) if k not in row]
            if missing:
                raise ConfigError(
                    f"{path}:{lineno}: missing key(s) {missing}; found {sorted(row)} (see data.text_key/label_key)"
                )
    else:
        raise ConfigError(f"{path}: unsupported file type {suffix!r} (expected .csv, .tsv, .jsonl or .json)")
    if not rows:
        raise ConfigError(f"{path}: no examples (the file is empty)")
    out = []
    for lineno, row in rows:
        text, label = row[text_key], row[label_key]
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{path}:{lineno}: {text_key!r} must be a non-empty string")
        if label is None or str(label).strip() == "":
            raise ConfigError(f"{path}:{lineno}: {label_key!r} is empty")
        out.append({**row, text_key: text, label_key: str(label).strip()})
    return out


class LabelMap:
    """Label name <-> class id; the order is sorted label names so that it does not depend on the file order."""

    def __init__(self, labels: Sequence[str]):
        if len(labels) < 2:
            raise ConfigError(f"classification needs at least 2 distinct labels, found {list(labels)}")
        if len(set(labels)) != len(labels):
            raise ConfigError(f"duplicate labels in {list(labels)}")
        self.labels = list(labels)
        self.index = {label: i for i, label in enumerate(self.labels)}

    @classmethod
    def infer(cls, labels: Sequence[str]) -> LabelMap:
        return cls(sorted(set(labels)))

    def __len__(self) -> int:
        return len(self.labels)

    def encode(self, label: str, where: str = "data") -> int:
        if label not in self.index:
            raise ConfigError(f"{where}: unknown label {label!r} (the training labels are {self.labels})")
        return self.index[label]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return dict(self.index)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / LABEL_MAP_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"labels": self.labels}, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path) -> LabelMap:
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / LABEL_MAP_FILE
        return cls(json.loads(path.read_text(encoding="utf-8"))["labels"])


def encode_rows(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    label_map: LabelMap,
    max_len: int,
    *,
    text_key: str = "text",
    label_key: str = "label",
    source: str = "data",
) -> list[dict[str, Any]]:
    """{"input_ids": list[int] (truncated to max_len), "label": int} per row; unknown labels are an error."""
    if not rows:
        raise ConfigError(f"{source}: no examples")
    examples = []
    for i, row in enumerate(rows):
        label = label_map.encode(row[label_key], where=f"{source} row {i + 1}")
        examples.append({**encode_text(row[text_key], tokenizer, max_len), "label": label})
    return examples


def encode_text(text: str, tokenizer: Any, max_len: int) -> dict[str, list[int]]:
    """{"input_ids": ...} of one text, truncated to ``max_len``: how training and ``predict`` turn a text into ids."""
    return {"input_ids": tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"]}


def class_weights(examples: Sequence[dict[str, Any]], num_classes: int) -> Tensor:
    """Inverse-frequency weights N / (K * n_c) (sklearn's "balanced"): 1.0 everywhere for a balanced set."""
    counts = Counter(e["label"] for e in examples)
    n = len(examples)
    return torch.tensor([n / (num_classes * counts[c]) if counts[c] else 0.0 for c in range(num_classes)])


def classify_batch(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Right padding: input_ids / attention_mask [B, T] and labels [B] (class ids; only when the examples have
    them: new texts to classify have none)."""
    T = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), T), dtype=torch.long)
    for b, e in enumerate(examples):
        input_ids[b, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        attention_mask[b, : len(e["input_ids"])] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    return batch


def classify_collate(pad_id: int):
    """:func:`classify_batch` with the pad id bound; a partial (not a closure) so DataLoader workers can unpickle it."""
    return functools.partial(classify_batch, pad_id=pad_id)


def split_rows(
    rows: Sequence[dict[str, Any]], val_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Use a ``split`` column (train/val) when every row has one, else hold out a seeded random ``val_fraction``."""
    if rows and all(str(r.get("split", "")) in ("train", "val", "validation") for r in rows):
        train = [r for r in rows if r["split"] == "train"]
        val = [r for r in rows if r["split"] != "train"]
        if train:
            return train, val
    return holdout(rows, val_fraction, seed)


# ----------------------------------------------------------------------------------------------------------------------
# Texts as files (what ``predict`` reads, one text per file)
# ----------------------------------------------------------------------------------------------------------------------
TEXT_SUFFIXES = (".txt",)


def read_text_file(path: str | Path) -> str:
    """A file's whole content as one text, its final line break dropped (editors add one; training texts have none).
    Unreadable, non-UTF-8 or empty files are a ConfigError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: unreadable text file ({' '.join(str(err).split())})") from err
    if not text.strip():
        raise ConfigError(f"{path}: empty text file")
    return text


def write_texts(
    rows: Sequence[dict[str, Any]], out_dir: str | Path, text_key: str = "text", label_key: str = "label"
) -> list[Path]:
    """Each row's text as ``out_dir/<label>/<n>.txt`` (the label is the folder: the files can be scored)."""
    paths = []
    for i, row in enumerate(rows):
        path = Path(out_dir) / str(row[label_key]) / f"{i:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(row[text_key] + "\n", encoding="utf-8")  # ends in a line break; read_text_file drops it
        paths.append(path)
    return paths
