"""Debugger support shared by every entry point.

- ``--debugpy [HOST:]PORT`` starts debugpy's adapter in this process (VS Code attaches with "Attach to ..." in
  launch.json); ``--wait-for-client`` blocks until the IDE has set its breakpoints, so step 0 is debuggable.
- ``--pycharm-debug HOST:PORT`` connects out to PyCharm's "Python Debug Server" (needs ``pydevd-pycharm`` matching
  the PyCharm build: ``pip install -e ".[pycharm]"``).
- ``--break-on-nonfinite`` installs :class:`NonFiniteGuard`: the first NaN/Inf activation, loss or gradient is
  reported with the module that produced it, then the debugger stops there (or a clear error ends the run).

Security: a debugpy port lets whoever reaches it run arbitrary code in this process. The default host is 127.0.0.1,
which the editor's port forwarding reaches inside the dev container too; bind 0.0.0.0 only in a container whose port
is published another way (``docker run -p 127.0.0.1:5678:5678``), never on a shared host.

Testing hook: ``<PACKAGE>_INJECT_NAN_AT=MODULE:STEP`` (for the default project ``LLM_LAB_INJECT_NAN_AT``), e.g.
``layers.1.mlp:1``, replaces one element of that module's output with NaN at that training step (numbered as the
training log numbers it: ``guard.step``), so the non-finite path can be tried (and tested) on a healthy model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import fail  # bad debugger flags are bad input: one line on stderr, exit code 2
from .train.step import NonFiniteError

if TYPE_CHECKING:
    from .config import DebugConfig

DEFAULT_HOST = "127.0.0.1"
INJECT_NAN_ENV = f"{__name__.split('.')[0].upper()}_INJECT_NAN_AT"


def parse_address(value: str, default_host: str = DEFAULT_HOST) -> tuple[str, int]:
    """``"5678"`` -> (default_host, 5678); ``"0.0.0.0:5678"``; ``"[::1]:5678"``. Raises ValueError."""
    text = str(value).strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = default_host, text
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"invalid address {value!r}: write IPv6 hosts in brackets, e.g. [::1]:5678")
    if not host:
        host = default_host
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid address {value!r}: expected [HOST:]PORT with PORT in 0..65535")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def env_rank() -> int:
    """The global rank torchrun assigns (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def debugger_attached() -> bool:
    """True when an IDE debugger is connected: debugpy with a configured client, or PyCharm's pydevd.

    Both debuggers are built on pydevd, whose global debugger lives in ``_pydevd_bundle.pydevd_constants`` (debugpy
    vendors the same module name), so one check covers VS Code launch/attach, PyCharm Debug and the Debug Server.
    """
    constants = sys.modules.get("_pydevd_bundle.pydevd_constants")
    getter = getattr(constants, "get_global_debugger", None)
    py_db = getter() if getter is not None else None
    if py_db is None:
        return False
    # debugpy's PyDB exists as soon as listen() runs; is_attached() is true only once a client configured it.
    is_attached = getattr(py_db, "is_attached", None)
    return bool(is_attached()) if callable(is_attached) else True


def effective_num_workers(requested: int) -> int:
    """DataLoader workers are separate processes the IDE does not debug (and debugpy would block on): use 0."""
    if requested > 0 and debugger_attached():
        notice = f"debugger attached: num_workers {requested} -> 0 (breakpoints hit in this process only)"
        print(notice, file=sys.stderr)
        return 0
    return requested


def start_debugger(dbg: DebugConfig, rank: int = 0) -> None:
    """Start the debugger the flags ask for; a no-op without ``--debugpy`` / ``--pycharm-debug``."""
    if dbg.debugpy and dbg.pycharm_debug:
        fail("use either --debugpy (VS Code) or --pycharm-debug (PyCharm), not both: one process has one debugger")
    if not (dbg.debugpy or dbg.pycharm_debug):
        if dbg.wait_for_client:
            fail("--wait-for-client needs --debugpy [HOST:]PORT")
        return
    if rank != 0 and not dbg.debugpy_all_ranks:
        return
    if debugger_attached():
        print("a debugger is already attached (started from the IDE): ignoring the debugger flags", file=sys.stderr)
        return
    if dbg.debugpy:
        _start_debugpy(dbg.debugpy, wait=dbg.wait_for_client, rank=rank)
    else:
        if dbg.wait_for_client:
            fail("--wait-for-client applies to --debugpy; --pycharm-debug always waits for PyCharm's debug server")
        _start_pycharm(dbg.pycharm_debug)


def setup_debugging(dbg: DebugConfig, rank: int | None = None) -> None:
    """The one call every entry point makes right after parsing its flags."""
    start_debugger(dbg, env_rank() if rank is None else rank)


def _flag_address(flag: str, address: str) -> tuple[str, int]:
    """:func:`parse_address` for a debugger flag: a bad address is bad input (one line on stderr, exit code 2)."""
    try:
        return parse_address(address)
    except ValueError as error:
        fail(f"{flag}: {error}")


def _start_debugpy(address: str, *, wait: bool, rank: int) -> None:
    host, port = _flag_address("--debugpy", address)
    try:
        import debugpy
    except ImportError:
        fail('--debugpy needs debugpy: python -m pip install -e ".[dev]" (or pip install debugpy)')
    if port:
        port += rank  # torchrun: rank r listens on PORT + r, so every rank can be attached to
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: debugpy on {host} lets anyone who can reach the port execute code in this process",
            file=sys.stderr,
        )
    # Worker processes would each wait for their own client; the profile runs without workers instead.
    debugpy.configure(subProcess=False)
    try:
        real_host, real_port = debugpy.listen((host, port))
    except (OSError, RuntimeError) as error:
        fail(f"--debugpy {format_address(host, port)}: cannot listen ({error})")
    print(f"debugpy listening on {format_address(real_host, real_port)}", file=sys.stderr, flush=True)
    if wait:
        debugpy.wait_for_client()  # returns after the client's configurationDone: breakpoints are set


def _start_pycharm(address: str) -> None:
    host, port = _flag_address("--pycharm-debug", address)
    if port == 0:
        fail("--pycharm-debug needs the port PyCharm's Python Debug Server listens on (not 0)")
    try:
        import pydevd_pycharm
    except ImportError:
        fail(
            "--pycharm-debug needs pydevd-pycharm matching your PyCharm build (Help | About): "
            "pip install 'pydevd-pycharm~=<build>' or pip install -e '.[pycharm]'"
        )
    try:
        # Positional on purpose: builds up to 252 spell the keywords stdoutToServer/stderrToServer, 253 and later
        # stdout_to_server/stderr_to_server, but every build since 243 takes (host, stdout, stderr, port, suspend) in
        # this order. suspend=False: run on until a breakpoint set in PyCharm is hit instead of stopping here.
        pydevd_pycharm.settrace(host, True, True, port, False)
    except OSError as error:
        fail(
            f"--pycharm-debug {format_address(host, port)}: cannot connect ({error}); start the 'Python Debug "
            "Server' run configuration in PyCharm first"
        )


# --------------------------------------------------------------------------------------------- non-finite values


def tensor_stats(tensor: torch.Tensor) -> str:
    """Shape, dtype, NaN/Inf counts and the finite range: enough to tell an overflow from a 0/0."""
    t = tensor.detach()
    if not t.is_floating_point() and not t.is_complex():
        return f"shape {list(t.shape)} {t.dtype}"
    t = t.float()
    finite = torch.isfinite(t)
    nan = int(torch.isnan(t).sum())
    pos_inf = int(torch.isposinf(t).sum())
    neg_inf = int(torch.isneginf(t).sum())
    text = f"shape {list(t.shape)} {tensor.dtype}: {nan} NaN, {pos_inf} +Inf, {neg_inf} -Inf of {t.numel()}"
    if bool(finite.any()):
        values = t[finite]
        text += f"; finite min {values.min().item():.4g} max {values.max().item():.4g}"
    return text


def _tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Floating tensors inside a module output: a tensor, tuple/list, dict (HF ModelOutput) or dataclass."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif depth < 3:
        if isinstance(value, (tuple, list)):
            items: Any = value
        elif isinstance(value, dict):
            items = value.values()
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            items = (getattr(value, field.name) for field in dataclasses.fields(value))
        else:
            return
        for item in items:
            yield from _tensors(item, depth + 1)


def _is_finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor.detach()).all())


def _breakpoint_requested() -> bool:
    return debugger_attached() or os.environ.get("PYTHONBREAKPOINT", "") not in ("", "0")


class NonFiniteGuard:
    """Find the first NaN/Inf: forward hooks on every module, a loss check and gradient hooks.

    Use as a context manager around training; set ``guard.step`` every step and pass ``check_loss`` every
    micro-batch loss. Disabled, it installs nothing but a requested NaN injection and ``check_loss`` does nothing:
    train_step then stops on the reduced loss, together on every rank.
    """

    def __init__(self, model: nn.Module, enabled: bool, *, gradients: bool = True):
        self.model = model
        self.enabled = enabled
        self.gradients = gradients
        self.step = 0
        self.report: str | None = None  # the first non-finite value found
        self._handles: list[Any] = []
        self._inject = _parse_injection(os.environ.get(INJECT_NAN_ENV, ""))

    def __enter__(self) -> NonFiniteGuard:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def install(self) -> None:
        self.remove()
        modules = dict(self.model.named_modules())
        if self._inject is not None:
            name, step = self._inject
            if name not in modules:
                near = [n for n in modules if n and (name in n or n in name)][:5] or list(modules)[1:6]
                raise ValueError(f"{INJECT_NAN_ENV}: no module named {name!r}; e.g. {', '.join(near)}")
            # Registered first so the guard's own hook on the same module sees the NaN.
            self._handles.append(modules[name].register_forward_hook(self._injector(step)))
            print(f"{INJECT_NAN_ENV}: a NaN goes into the output of {name!r} at step {step}", file=sys.stderr)
        if not self.enabled:
            return
        for name, module in modules.items():
            label = name or type(module).__name__
            self._handles.append(module.register_forward_hook(self._forward_hook(label)))
        if self.gradients:
            for name, param in self.model.named_parameters():
                if param.requires_grad:
                    self._handles.append(param.register_hook(self._grad_hook(name)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def check_loss(self, loss: torch.Tensor | float) -> None:
        if not self.enabled:
            return
        tensor = loss if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        if _is_finite(tensor):
            return
        if self.report is not None:  # already reported (and maybe inspected): never train on
            raise NonFiniteError(f"non-finite loss at step {self.step}; it started with: {self.report}")
        self._trip("loss", tensor)

    # The hooks: each closes over a name so the report can say exactly where the value appeared.
    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.report is None:
                for tensor in _tensors(output):
                    if not _is_finite(tensor):
                        self._trip(f"output of module {name!r} ({type(module).__name__})", tensor)
                        return

        return hook

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            if self.report is None and not _is_finite(grad):
                self._trip(f"gradient of parameter {name!r}", grad)

        return hook

    def _injector(self, step: int):
        def poison(tensor: torch.Tensor) -> torch.Tensor:
            mask = torch.zeros_like(tensor, dtype=torch.bool)
            mask.view(-1)[0] = True
            return tensor.masked_fill(mask, math.nan)  # stays differentiable, like a real overflow

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.step != step:
                return None
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                return poison(output)
            if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):  # (hidden, cache, ...)
                return (poison(output[0]), *output[1:])
            return None

        return hook

    def _trip(self, where: str, tensor: torch.Tensor) -> None:
        self.report = f"non-finite {where} at step {self.step}: {tensor_stats(tensor)}"
        print(self.report, file=sys.stderr, flush=True)
        if _breakpoint_requested():
            # Stopped by --break-on-nonfinite: `where` names the module, `tensor` is the value; go up the stack
            # for the module's forward and the batch. Continue and the run ends with NonFiniteError at the loss.
            breakpoint()
            return
        raise NonFiniteError(f"{self.report}. Run it under a debugger (or set PYTHONBREAKPOINT) to stop right here.")


def _parse_injection(value: str) -> tuple[str, int] | None:
    if not value:
        return None
    name, sep, step = value.rpartition(":")
    if not sep or not step.isdigit():
        raise ValueError(f"{INJECT_NAN_ENV}={value!r}: expected MODULE:STEP, e.g. layers.0.mlp:2")
    return name, int(step)
