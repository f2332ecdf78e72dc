"""Unit tests of the debugger plumbing: address parsing, debugger start-up, worker fallback, the non-finite guard."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from torch import nn

from {{ cookiecutter.package }} import debug
from {{ cookiecutter.package }}.config import DebugConfig
from {{ cookiecutter.package }}.debug import NonFiniteGuard, parse_address
from {{ cookiecutter.package }}.train.step import NonFiniteError


@pytest.fixture
def no_debugger(monkeypatch):
    """Behave as in a plain run even when these tests themselves run under the IDE's debugger."""
    monkeypatch.setattr(debug, "debugger_attached", lambda: False)
    monkeypatch.delenv("PYTHONBREAKPOINT", raising=False)
    monkeypatch.delenv(debug.INJECT_NAN_ENV, raising=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5678", ("127.0.0.1", 5678)),
        ("0", ("127.0.0.1", 0)),
        ("0.0.0.0:5678", ("0.0.0.0", 5678)),
        ("localhost:1", ("localhost", 1)),
        (":9000", ("127.0.0.1", 9000)),
        ("[::1]:5678", ("::1", 5678)),
        ("host.docker.internal:5679", ("host.docker.internal", 5679)),
    ],
)
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "host:", "1.2.3.4:70000", "::1:5678", "host:-1", "host:56x"])
def test_parse_address_rejects(text):
    with pytest.raises(ValueError, match="invalid address"):
        parse_address(text)


# ------------------------------------------------------------------------------------------------ start_debugger


class FakeDebugpy(types.ModuleType):
    """Records what start_debugger asks of debugpy; listen() "binds" port 0 to 40000."""

    def __init__(self):
        super().__init__("debugpy")
        self.calls: list[tuple] = []

    def configure(self, **kwargs):
        self.calls.append(("configure", kwargs))

    def listen(self, address):
        self.calls.append(("listen", address))
        host, port = address
        return host, port or 40000

    def wait_for_client(self):
        self.calls.append(("wait_for_client",))


@pytest.fixture
def fake_debugpy(monkeypatch, no_debugger):
    fake = FakeDebugpy()
    monkeypatch.setitem(sys.modules, "debugpy", fake)
    return fake


def test_debugpy_listens_on_requested_port_and_prints_one_line(fake_debugpy, capsys):
    debug.start_debugger(DebugConfig(debugpy="5678"))
    assert ("listen", ("127.0.0.1", 5678)) in fake_debugpy.calls
    assert ("configure", {"subProcess": False}) in fake_debugpy.calls
    assert ("wait_for_client",) not in fake_debugpy.calls
    lines = [line for line in capsys.readouterr().err.splitlines() if "listening" in line]
    assert lines == ["debugpy listening on 127.0.0.1:5678"]


def test_debugpy_port_zero_prints_real_port_and_waits(fake_debugpy, capsys):
    debug.start_debugger(DebugConfig(debugpy="0", wait_for_client=True))
    assert "debugpy listening on 127.0.0.1:40000" in capsys.readouterr().err.splitlines()
    assert fake_debugpy.calls[-1] == ("wait_for_client",)


def test_debugpy_public_host_warns(fake_debugpy, capsys):
    debug.start_debugger(DebugConfig(debugpy="0.0.0.0:5678"))
    err = capsys.readouterr().err
    assert "warning" in err and "execute code" in err
    assert "debugpy listening on 0.0.0.0:5678" in err


def test_torchrun_ranks_get_port_plus_rank(fake_debugpy):
    debug.start_debugger(DebugConfig(debugpy="5678"), rank=3)
    assert ("listen", ("127.0.0.1", 5681)) in fake_debugpy.calls


def test_rank_zero_only(fake_debugpy):
    debug.start_debugger(DebugConfig(debugpy="5678", debugpy_all_ranks=False), rank=1)
    assert fake_debugpy.calls == []
    debug.start_debugger(DebugConfig(debugpy="5678", debugpy_all_ranks=False), rank=0)
    assert ("listen", ("127.0.0.1", 5678)) in fake_debugpy.calls


def test_setup_debugging_reads_rank_from_env(fake_debugpy, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    debug.setup_debugging(DebugConfig(debugpy="6000"))
    assert ("listen", ("127.0.0.1", 6002)) in fake_debugpy.calls


def test_no_flags_is_a_no_op(fake_debugpy):
    debug.start_debugger(DebugConfig())
    assert fake_debugpy.calls == []


@pytest.mark.parametrize(
    ("dbg", "message"),
    [
        (DebugConfig(debugpy="5678", pycharm_debug="localhost:5679"), "not both"),
        (DebugConfig(wait_for_client=True), "--wait-for-client needs --debugpy"),
        (DebugConfig(debugpy="nope"), "--debugpy: invalid address"),
        (DebugConfig(pycharm_debug="localhost:0"), "not 0"),
    ],
)
def test_bad_debugger_flags_exit_2_with_one_line(fake_debugpy, capsys, dbg, message):
    with pytest.raises(SystemExit) as exc:
        debug.start_debugger(dbg)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert fake_debugpy.calls == []


def test_pycharm_debug_without_pydevd_pycharm_says_how_to_install(monkeypatch, no_debugger, capsys):
    monkeypatch.setitem(sys.modules, "pydevd_pycharm", None)  # import raises ImportError
    with pytest.raises(SystemExit) as exc:
        debug.start_debugger(DebugConfig(pycharm_debug="localhost:5679"))
    assert exc.value.code == 2
    assert "pydevd-pycharm" in capsys.readouterr().err


def test_pycharm_debug_connects_without_suspending(monkeypatch, no_debugger):
    calls = []
    fake = types.ModuleType("pydevd_pycharm")
    fake.settrace = lambda *args, **kwargs: calls.append((args, kwargs))
    monkeypatch.setitem(sys.modules, "pydevd_pycharm", fake)
    debug.start_debugger(DebugConfig(pycharm_debug="host.docker.internal:5679"))
    # (host, stdout_to_server, stderr_to_server, port, suspend): positional, as every pydevd-pycharm build accepts it
    assert calls == [(("host.docker.internal", True, True, 5679, False), {})]


def test_debugger_already_attached_skips_flags(monkeypatch, fake_debugpy, capsys):
    monkeypatch.setattr(debug, "debugger_attached", lambda: True)
    debug.start_debugger(DebugConfig(debugpy="5678"))
    assert fake_debugpy.calls == []
    assert "already attached" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ detection


def _fake_pydevd(monkeypatch, py_db):
    constants = types.ModuleType("_pydevd_bundle.pydevd_constants")
    constants.get_global_debugger = lambda: py_db
    monkeypatch.setitem(sys.modules, "_pydevd_bundle.pydevd_constants", constants)


def test_debugger_attached_detects_pydevd(monkeypatch):
    monkeypatch.delitem(sys.modules, "_pydevd_bundle.pydevd_constants", raising=False)
    assert debug.debugger_attached() is False
    _fake_pydevd(monkeypatch, None)
    assert debug.debugger_attached() is False
    _fake_pydevd(monkeypatch, object())  # PyCharm's debugger: connected once it exists
    assert debug.debugger_attached() is True
    _fake_pydevd(monkeypatch, types.SimpleNamespace(is_attached=lambda: False))  # debugpy listening, no client
    assert debug.debugger_attached() is False
    _fake_pydevd(monkeypatch, types.SimpleNamespace(is_attached=lambda: True))
    assert debug.debugger_attached() is True


def test_workers_drop_to_zero_under_a_debugger(monkeypatch, capsys):
    monkeypatch.setattr(debug, "debugger_attached", lambda: True)
    assert debug.effective_num_workers(4) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_workers 4 -> 0" in err[0]
    assert debug.effective_num_workers(0) == 0


def test_workers_unchanged_without_debugger(no_debugger, capsys):
    assert debug.effective_num_workers(4) == 4
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------ NonFiniteGuard


class Explode(nn.Module):
    """A NaN in the first element: a stand-in for an overflowing layer."""

    def forward(self, x):
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask.view(-1)[0] = True
        return x.masked_fill(mask, math.nan)


class Block(nn.Module):
    def __init__(self, bad: bool = False):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.act = Explode() if bad else nn.Identity()

    def forward(self, x):
        return self.act(self.proj(x))


def make_model(bad_block: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(Block(bad=i == bad_block) for i in range(3)))


def test_guard_names_the_first_module_with_a_nan_and_raises(no_debugger, capsys):
    model = make_model(bad_block=1)
    with NonFiniteGuard(model, enabled=True) as guard:
        guard.step = 3
        with pytest.raises(NonFiniteError) as exc:
            model(torch.randn(2, 4))
    message = str(exc.value)
    assert "module '1.act' (Explode)" in message
    assert "step 3" in message and "1 NaN" in message
    assert "under a debugger" in message
    assert "module '1.act'" in capsys.readouterr().err  # the report is printed, too


def test_guard_removes_its_hooks(no_debugger):
    model = make_model(bad_block=0)
    with NonFiniteGuard(model, enabled=True):
        pass
    out = model(torch.randn(2, 4))  # no hook left: the NaN just flows on
    assert torch.isnan(out).any()


def test_disabled_guard_installs_nothing(no_debugger):
    model = make_model(bad_block=2)
    with NonFiniteGuard(model, enabled=False) as guard:
        assert torch.isnan(model(torch.randn(2, 4))).any()
        guard.check_loss(torch.tensor(math.nan))  # train_step reports the reduced loss instead


def test_guard_checks_the_loss(no_debugger):
    with NonFiniteGuard(make_model(), enabled=True) as guard:
        guard.check_loss(torch.tensor(1.5))
        guard.step = 7
        with pytest.raises(NonFiniteError, match=r"non-finite loss at step 7: shape \[\] .*0 NaN, 1 \+Inf"):
            guard.check_loss(torch.tensor(math.inf))


class InfGrad(torch.autograd.Function):
    """Identity forward, infinite backward: only the gradient check can see it."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


class GradBomb(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        return self.lin(InfGrad.apply(x) * 1.0)


def test_guard_checks_gradients(no_debugger):
    model = nn.Sequential(nn.Linear(4, 4), GradBomb())
    with NonFiniteGuard(model, enabled=True):
        out = model(torch.randn(2, 4)).sum()  # finite forward
        with pytest.raises(NonFiniteError, match=r"gradient of parameter '0\.(weight|bias)'"):
            out.backward()


def test_guard_breaks_into_the_debugger_instead_of_raising(no_debugger, monkeypatch):
    hits = []
    monkeypatch.setenv("PYTHONBREAKPOINT", "set-by-the-ide")
    monkeypatch.setattr(sys, "breakpointhook", lambda *a, **k: hits.append(1))
    model = make_model(bad_block=0)
    with NonFiniteGuard(model, enabled=True) as guard:
        model(torch.randn(2, 4))  # stops (here: records) instead of raising
        assert hits == [1]
        assert "module '0.act'" in guard.report
        with pytest.raises(NonFiniteError, match="it started with: non-finite output of module '0.act'"):
            guard.check_loss(torch.tensor(math.nan))  # continuing never trains on a NaN


def test_nan_injection_hits_the_named_module_at_the_step(no_debugger, monkeypatch):
    monkeypatch.setenv(debug.INJECT_NAN_ENV, "2.proj:1")
    model = make_model()
    x = torch.randn(2, 4)
    with NonFiniteGuard(model, enabled=True) as guard:
        model(x)  # step 0: healthy
        guard.step = 1
        with pytest.raises(NonFiniteError, match=r"module .2\.proj. \(Linear\) at step 1: .*1 NaN"):
            model(x)


def test_nan_injection_works_with_the_guard_disabled(no_debugger, monkeypatch):
    monkeypatch.setenv(debug.INJECT_NAN_ENV, "0.proj:0")
    model = make_model()
    with NonFiniteGuard(model, enabled=False):
        assert torch.isnan(model(torch.randn(2, 4))).sum() > 0


def test_nan_injection_rejects_unknown_module(no_debugger, monkeypatch):
    monkeypatch.setenv(debug.INJECT_NAN_ENV, "layers.9.mlp:0")
    with pytest.raises(ValueError, match="no module named 'layers.9.mlp'"):
        NonFiniteGuard(make_model(), enabled=True).install()
    monkeypatch.setenv(debug.INJECT_NAN_ENV, "0.proj")
    with pytest.raises(ValueError, match="MODULE:STEP"):
        NonFiniteGuard(make_model(), enabled=True)


def test_tensor_stats():
    t = torch.tensor([1.0, -2.0, math.nan, math.inf, -math.inf])
    stats = debug.tensor_stats(t)
    assert "shape [5] torch.float32" in stats
    assert "1 NaN, 1 +Inf, 1 -Inf of 5" in stats
    assert "finite min -2 max 1" in stats
