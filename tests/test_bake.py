"""Bake every named combination and check the structure of what comes out."""

from __future__ import annotations

import ast
import json
import re
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from conftest import COMBINATIONS, TEMPLATE, bake
from conftest import answers as default_answers
from ide_configs import strip_jsonc

CHOICE_VARIABLES = {
    name: values for name, values in json.loads((TEMPLATE / "cookiecutter.json").read_text()).items()
    if isinstance(values, list) and not name.startswith("_")
}  # fmt: skip
JINJA = re.compile(r"\{\{|\}\}|\{%|%\}")
# Files whose content is Jinja on purpose for another tool (none are rendered by cookiecutter).
JINJA_ALLOWED: set[str] = set()
ALWAYS = {
    ".cookiecutter.json",
    ".gitignore",
    ".pre-commit-config.yaml",
    "Makefile",
    "README.md",
    "pyproject.toml",
    "configs/pretrain.yaml",
    "configs/finetune-sft.yaml",
    "configs/finetune-classify.yaml",
}
PACKAGE_MODULES = [
    "__init__.py",
    "config/__init__.py",
    "config/base.py",
    "config/parse.py",
    "config/pretrain.py",
    "config/finetune.py",
    "config/generate.py",
    "config/profiles/debug.yaml",
    "cli.py",
    "debug.py",
    "metrics.py",
    "pretrain.py",
    "finetune.py",
    "generate.py",
    "tune.py",
    "tune_space.py",
    "tune_report.py",
    "predict.py",
    "classifiers/__init__.py",
    "classifiers/classify.py",
    "evaluate.py",
    "plan.py",
    "data/benchmark.py",
    "bench.py",
    "bench_timing.py",
    "bench_loader.py",
    "model/attention.py",
    "model/transformer.py",
    "model/lm.py",
    "model/hf.py",
    "model/presets.py",
    "model/seq2seq.py",
    "data/tokenizer.py",
    "data/corpus.py",
    "data/sources.py",
    "data/token_cache.py",
    "data/sft.py",
    "data/classify.py",
    "train/step.py",
    "train/loop.py",
    "train/checkpoint.py",
    "train/stopping.py",
    "train/optim.py",
    "train/distributed.py",
]


@pytest.fixture(scope="module")
def pristine_projects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Baked for this module alone: other tests run tools inside the shared bakes and leave outputs there."""
    root = tmp_path_factory.mktemp("pristine")
    return {name: bake(root / name, **context) for name, context in COMBINATIONS.items()}


def answers(name: str) -> dict[str, str]:
    return default_answers(**COMBINATIONS[name])


def files_of(root: Path) -> set[str]:
    return {
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and ".git" not in path.relative_to(root).parts
    }


def expected_files(name: str) -> set[str]:
    """The template's own file list, with names rendered and the unselected parts removed: the exact set."""
    ctx = answers(name)
    source = TEMPLATE / "{{cookiecutter.project}}"
    expected = set()
    for path in files_of(source):
        rendered = path.replace("{{cookiecutter.package}}", ctx["package"]).replace(
            "{{cookiecutter.project}}", ctx["project"]
        )
        top = rendered.split("/")[0]
        if top == ".licenses" or "__pycache__" in rendered:
            continue
        if (top == ".idea" and ctx["ide"] == "vscode") or (top == ".vscode" and ctx["ide"] == "pycharm"):
            continue
        if top == ".devcontainer" and ctx["devcontainer"] == "no":
            continue
        expected.add(rendered)
    for project, files in extra_project_files().items():
        if ctx["extra_projects"] not in (project, "both"):
            gone = [f.format(package=ctx["package"]) for f in files]  # files, and folders with all they hold
            expected = {e for e in expected if not any(e == g or e.startswith(g + "/") for g in gone)}
    expected.add(".cookiecutter.json")
    if ctx["license"] != "none":
        expected.add("LICENSE")
    return expected


def extra_project_files() -> dict[str, list[str]]:
    """The post-gen hook's EXTRA_PROJECT_FILES, read from its source (the hook is a Jinja template, not importable)."""
    tree = ast.parse((TEMPLATE / "hooks" / "post_gen_project.py").read_text())
    (value,) = [
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["EXTRA_PROJECT_FILES"]
    ]
    return ast.literal_eval(value)


# What would betray an extra project that was not chosen, anywhere in the project.
TRACES = {
    "vision": re.compile(r"\.vision\b|vision\.(yaml|md)|VisionConfig|ResNet|data\.images|image_augment|^vision:", re.M),
    "speech": re.compile(r"\.speech\b|speech\.(yaml|md)|SpeechConfig|Conformer|audio_|^speech:", re.M),
}


# Values baked by a dedicated test instead of the matrix (creating a venv installs packages).
BAKED_ELSEWHERE = {"create_venv": {"yes"}}  # test_hooks.py::test_venv_failure_warns_and_keeps_the_project


def test_every_choice_value_is_baked() -> None:
    for variable, values in CHOICE_VARIABLES.items():
        baked_values = {answers(name)[variable] for name in COMBINATIONS} | BAKED_ELSEWHERE.get(variable, set())
        missing = set(values) - baked_values
        assert not missing, f"no named combination bakes {variable}={sorted(missing)}"


@pytest.mark.parametrize("name", COMBINATIONS)
def test_exact_file_set(name: str, pristine_projects: dict[str, Path]) -> None:
    project = pristine_projects[name]
    ctx = answers(name)
    assert project.name == ctx["project"]
    found = files_of(project)
    assert found == expected_files(name), (
        f"missing {sorted(expected_files(name) - found)}; unexpected {sorted(found - expected_files(name))}"
    )
    assert found >= ALWAYS
    package = f"src/{ctx['package']}"
    assert {f"{package}/{module}" for module in PACKAGE_MODULES} <= found
    assert ("LICENSE" in found) == (ctx["license"] != "none")
    assert (".idea/misc.xml" in found) == (ctx["ide"] in ("both", "pycharm"))
    assert any(f.startswith(".idea/runConfigurations/") for f in found) == (ctx["ide"] in ("both", "pycharm"))
    assert (".vscode/launch.json" in found) == (ctx["ide"] in ("both", "vscode"))
    assert (".devcontainer/devcontainer.json" in found) == (ctx["devcontainer"] == "yes")
    assert (".devcontainer/Dockerfile" in found) == (ctx["devcontainer"] == "yes")
    assert not any(f.startswith(".licenses") for f in found)
    for extra in ("vision", "speech"):
        chosen = ctx["extra_projects"] in (extra, "both")
        assert (f"{package}/{extra}.py" in found) == chosen
        assert (f"configs/{extra}.yaml" in found) == chosen


@pytest.mark.parametrize("name", COMBINATIONS)
def test_unchosen_extra_projects_leave_no_trace(name: str, pristine_projects: dict[str, Path]) -> None:
    """Not only their files: no mention in the config, the debug profile, the README, the Makefile or the IDEs."""
    project, ctx = pristine_projects[name], answers(name)
    listed = {f.format(package=ctx["package"]) for files in extra_project_files().values() for f in files}
    for extra, trace in TRACES.items():
        if ctx["extra_projects"] in (extra, "both"):
            continue
        hits = [
            f"{relative}: {match.group(0)}"
            for relative in sorted(files_of(project) - listed)
            if not relative.startswith("src/" + ctx["package"] + "/data/builtin")
            for match in [trace.search((project / relative).read_text(encoding="utf-8", errors="ignore"))]
            if match
        ]
        assert not hits, f"{extra} was not chosen but is mentioned:\n" + "\n".join(hits)


@pytest.mark.parametrize("name", COMBINATIONS)
def test_no_unrendered_jinja(name: str, pristine_projects: dict[str, Path]) -> None:
    project = pristine_projects[name]
    leftovers = []
    for relative in sorted(files_of(project) - JINJA_ALLOWED):
        data = (project / relative).read_bytes()
        if b"\0" in data:
            continue  # binary data (the spoken-command set), copied as it is
        text = data.decode("utf-8", errors="ignore")
        for number, line in enumerate(text.splitlines(), 1):
            if JINJA.search(line):
                leftovers.append(f"{relative}:{number}: {line.strip()[:100]}")
    assert not leftovers, "unrendered Jinja:\n" + "\n".join(leftovers)


@pytest.mark.parametrize("name", COMBINATIONS)
def test_every_file_parses(name: str, pristine_projects: dict[str, Path]) -> None:
    project = pristine_projects[name]
    checked = 0
    for relative in sorted(files_of(project)):
        path = project / relative
        text = path.read_text(encoding="utf-8", errors="ignore")
        suffix = path.suffix
        if suffix == ".py":
            compile(text, relative, "exec", flags=ast.PyCF_ONLY_AST)
        elif suffix == ".toml":
            tomllib.loads(text)
        elif suffix == ".json" and relative.startswith((".vscode/", ".devcontainer/")):
            json.loads(strip_jsonc(text))
        elif suffix == ".json":
            json.loads(text)
        elif suffix == ".jsonl":
            for line in text.splitlines():
                json.loads(line)
        elif suffix in (".yaml", ".yml"):
            yaml.safe_load(text)
        elif suffix in (".xml", ".iml"):
            ET.fromstring(text)
        else:
            continue
        checked += 1
    assert checked >= 25


def test_recorded_answers_regenerate_the_same_project(pristine_projects: dict[str, Path], tmp_path: Path) -> None:
    """The answers written to .cookiecutter.json are enough to bake the identical project again."""
    original = pristine_projects["custom-names"]
    record = json.loads((original / ".cookiecutter.json").read_text())
    assert record["context"] == {k: v for k, v in answers("custom-names").items() if not k.startswith("_")}
    again = bake(tmp_path, **record["context"])
    assert files_of(again) == files_of(original)
    for relative in files_of(original) - {".cookiecutter.json"}:
        assert (again / relative).read_bytes() == (original / relative).read_bytes(), relative


def test_answers_are_data_not_code(pristine_projects: dict[str, Path]) -> None:
    """Quotes, triple quotes and braces in answers land verbatim where they are used."""
    project = pristine_projects["custom-names"]
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    assert pyproject["project"]["authors"][0]["name"] == 'Ann "Quote" O\'Neil'
    assert pyproject["project"]["description"] == 'Says """hi""" and {braces}'
    assert pyproject["project"]["name"] == "my-llm2"
    init = (project / "src/my_llm_core/__init__.py").read_text()
    assert ast.get_docstring(ast.parse(init)) is not None


def test_git_repository_initialised(pristine_projects: dict[str, Path]) -> None:
    assert (pristine_projects["defaults"] / ".git").is_dir()
