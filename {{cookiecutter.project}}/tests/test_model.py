"""Blocks and LlamaLM: loss, gradients, padding invariance, KV cache, generation, LoRA."""

import math

import peft
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from {{ cookiecutter.package }}.config import ModelConfig
from {{ cookiecutter.package }}.model.lm import LOSS_CHUNKS, LlamaLM, chunked_cross_entropy, linear_cross_entropy
from {{ cookiecutter.package }}.model.transformer import RMSNorm, swiglu_hidden_dim

TOL = dict(atol=1e-5, rtol=1e-5)


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, multiple_of=16)
    return ModelConfig(**(base | overrides))


def tiny_lm(seed: int = 0, **overrides) -> LlamaLM:
    torch.manual_seed(seed)
    return LlamaLM(tiny(**overrides))


# ------------------------------------------------------------------------------------------------- blocks


def test_rmsnorm_formula():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8)
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), expected, **TOL)


def test_swiglu_width_follows_llama():
    assert swiglu_hidden_dim(256, 64) == 704  # 8/3 * 256 = 682.7, rounded up to a multiple of 64
    assert swiglu_hidden_dim(256, 64, hidden_dim=100) == 100


# ------------------------------------------------------------------------------------------------- LlamaLM


def test_loss_is_shifted_cross_entropy():
    model = tiny_lm()
    ids = torch.randint(0, 61, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100  # e.g. a prompt
    out = model(ids, labels=labels)
    assert out.logits is None  # with labels the [B, T, V] logits are never built
    logits = model(ids).logits
    assert logits.shape == (2, 9, 61)
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, 61), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual, **TOL)


def _ce_pair(rows: int, targets: torch.Tensor, scale: float = 3.0):
    """The same hidden states and head twice: one for ours, one for F.cross_entropy on the full logits."""
    torch.manual_seed(rows)
    hidden, head = torch.randn(rows, 8) * scale, torch.nn.Linear(8, 11, bias=False)
    twin = torch.nn.Linear(8, 11, bias=False)
    twin.load_state_dict(head.state_dict())
    return hidden.clone().requires_grad_(), head, hidden.clone().requires_grad_(), twin


# Both losses: the fused one LlamaLM uses for its plain lm_head, and the one through any head module (LoRA).
LOSSES = {
    "linear": lambda h, head, t: linear_cross_entropy(h, head.weight, t),
    "chunked": chunked_cross_entropy,
}


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("rows", [3, 13, 40])  # fewer rows than chunks (empty chunks), uneven chunks, even chunks
def test_chunked_losses_equal_torch(rows, loss_name):
    targets = torch.randint(0, 11, (rows,))
    targets[::4] = -100
    h, head, h2, twin = _ce_pair(rows, targets, scale=30.0)  # large logits: some targets get p ~ 0 in fp32
    ours = LOSSES[loss_name](h, head, targets)
    torch_loss = F.cross_entropy(twin(h2), targets, ignore_index=-100)
    torch.testing.assert_close(ours, torch_loss, **TOL)
    (2 * ours).backward()
    (2 * torch_loss).backward()
    torch.testing.assert_close(h.grad, h2.grad, **TOL)
    torch.testing.assert_close(head.weight.grad, twin.weight.grad, **TOL)
    assert LOSS_CHUNKS > 1


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_chunked_losses_all_ignored_are_like_torch(loss_name):
    targets = torch.full((6,), -100)
    h, head, h2, twin = _ce_pair(6, targets)
    ours = LOSSES[loss_name](h, head, targets)
    torch_loss = F.cross_entropy(twin(h2), targets, ignore_index=-100)
    assert torch.isnan(ours) and torch.isnan(torch_loss)  # 0 / 0, as torch's mean reduction gives
    ours.backward()
    torch_loss.backward()
    torch.testing.assert_close(h.grad, h2.grad, equal_nan=True)


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_chunked_losses_bf16_logits(loss_name):
    targets = torch.randint(0, 11, (16,))
    h, head, h2, twin = _ce_pair(16, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = LOSSES[loss_name](h, head, targets)
        logits = twin(h2)
        torch_loss = F.cross_entropy(logits.float(), targets)
    assert logits.dtype == torch.bfloat16 and ours.dtype == torch.float32
    torch.testing.assert_close(ours, torch_loss, atol=1e-5, rtol=1e-5)  # the same bf16 logits, reduced in fp32
    ours.backward()
    torch_loss.backward()
    torch.testing.assert_close(h.grad, h2.grad, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(head.weight.grad, twin.weight.grad, atol=2e-3, rtol=2e-2)
    fp32 = F.cross_entropy(twin(h2.detach()), targets)
    assert abs(ours.item() - fp32.item()) < 0.05 * fp32.item()  # bf16 logits stay close to the fp32 loss


def test_linear_cross_entropy_computes_only_the_gradients_asked_for():
    targets = torch.randint(0, 11, (8,))
    h, head, _, _ = _ce_pair(8, targets)
    head.weight.requires_grad_(False)  # a frozen head, as under LoRA
    linear_cross_entropy(h, head.weight, targets).backward()
    assert h.grad is not None and head.weight.grad is None
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(linear_cross_entropy(h, head.weight, targets), F.cross_entropy(head(h), targets))


def _matmul_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_loss_under_no_grad_costs_only_the_logits_matmuls():
    """Evaluation of trainable weights: under no_grad the fused loss computes as many matmul FLOPs as the logits
    alone, not the [V, C] weight and [N, C] input gradients it computes in forward when training."""
    model, ids = tiny_lm(), torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        assert _matmul_flops(lambda: model(input_ids=ids, labels=ids)) == _matmul_flops(lambda: model(input_ids=ids))
    targets = torch.randint(0, 11, (40,))
    h, head, _, _ = _ce_pair(40, targets)  # both require grad
    logits = 2 * 40 * 8 * 11
    with torch.no_grad():
        assert _matmul_flops(lambda: linear_cross_entropy(h, head.weight, targets)) == logits
    assert _matmul_flops(lambda: linear_cross_entropy(h, head.weight, targets)) == 3 * logits  # the counter sees them


def test_lora_on_lm_head_goes_through_the_module():
    model = tiny_lm()
    ids = torch.randint(0, 61, (2, 8))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
    with torch.no_grad():
        lora.base_model.model.lm_head.lora_B["default"].weight.fill_(0.1)  # make the adapter change the logits
    loss = lora(input_ids=ids, labels=ids).loss
    logits = lora(input_ids=ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 61), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected, **TOL)


def test_loss_supports_a_second_backward():
    model = tiny_lm()
    ids = torch.randint(0, 61, (2, 8))
    loss = model(ids, labels=ids).loss
    loss.backward(retain_graph=True)
    first = model.lm_head.weight.grad.clone()
    loss.backward()  # e.g. gradient-penalty or debugging code that backpropagates twice
    torch.testing.assert_close(model.lm_head.weight.grad, 2 * first, **TOL)


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 61, (2, 12))
    grads = []
    for recompute in (False, True):
        model = tiny_lm(activation_checkpointing=recompute, dropout=0.0)
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], **TOL)
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    model.eval()
    torch.testing.assert_close(model(ids).logits, tiny_lm(activation_checkpointing=False)(ids).logits, **TOL)


def test_gradients_reach_every_parameter():
    model = tiny_lm()
    ids = torch.randint(0, 61, (2, 8))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_init_and_tying():
    model = tiny_lm(dim=128, n_heads=4, n_kv_heads=4, n_layers=8, init_std=0.02)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert abs(model.layers[0].mlp.gate_proj.weight.std().item() - 0.02) < 0.002
    residual = 0.02 / math.sqrt(2 * 8)
    assert abs(model.layers[3].self_attn.o_proj.weight.std().item() - residual) < 0.1 * residual
    assert abs(model.layers[3].mlp.down_proj.weight.std().item() - residual) < 0.1 * residual
    assert torch.all(model.norm.weight == 1)
    untied = tiny_lm(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_num_params_and_flops():
    model = tiny_lm()  # dim 32, hidden 96 (8/3*32 = 85 -> 96), 2 layers, kv width 16, vocab 61, tied
    per_layer = 32 * 32 + 2 * (32 * 16) + 32 * 32 + 3 * (32 * 96) + 2 * 32
    total = 61 * 32 + 2 * per_layer + 32
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total  # tied: the table is also the output layer, so it stays
    assert model.flops_per_token(16) == 6 * total + 12 * 2 * 4 * 8 * 16
    untied = tiny_lm(tie_embeddings=False)
    assert untied.num_params() == untied.num_params(non_embedding=False) - 61 * 32


def test_left_padding_with_position_ids_matches_unpadded():
    model = tiny_lm().eval()
    ids = torch.randint(1, 61, (1, 5))
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), ids), dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(out[:, 3:], model(ids).logits, **TOL)


def test_right_padding_does_not_change_real_tokens():
    model = tiny_lm().eval()
    ids = torch.randint(1, 61, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[1, :4], model(ids[1:, :4]).logits[0], **TOL)
    torch.testing.assert_close(out[0], model(ids[:1]).logits[0], **TOL)


def test_kv_cache_forward_matches_full_forward():
    model = tiny_lm().eval()
    ids = torch.randint(0, 61, (2, 9))
    full = model(ids).logits
    first = model(ids[:, :6], use_cache=True)
    assert first.past_key_values.seq_len() == 6
    rest = model(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat((first.logits, rest.logits), dim=1), full, **TOL)


def test_generate_cached_equals_uncached_greedy():
    model = tiny_lm(seed=3)
    model.train()
    prompt = torch.randint(0, 61, (2, 4))
    cached = model.generate(prompt, max_new_tokens=12, temperature=0)
    uncached = model.generate(prompt, max_new_tokens=12, temperature=0, use_cache=False)
    assert cached.shape == (2, 16)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :4], prompt)
    assert model.training  # generate restores the mode it found
    # top_k=1 and a tiny top_p are greedy too
    assert torch.equal(model.generate(prompt, 12, temperature=1.0, top_k=1), cached)
    assert torch.equal(model.generate(prompt, 12, temperature=1.0, top_p=1e-6), cached)


def test_generate_sampling_is_reproducible_and_stops_at_eos():
    model = tiny_lm(seed=1)
    prompt = torch.randint(0, 61, (3, 2))
    a = model.generate(prompt, 10, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 10, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    greedy = model.generate(prompt, 10, temperature=0)
    eos = int(greedy[0, 4])  # the third generated token of row 0 becomes EOS
    stopped = model.generate(prompt, 10, temperature=0, eos_token_id=eos)
    assert stopped.shape[1] <= greedy.shape[1]
    first_eos = (stopped[0, 2:] == eos).nonzero()[0].item() + 2
    assert torch.all(stopped[0, first_eos:] == eos)  # finished rows keep emitting EOS
    assert torch.equal(stopped[0, : first_eos + 1], greedy[0, : first_eos + 1])


def test_bf16_autocast_forward_backward():
    model = tiny_lm()
    ids = torch.randint(0, 61, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
        assert model(ids).logits.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.layers[0].self_attn.q_proj.weight.grad.dtype == torch.float32


def test_dropout_only_in_training():
    model = tiny_lm(dropout=0.5)
    ids = torch.randint(0, 61, (1, 6))
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)


def test_peft_lora_wraps_our_model():
    model = tiny_lm()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(("q_proj" in n) for n in trainable) == 2 * 2  # A and B in each of 2 layers
    ids = torch.randint(0, 61, (2, 8))
    out = lora(input_ids=ids, labels=ids)  # HF-style keywords
    torch.testing.assert_close(out.loss, model(ids, labels=ids).loss)  # B starts at zero: same function
    out.loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_A" in n or "lora_B" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert model.embed_tokens.weight.grad is None  # base weights frozen
