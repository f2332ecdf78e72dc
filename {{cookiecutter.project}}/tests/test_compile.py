"""torch.compile: LlamaLM traces whole (no graph break), compiled training matches eager, and the compile policy."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import shutil

import pytest
import torch

from {{ cookiecutter.package }} import runtime
from {{ cookiecutter.package }}.config import DebugConfig, OptimConfig, parse_config
from {{ cookiecutter.package }}.config.pretrain import PretrainConfig
from {{ cookiecutter.package }}.data.corpus import TokenWindows
from {{ cookiecutter.package }}.train.loop import fit
from {{ cookiecutter.package }}.train.optim import build_optimizer
from {{ cookiecutter.package }}.train.step import train_step


def _batches(n: int, vocab: int = 96, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (4, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def test_llamalm_forward_has_no_graph_breaks(tiny_model):
    torch._dynamo.reset()
    batch = _batches(1)[0]
    explanation = torch._dynamo.explain(tiny_model)(**batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_fullgraph_forward_backward_inside_train_step(tiny_model):
    # fullgraph=True turns any graph break into an error; aot_eager traces forward and backward like inductor does,
    # without generating code, so this runs in seconds.
    torch._dynamo.reset()
    compiled = torch.compile(tiny_model, fullgraph=True, backend="aot_eager")
    opt = build_optimizer(tiny_model, OptimConfig(warmup_steps=0))
    for i, batch in enumerate(_batches(2)):
        result = train_step(compiled, [batch], opt, None, grad_clip=1.0, autocast=contextlib.nullcontext(), step=i)
        assert bool(result.finite)
    assert all(p.grad is None for p in tiny_model.parameters())  # train_step's zero_grad reached the real weights


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compiled_training_matches_eager_with_inductor(tiny_model):
    torch._dynamo.reset()
    twin = copy.deepcopy(tiny_model)
    runs = {}
    batch = _batches(1)[0]  # the same batch five times: the loss must fall
    for name, model, module in (("eager", tiny_model, tiny_model), ("inductor", twin, torch.compile(twin))):
        opt = build_optimizer(model, OptimConfig(lr=3e-3, warmup_steps=0))
        results = [
            train_step(module, [batch], opt, None, grad_clip=1.0, autocast=contextlib.nullcontext(), step=i)
            for i in range(5)
        ]
        runs[name] = torch.stack([torch.stack([r.loss, r.grad_norm]) for r in results])
    torch.testing.assert_close(runs["inductor"], runs["eager"], rtol=1e-4, atol=1e-5)  # loss and grad norm, 5 steps
    assert runs["eager"][-1, 0] < runs["eager"][0, 0]  # it trained
    for (name, p), q in zip(tiny_model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_fit_logs_the_first_compiled_step_as_compiling(tiny_model, tiny_train_config, pattern_tokens, tmp_path, capsys):
    torch._dynamo.reset()
    cfg = dataclasses.replace(tiny_train_config, max_steps=4, log_every=2)
    source = TokenWindows(pattern_tokens, cfg.batch_size, 16, seed=0)
    compiled = torch.compile(tiny_model, backend="aot_eager")
    history = fit(compiled, source, cfg, tmp_path / "run")
    assert "compile_s" in history[0] and "tokens_per_s" not in history[0]
    assert all("tokens_per_s" in r and "compile_s" not in r for r in history[1:])
    out = capsys.readouterr().out
    assert "step 1/4" in out and "compiling:" in out.splitlines()[0]
    assert "step 2/4" in out and "tok/s" in out


# ---------------------------------------------------------------------------------------------- the compile policy

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("setting", "device", "flags", "expected", "why"),
    [
        ("auto", CUDA, {}, True, "auto on CUDA"),
        ("auto", CPU, {}, False, "CUDA only"),
        ("always", CPU, {}, True, "compile always"),
        ("never", CUDA, {}, False, "compile never"),
        ("always", CUDA, {"debug": True}, True, "compile always"),  # the profile's `compile: never` lost to a flag
        ("always", CUDA, {"break_on_nonfinite": True}, False, "--break-on-nonfinite"),
    ],
)
def test_compile_decision(setting, device, flags, expected, why):
    use, reason = runtime.compile_decision(setting, device, DebugConfig(**flags))
    assert use is expected and why in reason


def test_auto_stays_eager_under_a_debugger(monkeypatch):
    monkeypatch.setattr(runtime, "debugger_attached", lambda: True)
    use, reason = runtime.compile_decision("auto", CUDA, DebugConfig())
    assert not use and "debugger" in reason
    assert runtime.compile_decision("always", CUDA, DebugConfig())[0]  # asked for explicitly: compiled all the same


def test_maybe_compile_says_why_in_one_line(tiny_model, capsys):
    assert runtime.maybe_compile(tiny_model, "auto", CPU, DebugConfig()) is tiny_model
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compile: off (") and "cpu" in err[0]
    compiled = runtime.maybe_compile(tiny_model, "always", CPU, DebugConfig(), fullgraph=True)
    assert compiled is not tiny_model and compiled._orig_mod is tiny_model  # lazy: nothing compiled until called
    assert capsys.readouterr().out.startswith("compile: on (")


@pytest.mark.parametrize("value", ["auto", "always", "never"])
def test_train_compile_flag(value):
    assert parse_config(PretrainConfig, ["--train.compile", value])[0].train.compile == value
    assert PretrainConfig().train.compile == "auto"


@pytest.mark.parametrize("value", ["sometimes", "true", "false"])
def test_train_compile_rejects_other_values(value, capsys):
    with pytest.raises(SystemExit) as exc:  # true / false too: one word per meaning
        parse_config(PretrainConfig, ["--train.compile", value])
    assert exc.value.code == 2 and "compile" in capsys.readouterr().err
