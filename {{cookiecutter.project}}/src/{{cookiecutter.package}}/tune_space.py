"""The search space of ``python -m <package>.tune``: a YAML file, read and checked before any trial runs.

::

    program: pretrain                 # the training program each trial runs (python -m <package>.<program>)
    config: configs/pretrain.yaml     # its recipe: a path or a list of paths, applied in order
    trials: 12                        # trials of the whole study, over every worker
    pruner: median                    # median | successive_halving | none
    overrides:                        # config values every trial gets (dotted paths), e.g. a budget per trial
      train.max_steps: 200
    params:                           # dotted config path -> distribution
      optim.lr: {low: 1.0e-4, high: 3.0e-2, log: true}    # a float field: uniform, or log-uniform with log: true
      train.batch_size: {low: 8, high: 64, log: true}     # an int field: integers, both ends included (step, log)
      lora.target_modules: {choices: [[q_proj, v_proj], [all-linear]]}   # any field: one of these values

A range's kind (float or int) is the type of the config field it names. Every mistake (an unknown path, an empty
range, a value the field cannot take) is a :class:`ConfigError`: one line, exit 2, before anything runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, parse_config

PRUNERS = ("median", "successive_halving", "none")
KEYS = {"program", "config", "trials", "pruner", "overrides", "params"}


@dataclass
class Param:
    """One searched config value: a float or int range, or a list of choices."""

    path: str
    kind: str  # "float" | "int" | "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list[Any] = field(default_factory=list)

    def suggest(self, trial: Any) -> Any:
        """The value of this parameter for an Optuna ``trial`` (its name is the config path)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.path, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.path, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.log)

    def sample(self) -> Any:
        """A value inside the space (its low end or first choice): what the up-front check parses."""
        return self.choices[0] if self.kind == "categorical" else self.low


@dataclass
class Space:
    program: str
    configs: list[str]
    trials: int
    pruner: str
    overrides: dict[str, Any]
    params: list[Param]
    source: Path

    @property
    def module(self) -> Any:
        return importlib.import_module(f"{__package__}.{self.program}")

    @property
    def config_class(self) -> type:
        return typing.get_type_hints(self.module.run)["cfg"]

    def argv(self, values: dict[str, Any], debug: bool) -> list[str]:
        """The program's arguments for one trial: the recipes, the overrides, the --debug profile over them, the
        searched values over that (so a --debug study still searches them)."""
        files = [arg for path in self.configs for arg in ("--config", path)]
        flags = [arg for path, value in values.items() for arg in (f"--{path}", json.dumps(value))]
        return [*files, "--config", json.dumps(nested(self.overrides)), *(["--debug"] if debug else []), *flags]

    def config(self, values: dict[str, Any], debug: bool) -> Any:
        """The trial's config, parsed and validated like the program's own command line (exit 2 on bad values)."""
        return parse_config(self.config_class, self.argv(values, debug), prog=f"tune trial of {self.program}")[0]

    def recipe(self, values: dict[str, Any]) -> dict[str, Any]:
        """The recipes, the overrides and ``values`` merged into one recipe that ``--config`` takes as is."""
        merged: dict[str, Any] = {}
        for path in self.configs:
            merge(merged, yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {})
        return merge(merge(merged, nested(self.overrides)), nested(values))


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """Dotted paths to nested mappings: ``optim.lr`` becomes ``optim`` holding ``lr``."""
    tree: dict[str, Any] = {}
    for path, value in dotted.items():
        *parents, last = path.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` into ``base`` (nested dicts merged, anything else replaced); returns ``base``."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def field_type(cls: type, path: str) -> Any:
    """The type of the config field at dotted ``path`` (``Optional`` unwrapped); ConfigError for an unknown one."""
    node: Any = cls
    for i, part in enumerate(parts := path.split(".")):
        fields = {f.name for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else set()
        if part not in fields:
            where = ".".join(parts[:i]) or cls.__name__
            raise ConfigError(f"unknown config path {path!r}: {where} has no field {part!r}")
        node = typing.get_type_hints(node)[part]
        if isinstance(node, types.UnionType) or typing.get_origin(node) is typing.Union:
            node = next(arg for arg in typing.get_args(node) if arg is not type(None))
    return node


def _param(cls: type, path: str, spec: Any) -> Param:
    kind = field_type(cls, path)
    if not isinstance(spec, dict) or not ({"choices"} <= spec.keys() or {"low", "high"} <= spec.keys()):
        expected = "expected low and high (log, step optional), or choices"
        raise ConfigError(f"params.{path}: {expected}, got {spec!r}")
    if "choices" in spec:
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise ConfigError(f"params.{path}: empty choices")
        return Param(path, "categorical", choices=spec["choices"])
    if kind not in (int, float):
        raise ConfigError(f"params.{path}: a range needs an int or float field, this one is {kind}: use choices")
    low, high, log, step = spec["low"], spec["high"], bool(spec.get("log", False)), spec.get("step")
    numbers = (low, high) if step is None else (low, high, step)
    if not all(isinstance(v, int if kind is int else int | float) and not isinstance(v, bool) for v in numbers):
        raise ConfigError(f"params.{path}: low, high and step must be {kind.__name__} numbers, got {numbers}")
    if not low < high:
        raise ConfigError(f"params.{path}: empty range [{low}, {high}] (low must be below high)")
    if log and (low <= 0 or step is not None):
        raise ConfigError(f"params.{path}: a log range needs low > 0 and no step")
    return Param(path, kind.__name__, low, high, log, step)


def load_space(path: str | Path, trials: int | None = None, pruner: str | None = None) -> Space:
    """Read and check the space file ``path`` (see the module docstring); ``trials``/``pruner`` override its own."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"tune space {path}: {' '.join(str(err).split())}") from err
    if not isinstance(raw, dict) or "program" not in raw or not raw.get("params"):
        raise ConfigError(f"tune space {path}: expected a mapping with program and params")
    if unknown := sorted(set(raw) - KEYS):
        raise ConfigError(f"tune space {path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
    configs = raw.get("config") or []
    space = Space(
        program=str(raw["program"]),
        configs=[str(c) for c in (configs if isinstance(configs, list) else [configs])],
        trials=int(trials or raw.get("trials", 10)),
        pruner=str(pruner or raw.get("pruner", "median")),
        overrides=dict(raw.get("overrides") or {}),
        params=[],
        source=path,
    )
    if space.pruner not in PRUNERS or space.trials < 1:
        raise ConfigError(f"tune space {path}: pruner must be one of {', '.join(PRUNERS)} and trials >= 1")
    try:
        cls, _ = space.config_class, space.module.reported_metrics
    except (ImportError, AttributeError, KeyError) as err:
        raise ConfigError(f"tune space {path}: program {space.program!r} is not a training program here") from err
    if missing := [c for c in space.configs if not Path(c).is_file()]:
        raise ConfigError(f"tune space {path}: config file {missing[0]} not found")
    for key in space.overrides:
        field_type(cls, key)
    space.params = [_param(cls, key, spec) for key, spec in raw["params"].items()]
    return space
