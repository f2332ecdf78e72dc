"""Run-time choices every training entry point makes the same way: whether to ``torch.compile`` the model.

``train.compile: auto`` (the default) compiles on CUDA, where fusing the many small elementwise kernels of a step and
removing Python overhead pays for the compile time many times over, and stays eager everywhere a person is looking:
``--debug`` (its profile sets ``compile: false``), ``--break-on-nonfinite`` (its hooks inspect every module's output)
and an attached debugger (a breakpoint inside a compiled module does not stop). On a CPU the compile time (a C++
toolchain, minutes for a real model) is rarely won back in the short runs people do there. ``true`` / ``false`` force
it either way; a ``--train.compile`` flag beats the ``--debug`` profile like any other flag.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
from torch import nn

from .debug import debugger_attached
from .train.distributed import get_rank

if TYPE_CHECKING:
    from .config import DebugConfig


def compile_decision(setting: bool | str, device: torch.device, dbg: DebugConfig) -> tuple[bool, str]:
    """(compile or not, why) for ``train.compile`` = ``setting`` on ``device`` with the debug flags ``dbg``."""
    if dbg.break_on_nonfinite:
        return False, "--break-on-nonfinite inspects every module eagerly"
    if setting is True or setting == "true":
        return True, "train.compile true"
    if setting is False or setting == "false":
        return False, "train.compile false"
    if debugger_attached():
        return False, "a debugger is attached: breakpoints inside a compiled model would not stop"
    if device.type != "cuda":
        return False, f"train.compile auto compiles on CUDA only, this run is on {device.type}"
    return True, "train.compile auto on CUDA"


def maybe_compile(
    model: nn.Module, setting: bool | str, device: torch.device, dbg: DebugConfig, *, fullgraph: bool = False
) -> nn.Module:
    """``torch.compile(model)`` when :func:`compile_decision` says so, else ``model``; one line either way.

    ``fullgraph=True`` (our LlamaLM) turns a graph break into an error instead of a silent slowdown.
    """
    use, why = compile_decision(setting, device, dbg)
    if get_rank() == 0:
        state = "on" if use else "off"
        print(f"compile: {state} ({why})", file=sys.stderr if not use else sys.stdout, flush=True)
    return torch.compile(model, fullgraph=fullgraph) if use else model
