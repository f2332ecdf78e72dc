"""Typed configuration dataclasses, one small module per program, and the one parser that fills them.

Every entry point does the same two things::

    cfg, dbg = parse_config(PretrainConfig, argv)   # the four layers below, validated
    save_config(cfg, run_dir / "config.yaml")       # the resolved config travels with the run

Precedence, lowest to highest, whatever the order of the arguments:

1. the dataclass defaults;
2. the model preset, where ``model.preset`` names one (in a file or a flag): the shape of a published model from
   ``model/presets.py`` (``--model.preset smollm2-135m``); each field a later layer gives replaces the preset's;
3. ``--config FILE`` (YAML; several files apply in the order given);
4. the ``--debug`` profile: the section of ``config/profiles/debug.yaml`` that the program's config names
   (``PretrainConfig.debug_section = "pretrain"``; tiny, fast, deterministic);
5. explicit command-line flags (``--debug --train.max_steps 30`` trains 30 steps).

``--debug`` also appends ``-debug`` to the run name after all five layers, so that a debug run never writes into a
real run's directory, whatever ``--name`` says. :func:`.parse.parse_config` is the only place that applies them.

Where things live: ``base.py`` holds the sections every program shares (model, optimizer, training loop, sampling,
LoRA, debug flags); each program's own module (``pretrain.py``, ``finetune.py``, ``generate.py``, ...) holds its
top-level config and the sections only it has; ``parse.py`` holds the parser and the YAML round trip. Import a
program's config from its module (``from .config.pretrain import PretrainConfig``); the shared sections, the
errors and the parser are re-exported here.

One home per default: every default lives in one dataclass field. A program that trains with other defaults than a
shared section's subclasses it and redeclares only those fields (``FinetuneTrain(TrainConfig)``), and
tests/test_config.py checks that every redeclared default differs from the one it replaces. A YAML file in
``configs/`` is a recipe holding only what it changes (each of its keys changes the parsed config; tested too): the
recipes tune the shipped demo, e.g. its small model trains well with a higher learning rate than the defaults, which
suit your own models. "Work it out from the rest" is ``None``, resolved by a named function where it is used
(``finetune.resolve_base_model``, ``generate.resolve_model``), and a choice the program can make by itself is
``auto`` / ``always`` / ``never`` (:data:`.base.Auto`): each value of an option has one meaning.

The schema *is* the dataclasses: nested fields become dotted options (``--train.max_steps 20``), ``--help`` lists
every option with its type and default, and a YAML file written by :func:`.parse.save_config` can be passed back with
``--config``. The debug flags (:class:`.base.DebugConfig`) are top-level on every entry point (``--debug``,
``--debugpy``, ...). Parsing is done by jsonargparse; this package only adds the layering and the one-line error
report (exit code 2, no traceback).
"""

from .base import (
    Auto,
    ConfigError,
    DebugConfig,
    EarlyStoppingConfig,
    LoraSettings,
    ModelConfig,
    OptimConfig,
    RopeScaling,
    SampleConfig,
    TrainConfig,
    fail,
)
from .parse import (
    DEBUG_PROFILE,
    ToolParser,
    build_parser,
    config_to_dict,
    config_to_yaml,
    debug_profile,
    debug_run_dir,
    load_config,
    parse_config,
    save_config,
)

__all__ = [
    "DEBUG_PROFILE",
    "Auto",
    "ConfigError",
    "DebugConfig",
    "EarlyStoppingConfig",
    "LoraSettings",
    "ModelConfig",
    "OptimConfig",
    "RopeScaling",
    "SampleConfig",
    "ToolParser",
    "TrainConfig",
    "build_parser",
    "config_to_dict",
    "config_to_yaml",
    "debug_profile",
    "debug_run_dir",
    "fail",
    "load_config",
    "parse_config",
    "save_config",
]
