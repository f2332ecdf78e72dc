"""SFT data: templates, prompt masking, padding, packing (logits identical to unpacked), batch source resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from {{ cookiecutter.package }}.config import ConfigError, ModelConfig
from {{ cookiecutter.package }}.data import sft
from {{ cookiecutter.package }}.data.builtin import BUILTIN_SFT
from {{ cookiecutter.package }}.model.lm import LlamaLM

IGNORE = sft.IGNORE_INDEX


@pytest.fixture
def plain_tokenizer(ft_tokenizer):
    tok = copy.deepcopy(ft_tokenizer)
    tok.chat_template = None  # forces the documented plain template
    return tok


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_plain_template_masks_the_prompt_exactly(plain_tokenizer):
    tok = plain_tokenizer
    messages = [{"role": "user", "content": "Who speaks?"}, {"role": "assistant", "content": "Romeo."}]
    ex = sft.encode_conversation(messages, tok, max_len=512)
    prompt = _ids(tok, "### Instruction:\nWho speaks?\n\n### Response:\n")
    response = _ids(tok, "Romeo.<|endoftext|>")
    assert ex["input_ids"] == prompt + response
    assert ex["labels"] == [IGNORE] * len(prompt) + response
    assert tok.decode([t for t in ex["labels"] if t != IGNORE]) == "Romeo.<|endoftext|>"
    # At inference the prompt tokenizes to exactly the training prefix.
    assert sft.prompt_ids("Who speaks?", tok) == prompt


def test_chat_template_masks_everything_but_assistant_turns(ft_tokenizer):
    tok = ft_tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Which play?"},
        {"role": "assistant", "content": "Macbeth."},
        {"role": "user", "content": "Who speaks?"},
        {"role": "assistant", "content": "Banquo."},
    ]
    ex = sft.encode_conversation(messages, tok, max_len=512)
    trained = tok.decode([t for t in ex["labels"] if t != IGNORE])
    assert trained == "Macbeth.<|im_end|>\nBanquo.<|im_end|>\n"
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)
    # The template's own generation-block mask marks the same characters (it tokenizes the text in one piece).
    ref = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ref_text = tok.decode([t for t, m in zip(ref["input_ids"], ref["assistant_masks"], strict=True) if m])
    assert ref_text.replace("\n", "") == trained.replace("\n", "")
    assert sft.stop_token_ids(tok) == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    first = sft.prompt_ids(messages[:2], tok)
    assert ex["input_ids"][: len(first)] == first and ex["labels"][: len(first)] == [IGNORE] * len(first)


def test_truncation_drops_examples_without_response_tokens(plain_tokenizer):
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "yes"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    kept, dropped = sft.encode_conversations([long, short], plain_tokenizer, max_len=32)
    assert dropped == 1 and len(kept) == 1 and len(kept[0]["input_ids"]) <= 32
    with pytest.raises(ConfigError, match="no example has a response token"):
        sft.encode_conversations([long], plain_tokenizer, max_len=32)


@pytest.mark.parametrize(
    "line, message",
    [
        ({"prompt": "x"}, "missing 'response'"),
        ({"question": "x", "answer": "y"}, "missing 'prompt' and 'response'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ],
)
def test_bad_records_are_one_line_errors(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ConfigError, match=message) as err:
        sft.load_conversations(path)
    assert f"{path}:2" in str(err.value) and "\n" not in str(err.value)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="no examples"):
        sft.load_conversations(tmp_path / "empty.jsonl")
    with pytest.raises(ConfigError, match="not found"):
        sft.load_conversations(tmp_path / "nope.jsonl")


def test_builtin_sft_loads_both_formats():
    conversations = sft.load_conversations(BUILTIN_SFT)
    assert len(conversations) >= 400
    assert any(len(c) > 2 for c in conversations)  # the chat records
    assert all(c[-1]["role"] == "assistant" for c in conversations)


def _examples(n=5, seed=0, vocab=96):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(4, vocab, (length,), generator=g).tolist()
        split = length // 2
        out.append({"input_ids": ids, "labels": [IGNORE] * split + ids[split:]})
    return out


def test_pad_batch_right_pads_with_masked_labels():
    examples = _examples(3)
    batch = sft.pad_batch(examples, pad_id=1)
    T = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, T)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (T - n)
        assert batch["labels"][b, n:].eq(IGNORE).all() and batch["input_ids"][b, n:].eq(1).all()


@torch.no_grad()
def test_packed_logits_and_loss_equal_unpacked():
    torch.manual_seed(0)
    model = LlamaLM(ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16)).eval()
    examples = _examples(6)
    windows = sft.pack_examples(examples, max_len=24)
    assert len(windows) < len(examples) and all(len(w["input_ids"]) <= 24 for w in windows)
    batch = sft.packed_batch(windows, pad_id=1, max_len=24)
    assert batch["attention_mask"].shape == (len(windows), 1, 24, 24)
    packed = model(**{key: value for key, value in batch.items() if key != "labels"}).logits  # labels: loss only
    k = 0
    sum_alone, count = 0.0, 0
    for b, w in enumerate(windows):
        start = 0
        for length in w["lengths"]:
            e = examples[k]
            alone = model(torch.tensor([e["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[b, start : start + length], alone, atol=1e-5, rtol=1e-5)
            assert batch["position_ids"][b, start : start + length].tolist() == list(range(length))
            assert batch["labels"][b, start].item() == IGNORE or e["labels"][0] == IGNORE
            labels = torch.tensor(e["labels"][1:])
            ce = torch.nn.functional.cross_entropy(alone[:-1], labels, ignore_index=IGNORE, reduction="sum")
            sum_alone += float(ce)
            count += int((labels != IGNORE).sum())
            start += length
            k += 1
    loss = model(**batch).loss  # mean over the response tokens of all packed examples
    assert float(loss) == pytest.approx(sum_alone / count, rel=1e-5)
    assert k == len(examples)


@torch.no_grad()
def test_packed_batch_works_with_transformers_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )  # fmt: skip
    ).eval()
    examples = _examples(4, seed=1)
    windows = sft.pack_examples(examples, max_len=32)
    packed = hf(**{k: v for k, v in sft.packed_batch(windows, 1, 32).items() if k != "labels"}).logits
    first = windows[0]["lengths"]
    alone = hf(torch.tensor([examples[1]["input_ids"]])).logits[0]
    torch.testing.assert_close(packed[0, first[0] : first[0] + first[1]], alone, atol=1e-5, rtol=1e-5)
