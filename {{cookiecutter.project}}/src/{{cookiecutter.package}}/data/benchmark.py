"""The offline benchmark: lm-evaluation-harness tasks built from the shipped data, so ``evaluate`` runs with no network.

Documents: the validation passages of the builtin classification set (``classify.jsonl``, ``split`` = ``val``: no
classifier trains on them) that appear in no SFT record either, each with its play and genre. The questions are the
SFT set's own (``builtin.PLAY_QUESTION``, ``builtin.GENRE_QUESTION``), so an SFT model is asked what it was taught,
about passages it was not taught on. The demo pre-trains on all nine plays, these passages included: against the
pre-trained model they are not held out, and on the tiny demo models every score is a check of the plumbing, not of
the models.

- ``shakespeare_play``: multiple choice, which of the nine plays (chance 1/9); ``acc`` and ``acc_norm`` (the choice's
  log-likelihood per byte).
- ``shakespeare_genre``: multiple choice among the three SFT answers "It is from a comedy." ... (chance 1/3).
- ``shakespeare_ppl``: the passages' own log-likelihood (``loglikelihood_rolling``): word and byte perplexity, bits
  per byte, comparable across tokenizers.
- :func:`file_perplexity_task`: the same on the paragraphs of any text file (the plain held-out baseline).

Each task is an lm_eval task config (a dict :class:`lm_eval.api.task.ConfigurableTask` takes) whose
``custom_dataset`` builds the documents; nothing here imports lm_eval.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .builtin import BUILTIN_CLASSIFY, BUILTIN_SFT, GENRE_QUESTION, GENRES, PLAY_QUESTION, PLAYS, genre_answer
from .jsonl import iter_jsonl
from .sft import to_messages

VERSION = 1  # bump when the documents or the prompts change: scores of different versions do not compare
TARGET_DELIMITER = "\n\n"  # between a plain prompt and its answer (with a chat template lm_eval puts none)


def heldout_passages() -> list[dict[str, str]]:
    """{"text", "play", "genre"} of every validation passage of classify.jsonl that no SFT record contains."""
    records = [record for _, record in iter_jsonl(BUILTIN_SFT)]
    sft = "\n".join(m["content"] for record in records for m in to_messages(record, str(BUILTIN_SFT)))
    rows = [row for _, row in iter_jsonl(BUILTIN_CLASSIFY) if row["split"] == "val"]
    return [{"text": r["text"], "play": r["play"], "genre": r["label"]} for r in rows if r["text"] not in sft]


def play_docs(**_: Any) -> Any:
    titles = [play.title for play in PLAYS]
    docs = [{"prompt": f"{PLAY_QUESTION}\n\n{p['text']}", "choices": titles, "gold": titles.index(p["play"])}
            for p in heldout_passages()]  # fmt: skip
    return _test_split(docs)


def genre_docs(**_: Any) -> Any:
    answers = [genre_answer(genre) for genre in GENRES]
    docs = [{"prompt": f"{GENRE_QUESTION}\n\n{p['text']}", "choices": answers, "gold": GENRES.index(p["genre"])}
            for p in heldout_passages()]  # fmt: skip
    return _test_split(docs)


def passage_docs(**_: Any) -> Any:
    return _test_split([{"text": p["text"]} for p in heldout_passages()])


def file_docs(path: str, **_: Any) -> Any:
    """The paragraphs (separated by blank lines) of a UTF-8 text file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: unreadable text file ({' '.join(str(err).split())})") from err
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not paragraphs:
        raise ConfigError(f"{path}: no text to measure")
    return _test_split([{"text": p} for p in paragraphs])


def _test_split(docs: list[dict]) -> Any:
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


# lm_eval takes functions of the document where its YAML tasks take Jinja templates.
def _prompt(doc: dict) -> str:
    return doc["prompt"]


def _choices(doc: dict) -> list[str]:
    return doc["choices"]


def _gold(doc: dict) -> int:
    return doc["gold"]


def _text(doc: dict) -> str:
    return doc["text"]


def _empty(doc: dict) -> str:
    return ""


def task_config(name: str, docs: Any, output_type: str, metrics: list[dict], **formatting: Any) -> dict[str, Any]:
    """An lm_eval task config whose documents ``docs(**kwargs)`` builds (its test split)."""
    config = {"task": name, "custom_dataset": docs, "test_split": "test", "output_type": output_type}
    metadata = {"version": VERSION}
    return {**config, **formatting, "metric_list": metrics, "metadata": metadata}


def multiple_choice_task(name: str, docs: Any) -> dict[str, Any]:
    metrics = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]
    return task_config(
        name, docs, "multiple_choice", metrics,
        doc_to_text=_prompt, doc_to_choice=_choices, doc_to_target=_gold, target_delimiter=TARGET_DELIMITER,
    )  # fmt: skip


def perplexity_task(name: str, docs: Any) -> dict[str, Any]:
    metrics = [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]
    return task_config(name, docs, "loglikelihood_rolling", metrics, doc_to_text=_empty, doc_to_target=_text)


def file_perplexity_task(path: str | Path) -> dict[str, Any]:
    """``file_ppl``: perplexity on the paragraphs of ``path``."""
    return perplexity_task("file_ppl", functools.partial(file_docs, str(path)))


OFFLINE_TASKS = {
    "shakespeare_play": lambda: multiple_choice_task("shakespeare_play", play_docs),
    "shakespeare_genre": lambda: multiple_choice_task("shakespeare_genre", genre_docs),
    "shakespeare_ppl": lambda: perplexity_task("shakespeare_ppl", passage_docs),
}
