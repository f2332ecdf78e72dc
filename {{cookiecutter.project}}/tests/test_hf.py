"""Weights move between LlamaLM and transformers' LlamaForCausalLM both ways with the same logits (no network)."""

import json

import pytest
import torch
import transformers

from {{ cookiecutter.package }}.config import ModelConfig
from {{ cookiecutter.package }}.model.hf import export_hf, import_hf
from {{ cookiecutter.package }}.model.lm import LlamaLM
from {{ cookiecutter.package }}.model.presets import LLAMA3_ROPE_SCALING

TOL = dict(atol=1e-4, rtol=1e-4)
VOCAB = 73


def ours(tie: bool = True, n_kv_heads: int = 2, seed: int = 0, attention: str = "sdpa") -> LlamaLM:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=64, multiple_of=16,
        rope_theta=1000.0, tie_embeddings=tie, init_std=0.05, attention=attention,
    )  # fmt: skip
    return LlamaLM(config).eval()


def load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def inputs():
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0  # right padding in row 1
    return ids, mask


@pytest.mark.parametrize(("tie", "n_kv_heads"), [(True, 2), (False, 2), (True, 4), (False, 1)])
def test_export_loads_in_transformers_with_same_logits(tmp_path, tie, n_kv_heads):
    model = ours(tie, n_kv_heads)
    export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is tie and config["num_key_value_heads"] == n_kv_heads
    hf = load_hf(tmp_path)
    ids, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, **TOL)
        real = mask.bool()
        hf_padded = hf(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(hf_padded, model(ids, attention_mask=mask).logits[real], **TOL)
        # same loss convention (shift inside, -100 ignored)
        labels = ids.masked_fill(mask == 0, -100)
        torch.testing.assert_close(hf(ids, labels=labels).loss, model(ids, labels=labels).loss, **TOL)


@pytest.mark.parametrize(("tie", "n_kv_heads"), [(True, 2), (False, 4)])
def test_import_of_a_transformers_checkpoint(tmp_path, tie, n_kv_heads):
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, initializer_range=0.05,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # HF initialises norms to one; make them matter
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    model = import_hf(tmp_path)
    assert model.config.hidden_dim == 80 and model.config.norm_eps == 1e-6 and model.config.rope_theta == 500.0
    assert (model.lm_head.weight is model.embed_tokens.weight) is tie
    ids, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, **TOL)


def test_sharded_checkpoint(tmp_path):
    model = ours(tie=False)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(export_hf(model, tmp_path / "a")))
    hf.load_state_dict(load_hf(tmp_path / "a").state_dict())
    hf.save_pretrained(tmp_path / "b", max_shard_size="20KB")
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()
    ids, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(import_hf(tmp_path / "b")(ids).logits, model(ids).logits, **TOL)


def test_greedy_generation_agrees(tmp_path):
    model = ours(seed=4)
    export_hf(model, tmp_path)
    hf = load_hf(tmp_path)
    prompt = torch.randint(0, VOCAB, (1, 5))
    expected = model.generate(prompt, max_new_tokens=8, temperature=0)
    got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


def test_tokenizer_is_exported(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    export_hf(ours(), tmp_path, tokenizer=fast)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("hello world")["input_ids"] == [3, 4]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["eos_token_id"] == 2 and config["bos_token_id"] == 1
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 2


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        import_hf(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="Llama checkpoints only"):
        import_hf(tmp_path)
    export_hf(ours(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"attention_bias": True}))
    with pytest.raises(ValueError, match="attention_bias"):
        import_hf(tmp_path)
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1000.0}
    (tmp_path / "config.json").write_text(json.dumps(config | {"rope_parameters": yarn, "rope_scaling": yarn}))
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        import_hf(tmp_path)
    partial = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1000.0}  # no frequency band: not guessed
    (tmp_path / "config.json").write_text(json.dumps(config | {"rope_parameters": partial, "rope_scaling": partial}))
    with pytest.raises(ValueError, match="llama3 RoPE scaling without .'high_freq_factor'"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        import_hf(tmp_path)


def test_export_is_the_same_whatever_attention_trained_it(tmp_path):
    """The attention choice is how attention is computed, not a weight or a transformers setting: the export of a
    written-out model is byte for byte the SDPA one's, and importing it gives the default (SDPA), same logits."""
    written = ours(attention="written_out")
    export_hf(written, tmp_path / "written")
    export_hf(ours(), tmp_path / "sdpa")
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "written" / name).read_bytes() == (tmp_path / "sdpa" / name).read_bytes()
    imported = import_hf(tmp_path / "written").eval()
    assert imported.config.attention == "sdpa" and not imported.layers[0].self_attn.written_out
    ids, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(imported(ids).logits, written(ids).logits, **TOL)


# Llama 3.2's RoPE scaling with its published values, on a head width of 16 at theta 5e5: wavelengths 6 to 6e5
# positions, so four of the 8 frequency pairs are kept (< 2048), one is blended (2048 .. 8192), three are slowed by 32.
# Positions far beyond 8192 (the original context) make every kind of pair matter.
LLAMA3_POSITIONS = torch.tensor([[0, 1, 7, 300, 2_500, 8_000, 9_000, 20_000, 65_000, 120_000, 131_000]])


def llama3_model(scaling: dict | None = LLAMA3_ROPE_SCALING) -> LlamaLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=131_072, multiple_of=16,
        rope_theta=500_000.0, rope_scaling=scaling, init_std=0.05,
    )  # fmt: skip
    return LlamaLM(config).eval()


def test_llama3_rope_scaling_matches_transformers_both_ways(tmp_path):
    model = llama3_model()
    export_hf(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    written = config.get("rope_parameters") or config["rope_scaling"]  # transformers 5.x / 4.x spelling
    assert {k: written[k] for k in LLAMA3_ROPE_SCALING} == LLAMA3_ROPE_SCALING
    hf = load_hf(tmp_path / "out")
    ids = torch.randint(0, VOCAB, LLAMA3_POSITIONS.shape)
    with torch.no_grad():
        ours_logits = model(ids, position_ids=LLAMA3_POSITIONS).logits
        torch.testing.assert_close(ours_logits, hf(ids, position_ids=LLAMA3_POSITIONS).logits, **TOL)
        # the scaling is what makes them agree: the same weights with plain RoPE give other logits
        plain = llama3_model(scaling=None)
        plain.load_state_dict(model.state_dict())
        assert (plain(ids, position_ids=LLAMA3_POSITIONS).logits - ours_logits).abs().max() > 1e-2
        # and back: transformers' checkpoint imports with the scaling, same logits
        imported = import_hf(tmp_path / "out").eval()
        assert imported.config.rope_scaling == model.config.rope_scaling
        torch.testing.assert_close(imported(ids, position_ids=LLAMA3_POSITIONS).logits, ours_logits, **TOL)


def test_llama3_inv_freq_keeps_blends_and_slows_the_pairs_as_transformers_does():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, rope_theta=500_000.0, max_position_embeddings=131_072,
        rope_scaling=dict(LLAMA3_ROPE_SCALING),
    )  # fmt: skip
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    got = llama3_model().rope.inv_freq
    plain = llama3_model(scaling=None).rope.inv_freq
    torch.testing.assert_close(got, expected)
    ratio = plain / got
    assert (ratio[:4] == 1).all() and 1 < ratio[4] < 32 and torch.allclose(ratio[5:], torch.tensor(32.0))
