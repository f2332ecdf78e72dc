"""Byte-level BPE tokenizer (GPT-2 style) trained with HF `tokenizers`, saved as a standard HF tokenizer directory.

Special tokens (always the first ids, in this order):

    0 <|endoftext|>  eos and bos: separates documents in the packed pretraining stream; generation stops on it
    1 <|pad|>        padding only (its loss is masked), never inside real text
    2 <|im_start|>   chat: starts a message, followed by the role and a newline (ChatML, as SmolLM2/Qwen use)
    3 <|im_end|>     chat: ends a message; stop token for chat generation

Byte-level means every string round-trips (`decode(encode(s)) == s`) with no unknown token: the 256 byte symbols are
in the vocabulary before any merge, so the vocabulary must hold at least 256 + 4 tokens.

The chat template renders
    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n
and marks the assistant part with a `generation` block, so
`apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True)` gives the mask of tokens to train on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)
BYTE_ALPHABET_SIZE = len(pre_tokenizers.ByteLevel.alphabet())  # 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
MODEL_MAX_LENGTH = 1 << 30  # the model, not the tokenizer, limits the length; this silences "sequence too long"


def _jinja_statement(body: str) -> str:
    # The project template is itself rendered by Jinja, so its files may not contain Jinja delimiters: build them.
    return "{" + "%" + " " + body + " " + "%" + "}"


def _jinja_expression(body: str) -> str:
    return "{" + "{" + " " + body + " " + "}" + "}"


def chatml_template() -> str:
    """ChatML with the assistant turns wrapped in a `generation` block (for return_assistant_tokens_mask)."""
    s, e = _jinja_statement, _jinja_expression
    return (
        s("for message in messages")
        + e(f"'{IM_START}' + message['role'] + '\\n'")
        + s("if message['role'] == 'assistant'")
        + s("generation")
        + e(f"message['content'] + '{IM_END}'")
        + s("endgeneration")
        + s("else")
        + e(f"message['content'] + '{IM_END}'")
        + s("endif")
        + e("'\\n'")
        + s("endfor")
        + s("if add_generation_prompt")
        + e(f"'{IM_START}assistant\\n'")
        + s("endif")
    )


CHAT_TEMPLATE = chatml_template()


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None, *, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; save it to `out_dir` (tokenizer.json + tokenizer_config.json + template).

    The result can be smaller than `vocab_size` when the texts run out of pairs seen `min_frequency` times: size the
    model's embedding with `len(tokenizer)`.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
            f"({BYTE_ALPHABET_SIZE} byte symbols + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: " the" and "the" stay different tokens, and decode(encode(s)) == s exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..3, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes even if unseen: no <unk> ever
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    hf = _wrap(tok)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(out_dir))
    return hf


def load_tokenizer(path_or_id: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a saved directory, a bare tokenizer.json, or a hub id / local model directory.

    A bare tokenizer.json (e.g. written by `tokenizers` directly) gets this module's special tokens and chat
    template. Any tokenizer without a pad token gets pad = eos so that batches can be padded.
    """
    path = Path(path_or_id)
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"{path}: expected a tokenizer.json file or a tokenizer directory")
        tokenizer: PreTrainedTokenizerBase = _wrap(Tokenizer.from_file(str(path)))
    elif path.is_dir() or not looks_like_hub_id(str(path_or_id)):
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer not found: {path} (no such file or directory)")
        if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            raise FileNotFoundError(f"{path} has no tokenizer.json / tokenizer_config.json")
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path_or_id), trust_remote_code=trust_remote_code)
        except OSError as err:
            raise OSError(
                f"could not load tokenizer {path_or_id!r}: not a local path, and the hub is unreachable or has no such "
                f"model ({err.__class__.__name__}). Pass a local directory or tokenizer.json."
            ) from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# A Hugging Face Hub repo id: "name" (the legacy canonical repos such as gpt2 or bert-base-uncased still resolve) or
# "org/name"; each part letters, digits, "-", "_", "." (not leading or trailing "-" or ".", no "--" or ".."), <= 96.
_HUB_PART = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?")


def looks_like_hub_id(name: str) -> bool:
    """True for "name" or "org/name" shaped like a Hub repo id: what to fetch when no local path of that name
    exists. One rule for tokenizers and models (lora.resolve_model_path), so both treat ``gpt2`` the same."""
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(_HUB_PART.fullmatch(part) for part in parts)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A string that changes whenever the token ids of some text could change (for cache keys)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: fall back to its vocabulary
        return repr(sorted(tokenizer.get_vocab().items())) + repr(tokenizer.eos_token_id)
    return backend.to_str() + repr(tokenizer.eos_token_id)
