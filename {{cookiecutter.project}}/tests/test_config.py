"""The config system: defaults < YAML < --debug profile < command line -> validated dataclasses, one-line errors,
shipped configs that hold only what they change."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import yaml

from {{ cookiecutter.package }}.config import (
    DEBUG_PROFILE,
    DebugConfig,
    ModelConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
    config_to_dict,
    debug_profile,
    load_config,
    parse_config,
    save_config,
)
from {{ cookiecutter.package }}.config.finetune import FinetuneConfig
from {{ cookiecutter.package }}.config.generate import GenerateConfig
from {{ cookiecutter.package }}.config.pretrain import DataConfig, PretrainConfig
{%- if cookiecutter.extra_projects in ["speech", "both"] %}
from {{ cookiecutter.package }}.config.speech import SpeechConfig
{%- endif %}
{%- if cookiecutter.extra_projects in ["vision", "both"] %}
from {{ cookiecutter.package }}.config.vision import VisionConfig
{%- endif %}
from {{ cookiecutter.package }}.model.presets import PRESETS, SHAPE_FIELDS, preset_fields

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The entry points with a --debug section and recipes in configs/ named after it (finetune-sft.yaml: finetune).
TRAINING_CONFIGS = [
    PretrainConfig,
    FinetuneConfig,
{%- if cookiecutter.extra_projects in ["vision", "both"] %}
    VisionConfig,
{%- endif %}
{%- if cookiecutter.extra_projects in ["speech", "both"] %}
    SpeechConfig,
{%- endif %}
]


def test_defaults_without_arguments():
    cfg, dbg = parse_config(PretrainConfig, [])
    assert cfg == PretrainConfig()
    assert dbg == DebugConfig()


@pytest.fixture
def yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: from-yaml\ntrain:\n  max_steps: 7\n  batch_size: 3\n  eval_every: 50\n  seed: 5\n"
        "optim:\n  betas: [0.8, 0.9]\n"
    )
    return path


@pytest.mark.parametrize("flag_first", [False, True])
def test_yaml_then_command_line_precedence(yaml_file, flag_first):
    files, flags = ["--config", str(yaml_file)], ["--train.max_steps", "20"]
    cfg, _ = parse_config(PretrainConfig, [*flags, *files] if flag_first else [*files, *flags])
    assert cfg.name == "from-yaml"
    assert cfg.train.max_steps == 20  # command line wins, before or after --config
    assert cfg.train.batch_size == 3  # the file beats the default
    assert cfg.train.grad_accum == TrainConfig().grad_accum  # untouched default
    assert cfg.optim.betas == (0.8, 0.9)
    assert isinstance(cfg.train, TrainConfig) and isinstance(cfg.model, ModelConfig)


@pytest.mark.parametrize(
    "argv",
    [
        ["--debug", "--train.max_steps", "30"],
        ["--train.max_steps", "30", "--debug"],
        ["--train.max_steps", "30", "--config", "YAML", "--debug"],
        ["--debug", "--config", "YAML", "--train.max_steps", "30"],
    ],
)
def test_flags_beat_the_debug_profile_which_beats_yaml(yaml_file, argv):
    argv = [str(yaml_file) if a == "YAML" else a for a in argv]
    cfg, dbg = parse_config(PretrainConfig, argv)
    assert dbg.debug
    assert cfg.train.max_steps == 30  # the flag, whatever the order
    assert cfg.train.eval_every == debug_profile(PretrainConfig)["train"]["eval_every"] == 1  # profile beats YAML
    if "--config" in argv:
        assert cfg.name == "from-yaml-debug" and cfg.train.seed == 5  # YAML keys the profile does not set stay
    else:
        assert cfg.name == "pretrain-debug" and cfg.train.seed == TrainConfig().seed


def _leaves(tree, prefix=""):
    """(dotted key, value) for every non-mapping value of a nested dict."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("cls", TRAINING_CONFIGS)
def test_every_debug_profile_value_beats_the_shipped_configs(cls):
    profile = debug_profile(cls)
    configs = sorted(CONFIGS.glob(f"{cls.debug_section}*.yaml"))
    assert configs and profile
    for path in configs:
        cfg, _ = parse_config(cls, ["--config", str(path), "--debug"])
        for key, value in _leaves(profile):
            assert _get(cfg, key) == value, (path.name, key)
        assert cfg.name == f"{parse_config(cls, ['--config', str(path)])[0].name}-debug"


def test_debug_profile_sections_are_the_ones_the_configs_name():
    sections = yaml.safe_load(DEBUG_PROFILE.read_text(encoding="utf-8"))
    assert set(sections) == {cls.debug_section for cls in TRAINING_CONFIGS}
    assert GenerateConfig.debug_section is None and debug_profile(GenerateConfig) is None
    cfg, dbg = parse_config(GenerateConfig, ["--debug"])
    assert dbg.debug and cfg == GenerateConfig()  # generate's --debug only picks the debug run's model


def test_debug_section_is_found_by_its_name_not_by_the_class_name(capsys):
    @dataclasses.dataclass
    class MyPretrain(PretrainConfig):  # another class name, the same section
        pass

    assert parse_config(MyPretrain, ["--debug"])[0].train == parse_config(PretrainConfig, ["--debug"])[0].train

    @dataclasses.dataclass
    class Misnamed(PretrainConfig):
        debug_section = "pretraining"

    with pytest.raises(SystemExit) as exit_info:  # a section missing from the file is an error, not "no profile"
        parse_config(Misnamed, ["--debug"])
    assert exit_info.value.code == 2 and "no section 'pretraining'" in capsys.readouterr().err


def test_debug_run_name_is_suffixed_once():
    assert parse_config(PretrainConfig, ["--debug", "--name", "mine"])[0].name == "mine-debug"
    assert parse_config(PretrainConfig, ["--debug", "--name", "mine-debug"])[0].name == "mine-debug"
    assert parse_config(FinetuneConfig, ["--debug", "--task", "classify"])[0].name == "finetune-classify-debug"


def test_debug_flags_are_top_level():
    argv = ["--debug", "--debugpy", "0.0.0.0:5678", "--wait-for-client", "--no-debugpy-all-ranks"]
    argv += ["--pycharm-debug", "localhost:9000", "--break-on-nonfinite"]
    cfg, dbg = parse_config(PretrainConfig, argv)
    assert dbg == DebugConfig(
        debug=True,
        debugpy="0.0.0.0:5678",
        wait_for_client=True,
        debugpy_all_ranks=False,
        pycharm_debug="localhost:9000",
        break_on_nonfinite=True,
    )
    assert cfg == parse_config(PretrainConfig, ["--debug"])[0]  # beyond the profile, nothing leaks into the config


def _field_default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _all_options(cls, defaults=None, prefix=""):
    """(option, default) for every field: a field's own default, or the value its parent's default gave it (the
    defaults of FinetuneConfig's optim are a FinetuneOptim's, not OptimConfig's)."""
    for f in dataclasses.fields(cls):
        value = _field_default(f) if defaults is None else getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            yield from _all_options(type(value), value, f"{prefix}{f.name}.")
        else:
            yield f"--{prefix}{f.name}", value


def _sections(cls):
    """``cls`` and the class of every nested section, through the fields' defaults."""
    yield cls
    for f in dataclasses.fields(cls):
        value = _field_default(f)
        if dataclasses.is_dataclass(value):
            yield from _sections(type(value))


def _repeated_defaults(cls) -> list[str]:
    """The fields ``cls`` redeclares with the default of the class it inherits them from."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    repeats = []
    for name in inspect.get_annotations(cls):
        parent = next((b for b in cls.__mro__[1:] if name in getattr(b, "__dataclass_fields__", {})), None)
        if name not in fields or parent is None:
            continue  # a field of its own, or a ClassVar
        if _field_default(fields[name]) == _field_default(parent.__dataclass_fields__[name]):
            repeats.append(f"{cls.__name__}.{name} repeats {parent.__name__}'s default")
    return repeats


@pytest.mark.parametrize("cls", [*TRAINING_CONFIGS, GenerateConfig])
def test_a_program_redeclares_only_the_defaults_it_changes(cls):
    """One home per default: a program's section (FinetuneTrain(TrainConfig)) redeclares a field only to change its
    default, never to repeat the shared one."""
    for section in _sections(cls):
        assert not _repeated_defaults(section)


def test_the_redeclared_default_check_catches_a_repeat():
    @dataclasses.dataclass
    class Repeats(TrainConfig):
        max_steps: int = TrainConfig().max_steps
        batch_size: int = TrainConfig().batch_size + 1

    assert _repeated_defaults(Repeats) == ["Repeats.max_steps repeats TrainConfig's default"]


def _help_entries(text: str) -> dict[str, str]:
    """Option -> its help text (whitespace collapsed), from argparse's "  --option ..." blocks."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("  --"):
            current = line.split()[0].rstrip(",")
            entries[current] = [line]
        elif line.startswith("    ") and current:
            entries[current].append(line)
        else:
            current = None
    return {option: " ".join(" ".join(lines).split()) for option, lines in entries.items()}


def _shown(value) -> str:
    return "null" if value is None else str(value)  # how jsonargparse prints a default


@pytest.mark.parametrize("cls", [*TRAINING_CONFIGS, GenerateConfig])
def test_help_lists_every_option_with_its_default(cls, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(cls, ["--help"])
    assert exit_info.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    options = dict(_all_options(cls))
    assert len(options) > 10
    for option, default in options.items():
        expected = " ".join(f"default: {_shown(default)})".split())  # a newline in a default is printed as is
        assert expected in entries[option], (option, entries[option])
    for f in dataclasses.fields(DebugConfig):
        flag = "--" + f.name.replace("_", "-")
        assert f"default: {_shown(f.default)})" in entries[flag], flag
    if cls is FinetuneConfig:  # the fine-tune defaults, not OptimConfig's / TrainConfig's
        assert options["--optim.lr"] != OptimConfig().lr and options["--train.max_steps"] != TrainConfig().max_steps


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--train.max_stepz", "3"], "unrecognized arguments: --train.max_stepz"),
        (["--train.max_steps", "many"], 'Parser key "train.max_steps"'),
        (["--train.precision", "fp16"], "train.precision"),
        (["--train.max_steps", "0"], "train.max_steps=0 is invalid"),
        (["--data.seq_len", "512", "--model.max_seq_len", "256"], "data.seq_len=512 exceeds model.max_seq_len=256"),
        (["--optim.min_lr", "1.0", "--optim.lr", "0.1"], "optim.min_lr"),
        (["--config", "does-not-exist.yaml"], "does-not-exist.yaml"),
        (["--train.resume", "runs/x/checkpoints"], "train.resume"),  # a path goes to train.resume_from
        (["--train.resume", "auto", "--train.resume_from", "x"], "train.resume_from='x' is invalid"),
        (["--model.preset", "gpt3"], "model.preset='gpt3' is unknown: expected one of tiny, gpt2-small, smollm2-135m"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(PretrainConfig, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in err


def test_unknown_key_in_yaml_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_config(PretrainConfig, ["--config", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_stepz" in err


def test_save_and_load_round_trip(tmp_path):
    cfg = PretrainConfig(
        name="x",
        model=ModelConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128),
        data=DataConfig(source="corpus.txt", subset="x", streaming=True, seq_len=64),
        optim=OptimConfig(lr=1e-3, betas=(0.8, 0.99)),
        train=TrainConfig(max_steps=5, resume_from="runs/x/checkpoints/step-000004", precision="fp32"),
        sample=SampleConfig(prompts=["A\n", "B"], top_k=None),
    )
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(PretrainConfig, path) == cfg
    assert config_to_dict(cfg)["optim"]["betas"] == [0.8, 0.99]  # plain lists, loadable with weights_only


def shape(model: ModelConfig) -> dict:
    return {name: getattr(model, name) for name in SHAPE_FIELDS}


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_preset_sets_the_whole_shape(name):
    cfg, _ = parse_config(PretrainConfig, ["--model.preset", name])
    assert shape(cfg.model) == shape(ModelConfig(**preset_fields(name))) and cfg.model.preset == name
    assert set(PRESETS[name]) == set(SHAPE_FIELDS)  # so that one preset replaces all of another


def test_tiny_is_the_default_model():
    assert shape(parse_config(PretrainConfig, ["--model.preset", "tiny"])[0].model) == shape(ModelConfig())


@pytest.mark.parametrize("preset_first", [False, True])
def test_every_explicit_field_beats_the_preset_wherever_it_comes_from(tmp_path, preset_first):
    """The preset is the layer just above the defaults: a file, the debug profile and a flag each override it field
    by field, whatever the order of the arguments, and a field equal to the default still counts as given."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  n_layers: 3\n  max_seq_len: 256\n")  # 256 is also ModelConfig's default
    preset, rest = ["--model.preset", "llama-3.2-1b"], ["--config", str(recipe), "--model.dim", "512"]
    cfg, _ = parse_config(PretrainConfig, [*preset, *rest] if preset_first else [*rest, *preset])
    model = cfg.model
    assert (model.n_layers, model.max_seq_len, model.dim) == (3, 256, 512)  # file, file, flag
    assert (model.n_heads, model.hidden_dim, model.vocab_size) == (32, 8192, 128256)  # the preset's
    assert model.rope_scaling.factor == 32.0 and model.rope_theta == 500000.0
    # a preset named in a file applies too, and the debug profile's tiny shape beats it
    recipe.write_text("model:\n  preset: smollm2-360m\n")
    debug, _ = parse_config(PretrainConfig, ["--config", str(recipe), "--debug"])
    assert debug.model.dim == debug_profile(PretrainConfig)["model"]["dim"] and debug.model.n_kv_heads == 2
    assert debug.model.vocab_size == 49152 and debug.model.preset == "smollm2-360m"


def test_a_preset_run_reloads_to_the_same_config(tmp_path):
    cfg, _ = parse_config(PretrainConfig, ["--model.preset", "llama-3.2-1b", "--model.n_layers", "2"])
    assert load_config(PretrainConfig, save_config(cfg, tmp_path / "config.yaml")) == cfg


def test_debug_profile_is_small_and_deterministic(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("train:\n  max_steps: 5000\n  batch_size: 64\n  grad_accum: 8\n  compile: always\n")
    cfg, _ = parse_config(PretrainConfig, ["--config", str(big), "--debug"])
    assert cfg.name == "pretrain-debug"
    assert cfg.model.dim <= 64 and cfg.model.n_layers <= 2
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    t = cfg.train
    assert (t.max_steps, t.batch_size, t.grad_accum, t.eval_every, t.save_every) == (20, 4, 1, 1, 0)
    assert t.precision == "fp32"
    assert t.deterministic and t.detect_anomaly and t.compile == "never" and t.overwrite
    assert not hasattr(cfg.data, "num_workers")  # pre-training reads a memmap in-process: no workers to turn off
    assert parse_config(PretrainConfig, ["--debug", "--train.compile", "always"])[0].train.compile == "always"


def test_debug_profile_applies_to_finetune_config():
    cfg, _ = parse_config(FinetuneConfig, ["--debug", "--data.num_workers", "2"])
    assert cfg.name == "finetune-sft-debug" and cfg.train.max_steps == 20 and cfg.data.max_seq_len == 128
    assert cfg.data.num_workers == 2  # an explicit flag wins over the profile's 0
    assert cfg.base_model is None  # resolved by finetune.resolve_base_model to the debug pre-training run


def _config_class(path: Path) -> type:
    return {cls.debug_section: cls for cls in TRAINING_CONFIGS}[path.stem.split("-")[0]]


def _without(tree: dict, dotted: str) -> dict:
    tree = json.loads(json.dumps(tree))  # a deep copy
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node[part]
    del node[last]
    return tree


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_hold_only_what_differs_from_the_defaults(path):
    """The one-home rule of the config package: every key of a recipe changes the parsed config, so that no default
    lives in a YAML file too (and a changed dataclass default is never silently shadowed by a stale copy)."""
    cls = _config_class(path)
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg, _ = parse_config(cls, ["--config", str(path)])
    assert cfg != cls()
    for key, _value in _leaves(recipe):
        reduced, _ = parse_config(cls, ["--config", json.dumps(_without(recipe, key))])
        assert reduced != cfg, f"{path.name}: {key} repeats its default; remove it (one home per default)"


def test_the_one_home_check_catches_a_repeated_default():
    train = {"max_steps": 300, "batch_size": TrainConfig().batch_size}
    recipe = {"train": train}
    cfg, _ = parse_config(PretrainConfig, ["--config", json.dumps(recipe)])
    assert parse_config(PretrainConfig, ["--config", json.dumps(_without(recipe, "train.batch_size"))])[0] == cfg
    assert parse_config(PretrainConfig, ["--config", json.dumps(_without(recipe, "train.max_steps"))])[0] != cfg
