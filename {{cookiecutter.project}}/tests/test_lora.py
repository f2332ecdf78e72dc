"""LoRA through peft: trainable-parameter formula, save/load, merge, our LlamaLM, model loading and QLoRA errors."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from {{ cookiecutter.package }}.config import ConfigError, LoraSettings, ModelConfig, OptimConfig
from {{ cookiecutter.package }}.lora import (
    apply_lora,
    check_qlora,
    count_parameters,
    load_adapter,
    load_model,
    merge_and_save,
    resolve_model_path,
    resolve_target_modules,
)
from {{ cookiecutter.package }}.model.lm import LlamaLM
from {{ cookiecutter.package }}.train.optim import build_optimizer
from {{ cookiecutter.package }}.train.step import train_step

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg)


def _our_llama(seed: int = 0) -> LlamaLM:
    torch.manual_seed(seed)
    return LlamaLM(ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16))


def _formula(model: nn.Module, targets: list[str], r: int) -> int:
    """r * (in + out) for every nn.Linear whose name ends with a target (computed on the bare model)."""
    return sum(
        r * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.split(".")[-1] in targets
    )


def _perturb(peft_model: nn.Module) -> None:
    """LoRA starts as the identity (B = 0); give B values so that the adapter changes the outputs."""
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


@pytest.mark.parametrize(
    "make, task, targets, expected_targets",
    [
        (_hf_llama, "sft", None, ["q_proj", "v_proj"]),
        (_hf_llama, "sft", ["all-linear"], LLAMA_ALL),
        (_our_llama, "sft", None, ["q_proj", "v_proj"]),
        (_our_llama, None, ["all-linear"], LLAMA_ALL),
    ],
)
def test_only_lora_params_train_and_their_count_is_the_formula(make, task, targets, expected_targets):
    base = make()
    assert sorted(resolve_target_modules(base, targets)) == sorted(expected_targets)
    expected = _formula(base, expected_targets, r=4)
    total_before = sum(p.numel() for p in base.parameters())
    model = apply_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=targets), task)
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert total == total_before + expected
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraSettings(r=4), task)


def test_bert_classifier_defaults_to_query_value_and_trains_its_head():
    torch.manual_seed(0)
    base = BertForSequenceClassification(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=3,
        )  # fmt: skip
    )
    head = sum(p.numel() for p in base.classifier.parameters())
    expected = _formula(base, ["query", "value"], r=8) + head
    model = apply_lora(base, LoraSettings(r=8, dropout=0.0), "classify")
    assert count_parameters(model)[0] == expected


def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"\['qkv'\] match no linear layer.*'q_proj'"):
        resolve_target_modules(_hf_llama(), ["qkv"])


def test_adapter_save_then_load_reproduces_outputs_exactly(tmp_path):
    base = _hf_llama()
    base.save_pretrained(tmp_path / "base")
    model = apply_lora(base, LoraSettings(r=4, dropout=0.0), "sft").eval()
    _perturb(model)
    x = torch.randint(0, 96, (2, 12))
    expected = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    fresh = load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    assert torch.equal(fresh(input_ids=x).logits, expected)
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        load_adapter(base, tmp_path / "base")


@pytest.mark.parametrize("make", [_hf_llama, _our_llama])
def test_merged_model_equals_adapter_outputs(tmp_path, make, ft_tokenizer):
    model = apply_lora(make(), LoraSettings(r=4, dropout=0.0), "sft").eval()
    _perturb(model)
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        adapter_logits = model(input_ids=x).logits
        plain = make()(x).logits
    assert not torch.allclose(adapter_logits, plain, atol=1e-3)  # the adapter matters
    out = merge_and_save(model, tmp_path / "merged", ft_tokenizer, stop_ids=[0, 3])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # a plain transformers model, no peft
    assert GenerationConfig.from_pretrained(out).eos_token_id == [0, 3]
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapter_logits, atol=1e-5, rtol=1e-5)


def test_lora_on_our_llamalm_trains_through_train_step():
    base = _our_llama()
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = apply_lora(base, LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["all-linear"]), None)
    opt = build_optimizer(model, OptimConfig(lr=2e-2, weight_decay=0.0))
    ids = torch.arange(4, 28).repeat(4, 2)  # [4, 48] a repeating pattern
    batch = {"input_ids": ids, "labels": ids}
    losses = [
        train_step(model, [batch], opt, None, grad_clip=1.0, autocast=contextlib.nullcontext(), step=i).loss
        for i in range(10)
    ]
    assert losses[-1] < losses[0] - 0.2  # frozen random embeddings: LoRA alone moves it, slowly
    for name, p in base.named_parameters():  # the base weights never move
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, frozen[key]), name


def test_qlora_on_cpu_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        check_qlora(LoraSettings(qlora=True))
    # The QLoRA check comes before the path is even looked at.
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load_model(tmp_path / "missing", "sft", settings=LoraSettings(qlora=True))
    check_qlora(LoraSettings(qlora=False))  # plain LoRA: nothing to check


def test_model_paths(tmp_path, ft_hf_dir):
    with pytest.raises(ConfigError, match="model path does not exist: runs/nope/hf"):
        resolve_model_path("runs/nope/hf")
    with pytest.raises(ConfigError, match="model path does not exist"):
        load_model(tmp_path / "nope", "sft")
    assert resolve_model_path(ft_hf_dir.parent) == str(ft_hf_dir)  # a pretrain run directory -> its hf/ export
    assert resolve_model_path("org/some-model") == "org/some-model"  # a hub id is passed through
    assert resolve_model_path("gpt2") == "gpt2"  # a legacy canonical hub repo: the same rule as the tokenizer's
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a transformers model directory"):
        resolve_model_path(tmp_path / "empty")
    model, tok = load_model(ft_hf_dir, "classify", labels=["a", "b", "c"])
    assert model.config.num_labels == 3 and model.config.pad_token_id == tok.pad_token_id
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}


@pytest.mark.parametrize(
    ("name", "is_hub_id"),
    [
        ("gpt2", True),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("my_model.v2", True),
        ("runs/pretrain/hf", False),  # a local path that is missing, not something to download
        ("./model", False),
        ("/models/llama", False),
        ("~/models/llama", False),
        ("org/", False),
        ("a--b", False),
        ("a..b", False),
        ("org/na me", False),
        ("", False),
    ],
)
def test_one_hub_id_rule_for_models_and_tokenizers(tmp_path, monkeypatch, name, is_hub_id):
    from {{ cookiecutter.package }}.data import tokenizer as tokenizer_module

    assert tokenizer_module.looks_like_hub_id(name) is is_hub_id
    monkeypatch.chdir(tmp_path)  # no local directory of that name
    if is_hub_id:
        assert resolve_model_path(name) == name
    else:
        with pytest.raises(ConfigError):
            resolve_model_path(name)
