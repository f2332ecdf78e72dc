"""Byte-level BPE: round-trip, special tokens, save/load, chat template, errors."""

import json

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from {{ cookiecutter.package }}.data.builtin import read_corpus_text
from {{ cookiecutter.package }}.data.tokenizer import (
    EOS_TOKEN,
    IM_END,
    IM_START,
    MIN_VOCAB_SIZE,
    PAD_TOKEN,
    load_tokenizer,
    train_tokenizer,
)

TEXTS = [read_corpus_text()[:60_000]]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=400, out_dir=out)
    return out


def test_round_trip_any_unicode(tok_dir):
    tok = load_tokenizer(tok_dir)
    for s in ["To be, or not to be: that is the question.", "  two  spaces\n\ttab", "Ünïcødé ✓ 漢字 🙂", ""]:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s
    # Merges were learned: even 140 merges compress English well below one token per byte.
    text = TEXTS[0][:5000]
    assert len(tok(text)["input_ids"]) < 0.75 * len(text.encode())


def test_special_tokens_and_ids(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert len(tok) == 400
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == (EOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert [tok.convert_tokens_to_ids(t) for t in (EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)] == [0, 1, 2, 3]
    # Special tokens are atomic, and plain encoding adds none (documents get EOS from the packer).
    assert tok(f"hi{EOS_TOKEN}")["input_ids"][-1] == 0
    assert 0 not in tok("hi there")["input_ids"]
    assert (tok_dir / "tokenizer.json").is_file() and (tok_dir / "tokenizer_config.json").is_file()


def test_load_bare_tokenizer_json_same_ids(tok_dir):
    bare = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), eos_token=EOS_TOKEN)
    ours = load_tokenizer(tok_dir / "tokenizer.json")
    text = "Now is the winter of our discontent"
    assert bare(text)["input_ids"] == ours(text)["input_ids"] == load_tokenizer(tok_dir)(text)["input_ids"]
    assert ours.pad_token == PAD_TOKEN and ours.chat_template


def test_chat_template_and_assistant_mask(tok_dir):
    tok = load_tokenizer(tok_dir)
    msgs = [{"role": "user", "content": "Who speaks?"}, {"role": "assistant", "content": "Macbeth."}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == f"{IM_START}user\nWho speaks?{IM_END}\n{IM_START}assistant\nMacbeth.{IM_END}\n"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"{IM_START}user\nWho speaks?{IM_END}\n{IM_START}assistant\n"
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tok.decode(trained) == f"Macbeth.{IM_END}"


def test_vocab_too_small_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=f"at least {MIN_VOCAB_SIZE}"):
        train_tokenizer(["abc"], vocab_size=MIN_VOCAB_SIZE - 1, out_dir=tmp_path)
    tok = train_tokenizer(["abc abc"], vocab_size=MIN_VOCAB_SIZE, out_dir=None)
    assert tok.decode(tok("zebra")["input_ids"]) == "zebra"  # all bytes present even if unseen


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="expected a tokenizer.json"):
        load_tokenizer(tmp_path / "x.txt")


def test_saved_config_is_plain_json(tok_dir):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == EOS_TOKEN and cfg["pad_token"] == PAD_TOKEN
