"""Supervised fine-tuning data: JSONL conversations -> token ids with the loss on the responses only.

Input: one JSON object per line, either ``{"prompt": ..., "response": ...}`` or a chat
``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``; the two may be mixed in one file.

Rendering. When the tokenizer has a chat template (ours: ChatML; most instruct models ship one) it is used. Otherwise
the documented plain template below is used::

    {system}\\n\\n                                   (only when there is a system message)
    ### Instruction:\\n{user}\\n\\n### Response:\\n     (prompt: loss masked)
    {assistant}{eos}                                 (response: trained; eos teaches the model to stop)
    \\n\\n                                             (between turns of a multi-turn conversation)

Masking. A conversation is rendered as alternating prompt / response *segments*: for assistant turn i the prompt
segment is everything the template adds up to and including the generation prompt (``messages[:i]`` rendered with
``add_generation_prompt=True``), the response segment is what rendering ``messages[:i+1]`` adds after that. Each
segment is tokenized on its own, so at generation time the prompt tokenizes to exactly the ids seen in training.
Prompt tokens get label -100 (no loss), response tokens their own id. ``labels`` are *unshifted* (HF convention:
the model shifts them), so the first token of every example is -100 too: nothing inside the example predicts it.

Batching. :func:`pad_batch` pads right (``attention_mask`` 0, labels -100). :func:`pack_examples` concatenates
examples into fixed windows: ``position_ids`` restart at 0 for every example and :func:`packed_batch` builds a
block-diagonal causal mask ``[B, 1, T, T]`` (True = attend), so packed examples never see each other; the logits
are identical to running each example alone (tests/test_sft.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError
from .jsonl import iter_jsonl

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
PLAIN_INSTRUCTION = "### Instruction:\n"
PLAIN_RESPONSE = "\n\n### Response:\n"
PLAIN_TURN_SEPARATOR = "\n\n"

Messages = list[dict[str, str]]


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------
def to_messages(record: Any, where: str) -> Messages:
    """Normalize one record to a message list; anything else is a ConfigError naming the line."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ConfigError(f"{where}: 'messages' must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ConfigError(f"{where}: every message needs 'role' in {list(ROLES)} and a string 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise ConfigError(f"{where}: the conversation has no assistant message to train on")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    missing = [k for k in ("prompt", "response") if not isinstance(record.get(k), str)]
    if missing:
        raise ConfigError(
            f"{where}: missing {' and '.join(repr(k) for k in missing)} "
            f"(each line needs 'prompt' + 'response' strings or a 'messages' list; found keys {sorted(record)})"
        )
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


def load_conversations(path: str | Path) -> list[Messages]:
    """All conversations of an SFT JSONL file (prompt/response lines become a user + assistant pair)."""
    rows = list(iter_jsonl(path))
    if not rows:
        raise ConfigError(f"{path}: no examples (the file is empty)")
    return [to_messages(obj, f"{path}:{lineno}") for lineno, obj in rows]


# ----------------------------------------------------------------------------------------------------------------------
# Rendering and tokenization
# ----------------------------------------------------------------------------------------------------------------------
def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render_chat(tokenizer: Any, messages: Messages, generation_prompt: bool) -> str:
    if not messages and not generation_prompt:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _plain_prompt(messages: Messages, start: int, end: int) -> str:
    """The plain template's text for the system/user turns messages[start:end], then the response header."""
    blocks = [m["content"] if m["role"] == "system" else PLAIN_INSTRUCTION + m["content"] for m in messages[start:end]]
    return PLAIN_TURN_SEPARATOR.join(blocks) + (PLAIN_RESPONSE if blocks else PLAIN_RESPONSE.lstrip("\n"))


def render_segments(messages: Messages, tokenizer: Any) -> list[tuple[str, bool]]:
    """(text, trained) segments of a conversation, up to and including its last assistant turn."""
    segments: list[tuple[str, bool]] = []
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if has_chat_template(tokenizer):
        done = ""  # the rendered text covered by the segments so far
        for i in assistant_turns:
            prompt = _render_chat(tokenizer, messages[:i], generation_prompt=True)
            full = _render_chat(tokenizer, messages[: i + 1], generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ConfigError(
                    "the tokenizer's chat template renders earlier turns differently once later turns are added, so "
                    "the response tokens cannot be located; use prompt/response records or another template"
                )
            segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        return segments
    eos = getattr(tokenizer, "eos_token", None) or ""
    start = 0
    for i in assistant_turns:
        prompt = _plain_prompt(messages, start, i)
        if segments:
            prompt = PLAIN_TURN_SEPARATOR + prompt
        segments += [(prompt, False), (messages[i]["content"] + eos, True)]
        start = i + 1
    return segments


def prompt_ids(prompt: str | Messages, tokenizer: Any) -> list[int]:
    """Token ids to feed the model at inference: exactly the ids SFT trained on up to the next response.

    ``prompt`` is a user message or a whole conversation (earlier assistant turns included).
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    # Render as if an (empty) assistant reply followed, and keep everything before that reply.
    segments = render_segments([*messages, {"role": "assistant", "content": ""}], tokenizer)[:-1]
    return _tokenize_segments(segments, tokenizer)[0]


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end a response: eos, plus the template's end-of-turn token (ChatML ``<|im_end|>``, Llama-3
    ``<|eot_id|>``, ...), found by rendering a one-word reply and taking the special token right after it."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    reply = "ok"
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
    response = tokenizer(render_segments(conversation, tokenizer)[-1][0], add_special_tokens=False)["input_ids"]
    content = tokenizer(reply, add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    if response[: len(content)] == content and len(response) > len(content) and response[len(content)] in special:
        ids.append(response[len(content)])
    return sorted(set(ids))


def _tokenize_segments(segments: list[tuple[str, bool]], tokenizer: Any) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    for k, (text, trained) in enumerate(segments):
        # The plain template lets the tokenizer add its BOS once; a chat template writes its own special tokens.
        add_special = k == 0 and not has_chat_template(tokenizer)
        ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def encode_conversation(messages: Messages, tokenizer: Any, max_len: int) -> dict[str, list[int]] | None:
    """{"input_ids", "labels"} truncated to ``max_len``; None when no response token survives the truncation."""
    input_ids, labels = _tokenize_segments(render_segments(messages, tokenizer), tokenizer)
    input_ids, labels = input_ids[:max_len], labels[:max_len]
    if labels:
        labels[0] = IGNORE_INDEX  # no position inside the example predicts its first token
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def encode_conversations(
    conversations: Sequence[Messages], tokenizer: Any, max_len: int, *, source: str = "data"
) -> tuple[list[dict[str, list[int]]], int]:
    """Encode all; returns (examples, number dropped because the prompt filled the whole window)."""
    examples = [encode_conversation(m, tokenizer, max_len) for m in conversations]
    kept = [e for e in examples if e is not None]
    if not kept:
        raise ConfigError(
            f"{source}: no example has a response token within data.max_seq_len={max_len} (raise it or shorten prompts)"
        )
    return kept, len(examples) - len(kept)


# ----------------------------------------------------------------------------------------------------------------------
# Batching: padding and packing
# ----------------------------------------------------------------------------------------------------------------------
def pad_batch(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest example: input_ids / attention_mask / labels, each [B, T]."""
    T = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[b, :n] = torch.tensor(e["input_ids"])
        labels[b, :n] = torch.tensor(e["labels"])
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_examples(examples: Sequence[dict[str, list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Greedily concatenate examples (in order) into windows of at most ``max_len`` tokens.

    Each window keeps ``lengths`` (its examples' lengths) so :func:`packed_batch` can rebuild positions and masks.
    An example never straddles two windows.
    """
    windows: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "lengths": []}
    for e in examples:
        n = len(e["input_ids"])
        if current["lengths"] and len(current["input_ids"]) + n > max_len:
            windows.append(current)
            current = {"input_ids": [], "labels": [], "lengths": []}
        current["input_ids"] += e["input_ids"][:max_len]
        current["labels"] += e["labels"][:max_len]
        current["lengths"].append(min(n, max_len))
    if current["lengths"]:
        windows.append(current)
    return windows


def packed_batch(windows: Sequence[dict[str, list[int]]], pad_id: int, max_len: int) -> dict[str, Tensor]:
    """input_ids / labels / position_ids [B, T] and a block-diagonal causal attention_mask [B, 1, T, T] (bool)."""
    B, T = len(windows), max_len
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)  # which example each position belongs to; -1 = padding
    for b, w in enumerate(windows):
        n = len(w["input_ids"])
        input_ids[b, :n] = torch.tensor(w["input_ids"])
        labels[b, :n] = torch.tensor(w["labels"])
        start = 0
        for k, length in enumerate(w["lengths"]):
            position_ids[b, start : start + length] = torch.arange(length)
            segment[b, start : start + length] = k
            start += length
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # [T, T]
    same = segment[:, :, None] == segment[:, None, :]  # [B, T, T]
    mask = same & causal & (segment[:, :, None] >= 0)
    # Padding rows attend to themselves only: a row with nothing to attend to would make softmax produce NaN.
    mask |= torch.eye(T, dtype=torch.bool) & (segment[:, :, None] < 0)
    return {"input_ids": input_ids, "attention_mask": mask[:, None], "labels": labels, "position_ids": position_ids}


def sft_collate(pad_id: int, max_len: int, packing: bool) -> Callable[[list[Any]], dict[str, Tensor]]:
    """The collate function for examples (padding) or windows from :func:`pack_examples` (packing)."""
    # partials, not lambdas: picklable, so DataLoader workers also work under the spawn start method.
    if packing:
        return functools.partial(packed_batch, pad_id=pad_id, max_len=max_len)
    return functools.partial(pad_batch, pad_id=pad_id)


def holdout(rows: Sequence[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded random split; the validation part is empty when val_fraction is 0 or there are too few rows."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(len(rows) * val_fraction))
    n_val = min(n_val, len(rows) - 1)
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]
