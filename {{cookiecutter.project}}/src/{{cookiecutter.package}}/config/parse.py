"""The one parser that fills a program's config (the layers of the package docstring) and the YAML round trip."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .base import DebugConfig, fail

C = TypeVar("C")

DEBUG_PROFILE = Path(__file__).with_name("profiles") / "debug.yaml"

# Help text for the top-level debug flags; behaviour lives in debug.py.
_DEBUG_HELP = {
    "debug": "apply the debug profile over --config (tiny model, few steps, num_workers=0, deterministic, no compile, "
    "fp32, anomaly detection, eval every step; explicit flags still win) and name the run <name>-debug",
    "debugpy": "start a debugpy server on [HOST:]PORT (default host 127.0.0.1; port 0 = a free port, printed). "
    "Editor port forwarding reaches 127.0.0.1 in a dev container; 0.0.0.0 lets anyone who reaches the port run "
    "code: use it only in a container whose port is published on the host's 127.0.0.1 (docker run -p)",
    "wait_for_client": "with --debugpy: block until the IDE attaches",
    "debugpy_all_ranks": "under torchrun every rank listens on PORT + RANK (--no-debugpy-all-ranks: rank 0 only)",
    "pycharm_debug": "connect to PyCharm's Python Debug Server at HOST:PORT (pip install pydevd-pycharm)",
    "break_on_nonfinite": "stop at the first NaN/Inf activation, loss or gradient (module name, step, stats)",
}


def build_parser(cls: type, *, prog: str | None = None):
    """The jsonargparse parser for ``cls`` plus ``--config`` and the top-level debug flags (exposed for tests)."""
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    parser = ArgumentParser(
        prog=prog,
        description=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None,
        exit_on_error=False,  # we report errors ourselves: one line, exit code 2
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_class_arguments(cls, fail_untyped=True, sub_configs=True)
    add_debug_flags(parser, ActionYesNo(no_prefix="no-"), str | None)
    return parser


def add_debug_flags(parser: argparse.ArgumentParser, yes_no: Any, text: Any) -> None:
    """The top-level :class:`DebugConfig` flags, with ``yes_no`` the action of a ``--flag`` / ``--no-flag`` pair
    and ``text`` the type of the others (jsonargparse's and argparse's differ)."""
    for f in dataclasses.fields(DebugConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=yes_no, default=f.default, help=_DEBUG_HELP[f.name])
        else:
            parser.add_argument(flag, type=text, default=f.default, help=_DEBUG_HELP[f.name])


def debug_run_dir(run_dir: str | Path, debug: bool) -> Path:
    """``run_dir``, or under ``--debug`` the run the same training wrote with ``--debug`` (its name + ``-debug``, as
    :func:`parse_config` names it): what a tool that reads a run (``predict``, ``evaluate``) takes."""
    path = Path(run_dir)
    return path.with_name(path.name + "-debug") if debug and not path.name.endswith("-debug") else path


class ToolParser(argparse.ArgumentParser):
    """The parser of the tools that take positional arguments (``predict RUN_DIR INPUTS...``, ``evaluate RUN_DIR``)
    where the programs' config dataclasses take only options: argparse, with the debug flags, and any error one line
    with exit code 2 as everywhere else."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        add_debug_flags(self, argparse.BooleanOptionalAction, str)

    def error(self, message: str):  # argparse's usage + message -> one line
        fail(message)

    def parse_tool_args(self, argv: list[str] | None = None) -> tuple[argparse.Namespace, DebugConfig]:
        """(the tool's own arguments, the debug flags); options may come before, between or after positionals."""
        ns = self.parse_intermixed_args(sys.argv[1:] if argv is None else list(argv))
        names = [f.name for f in dataclasses.fields(DebugConfig)]
        dbg = DebugConfig(**{name: getattr(ns, name) for name in names})
        for name in names:
            delattr(ns, name)
        return ns, dbg


def parse_config(cls: type[C], argv: list[str] | None = None, *, prog: str | None = None) -> tuple[C, DebugConfig]:
    """Parse the layers of the package docstring into ``cls`` and the top-level :class:`DebugConfig`.

    Any error (unknown key, wrong type, failed validation, missing file) prints one line to stderr and exits with
    code 2; ``--help`` prints every option with its default and exits 0.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(cls, prog=prog)
    files, flags = _split_config_files(argv)
    try:
        ns = parser.parse_args([*files, *flags])
        profile = debug_profile(cls) if ns["debug"] else None
        preset = model_preset_layer(ns)
        if profile or preset:  # jsonargparse applies arguments in order: the preset first, the profile before flags
            ns = parser.parse_args([*preset, *files, *_config_arg(profile), *flags])
        debug_names = [f.name for f in dataclasses.fields(DebugConfig)]
        dbg = DebugConfig(**{name: ns[name] for name in debug_names})
        for name in [*debug_names, "config"]:
            del ns[name]
        cfg = parser.instantiate(ns)
        cfg = cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})  # Namespace -> the dataclass itself
        if profile and not cfg.name.endswith("-debug"):
            cfg = dataclasses.replace(cfg, name=f"{cfg.name}-debug")
    except SystemExit:  # --help / --print_config exit through argparse
        raise
    except Exception as exc:  # jsonargparse raises ArgumentError / TypeError; __post_init__ raises ValueError
        fail(_one_line(exc))
    return cfg, dbg


def _split_config_files(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the ``--config FILE`` arguments in their order, every other argument in its order)."""
    files: list[str] = []
    flags: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            files += argv[i : i + 2]
            i += 2
            continue
        (files if argv[i].startswith("--config=") else flags).append(argv[i])
        i += 1
    return files, flags


def model_preset_layer(ns: Any) -> list[str]:
    """``["--config", <the preset's fields as JSON>]`` when the parsed ``model.preset`` names one, else ``[]``.
    Read from a first parse of every layer, so the name may come from a file or a flag; an unknown name is a
    ValueError listing the known ones."""
    if "model.preset" not in ns or ns["model.preset"] is None:
        return []
    from ..model.presets import preset_fields  # imported here: the shapes live with the model, above config/

    return _config_arg({"model": preset_fields(ns["model.preset"])})


def _config_arg(layer: dict[str, Any] | None) -> list[str]:
    return ["--config", json.dumps(layer)] if layer else []


def debug_profile(cls: type) -> dict[str, Any] | None:
    """The ``--debug`` overlay for ``cls``: the section of :data:`DEBUG_PROFILE` that ``cls.debug_section`` names;
    None for a program that takes none (``generate``). A section name missing from the file is an error, not a
    silent run without the profile."""
    if cls.debug_section is None:
        return None
    sections = yaml.safe_load(DEBUG_PROFILE.read_text(encoding="utf-8"))
    if cls.debug_section not in sections:
        raise ValueError(f"{DEBUG_PROFILE.name} has no section {cls.debug_section!r} (it has {sorted(sections)})")
    return sections[cls.debug_section]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dicts, lists and scalars (tuples become lists): what YAML, JSON and ``torch.load(weights_only=True)``
    all accept."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML; ``--config path`` reproduces the run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config_to_yaml(cfg), encoding="utf-8")
    tmp.replace(path)
    return path


def load_config(cls: type[C], path: str | Path) -> C:
    """Read a YAML written by :func:`save_config` (or any partial one) back into ``cls`` with the same validation."""
    cfg, _ = parse_config(cls, ["--config", str(path)])
    return cfg
