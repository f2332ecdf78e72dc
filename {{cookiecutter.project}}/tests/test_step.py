"""train_step: accumulation, clipping, scheduler, non-finite handling, and every model kind (ours, HF, peft)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from {{ cookiecutter.package }}.data.corpus import TokenWindows
from {{ cookiecutter.package }}.train import loop
from {{ cookiecutter.package }}.train import step as step_module
from {{ cookiecutter.package }}.train.step import (
    NonFiniteError,
    StepResult,
    count_targets,
    count_tokens,
    train_step,
)


def _batch(n: int, seq: int = 16, vocab: int = 96, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _split(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    return [
        dict(zip(batch, values, strict=True)) for values in zip(*(v.chunk(parts) for v in batch.values()), strict=True)
    ]


def test_gradient_accumulation_matches_one_big_batch(tiny_model):
    # SGD: the update is proportional to the gradient, so equal updates mean equal accumulated gradients.
    big = copy.deepcopy(tiny_model)
    batch = _batch(4)
    results = []
    for model, micro in ((big, [batch]), (tiny_model, _split(batch, 2))):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        results.append(train_step(model, micro, opt, None, grad_clip=0.0, autocast=contextlib.nullcontext(), step=0))
    assert float(results[0].loss) == pytest.approx(float(results[1].loss), rel=1e-5)
    assert float(results[0].grad_norm) == pytest.approx(float(results[1].grad_norm), rel=1e-4)
    assert float(results[0].tokens) == float(results[1].tokens) == 4 * 16
    for p, q in zip(big.parameters(), tiny_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def _step_gradients(model: nn.Module, micro_batches: list[dict]) -> tuple[StepResult, list[torch.Tensor]]:
    """One train_step with lr 0 (the weights stay) and the gradients it applies, as the optimizer sees them."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads: list[torch.Tensor] = []
    opt = torch.optim.SGD(params, lr=0.0)
    result = train_step(
        model, micro_batches, opt, None, grad_clip=0.0, autocast=contextlib.nullcontext(), step=1,
        on_gradients=lambda: grads.extend(p.grad.clone() for p in params),
    )  # fmt: skip
    return result, grads


def _tiny_hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _assert_same_step(split: tuple[StepResult, list], whole: tuple[StepResult, list]) -> None:
    assert float(split[0].loss) == pytest.approx(float(whole[0].loss), rel=1e-5)
    assert len(split[1]) == len(whole[1]) > 0
    for a, b in zip(split[1], whole[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["ours", "transformers"])
def test_uneven_micro_batches_equal_one_big_batch(kind, tiny_model, uneven_batch):
    """Rows with 1 and 15 targets as two micro-batches give the loss and gradients of one batch of both: the step's
    mean over its 16 targets. Both models shift the labels inside, as count_targets assumes."""
    model = tiny_model if kind == "ours" else _tiny_hf_llama()
    whole = _step_gradients(copy.deepcopy(model), [uneven_batch])
    split = _step_gradients(model, _split(uneven_batch, 2))
    _assert_same_step(split, whole)
    with torch.no_grad():
        rows = [float(model(**b).loss) for b in _split(uneven_batch, 2)]
    assert abs(sum(rows) / 2 - float(whole[0].loss)) > 1e-3  # the mean of the rows' means is another number
    assert [int(count_targets(b)) for b in _split(uneven_batch, 2)] == [1, 15]


def test_uneven_classifier_micro_batches_with_class_weights_equal_one_big_batch():
    """A class-weighted loss (finetune's classify) over 1 and 3 examples: the step's mean over its 4 examples."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from {{ cookiecutter.package }}.finetune import ClassifierWithLoss

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, num_labels=3,
    )  # fmt: skip
    model = ClassifierWithLoss(LlamaForSequenceClassification(config), torch.tensor([0.5, 2.0, 1.0]))
    batch = {"input_ids": torch.randint(1, 96, (4, 8)), "labels": torch.tensor([1, 0, 2, 0])}
    whole = _step_gradients(copy.deepcopy(model), [batch])
    split = _step_gradients(model, [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}])
    _assert_same_step(split, whole)
    weighted = F.cross_entropy(model(**batch).logits, batch["labels"], weight=model.class_weights, reduction="none")
    assert float(whole[0].loss) == pytest.approx(float(weighted.mean()), rel=1e-5)


def test_clip_scheduler_and_zero_grad(tiny_model):
    batch = _batch(2)
    reference = copy.deepcopy(tiny_model)
    reference(**batch).loss.backward()
    expected_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()])).item()

    before = [p.detach().clone() for p in tiny_model.parameters()]
    opt = torch.optim.SGD(tiny_model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    max_norm = expected_norm / 10
    result = train_step(tiny_model, [batch], opt, sched, grad_clip=max_norm, autocast=contextlib.nullcontext(), step=0)

    assert isinstance(result, StepResult)
    assert float(result.grad_norm) == pytest.approx(expected_norm, rel=1e-4)  # reported before clipping
    update = torch.linalg.vector_norm(
        torch.stack([(p - b).norm() for p, b in zip(tiny_model.parameters(), before, strict=True)])
    )
    assert update.item() == pytest.approx(max_norm, rel=1e-3)  # SGD lr 1: the update is the clipped gradient
    assert result.lr == 1.0 and opt.param_groups[0]["lr"] == 0.5  # lr used, then one scheduler step
    assert all(p.grad is None for p in tiny_model.parameters())  # zero_grad(set_to_none=True)


def test_check_loss_sees_every_micro_batch(tiny_model):
    seen = []
    opt = torch.optim.AdamW(tiny_model.parameters())
    train_step(
        tiny_model,
        _split(_batch(4), 4),
        opt,
        None,
        grad_clip=1.0,
        autocast=contextlib.nullcontext(),
        step=3,
        check_loss=lambda loss: seen.append(loss.item()),
    )
    assert len(seen) == 4 and all(x > 0 for x in seen)


class _NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, input_ids, labels=None, **kwargs):
        return SimpleNamespace(loss=(self.w * float("nan")).sum())


def test_non_finite_loss_stops_before_the_update():
    # An optimizer without found_inf support: train_step checks on the host and raises before the update.
    model = _NaNModel()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=True)
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(nan\) at step 7"):
        train_step(model, _split(_batch(2), 2), opt, None, grad_clip=1.0, autocast=contextlib.nullcontext(), step=7)
    assert torch.equal(model.w.detach(), torch.ones(3))
    assert not opt.state and model.w.grad is None  # no optimizer step, gradients dropped


class _InfGradModel(nn.Module):
    """A finite loss whose gradient is infinite: d sqrt(w) / dw at w = 0."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.0, 1.0, 4.0]))

    def forward(self, input_ids, labels=None, **kwargs):
        return SimpleNamespace(loss=self.w.sqrt().sum())


@pytest.mark.parametrize(
    ("model_cls", "message"), [(_NaNModel, r"non-finite loss \(nan\) at step 7"), (_InfGradModel, r"gradient norm \(")]
)
def test_fused_adamw_skips_a_non_finite_update_on_the_device(model_cls, message):
    model = model_cls()
    before = model.w.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    result = train_step(model, [_batch(2)], opt, None, grad_clip=1.0, autocast=contextlib.nullcontext(), step=7)
    assert not bool(result.finite)  # returned without raising: nothing was read from the device
    assert torch.equal(model.w.detach(), before)  # found_inf: the fused kernel left the weights alone
    state = opt.state[model.w]
    assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    with pytest.raises(NonFiniteError, match=message):
        result.check_finite(7)
    if model_cls is _InfGradModel:  # away from w = 0 the gradient is finite: the next update goes through
        with torch.no_grad():
            model.w.fill_(1.0)
        result = train_step(model, [_batch(2)], opt, None, grad_clip=1.0, autocast=contextlib.nullcontext(), step=8)
        assert bool(result.finite) and not torch.equal(model.w.detach(), torch.ones(3))


def test_fit_reads_the_device_only_at_logging_steps(
    tiny_model, tiny_train_config, pattern_tokens, tmp_path, monkeypatch
):
    """Ten steps with log_every=10: no tensor is read to the host until the logging step (the device never idles)."""
    cfg = dataclasses.replace(tiny_train_config, max_steps=10, log_every=10)
    reads = {"count": 0}
    for name in ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "__format__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            reads["count"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    at_call: list[int] = []

    def counted_step(*args, **kwargs):
        at_call.append(reads["count"])
        result = train_step(*args, **kwargs)
        at_call.append(reads["count"])
        return result

    monkeypatch.setattr(loop, "train_step", counted_step)
    # Batches drawn up front: TokenWindows picks its window starts with a CPU generator (.tolist() of a CPU tensor,
    # never a wait for the GPU), which this counter, blind to devices, would count.
    windows = TokenWindows(pattern_tokens, cfg.batch_size, 16, seed=0)
    source = SimpleNamespace(next_batch=iter([windows.next_batch() for _ in range(10)]).__next__, state_dict=dict)
    history = loop.fit(tiny_model, source, cfg, tmp_path / "run")

    assert len(at_call) == 20  # ten calls, counted before and after each
    assert at_call[-1] - at_call[0] == 0  # steps 1-10, and the loop between them: no read at all
    assert reads["count"] > at_call[-1]  # the logging step (and the final checkpoint) did read: the counter works
    assert [r["step"] for r in history] == list(range(1, 11))
    assert all(isinstance(r["loss"], float) and r["tokens"] == 4 * 16 for r in history)


def test_missing_labels_is_a_clear_error(tiny_model):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="labels"):
        train_step(
            tiny_model,
            [{"input_ids": _batch(1)["input_ids"]}],
            opt,
            None,
            grad_clip=1.0,
            autocast=contextlib.nullcontext(),
            step=0,
        )


def test_count_tokens_uses_the_attention_mask():
    batch = _batch(2, seq=5)
    assert count_tokens(batch) == 10
    batch["attention_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert count_tokens(batch) == 8


def test_bf16_autocast_on_cpu(tiny_model):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    losses = [
        train_step(tiny_model, [_batch(2, seed=0)], opt, None, grad_clip=1.0, autocast=autocast, step=i).loss
        for i in range(3)  # the same autocast object is re-entered every step
    ]
    assert all(torch.isfinite(torch.stack(losses)))
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())  # master weights stay fp32


def test_breakpoint_marker_is_on_a_statement_after_the_loss():
    source = inspect.getsource(step_module)
    assert "put a breakpoint here" in inspect.getdoc(train_step).lower()
    lines = source.splitlines()
    marker = [i for i, line in enumerate(lines) if "# breakpoint: loss is computed" in line]
    assign = [i for i, line in enumerate(lines) if line.strip().startswith("loss = ")]
    assert len(marker) == 1 and assign and assign[0] < marker[0]
    code = lines[marker[0]].split("#")[0].strip()
    assert code and "loss" in code  # a statement (debuggers stop on code lines, not on comment-only lines)


def test_transformers_and_peft_models():
    from peft import LoraConfig, get_peft_model

    hf = _tiny_hf_llama()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-3)
    result = train_step(hf, [_batch(2)], opt, None, grad_clip=1.0, autocast=contextlib.nullcontext(), step=0)
    assert torch.isfinite(result.loss) and result.grad_norm > 0

    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(2):  # lora_B starts at zero: the second step moves lora_A too
        train_step(peft_model, [_batch(2)], opt, None, grad_clip=1.0, autocast=contextlib.nullcontext(), step=i)
    params = dict(peft_model.named_parameters())
    assert all("lora_" in n for n in trainable)
    assert all(not torch.equal(params[n], v) for n, v in trainable.items())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
