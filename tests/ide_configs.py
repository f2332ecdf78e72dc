"""Read a generated project's IDE files and translate each configuration into the command the IDE would run.

PyCharm (``.idea/runConfigurations/*.xml``): Python configurations become
``[python, *INTERPRETER_OPTIONS, (-m SCRIPT_NAME | SCRIPT_NAME), *PARAMETERS]`` in ``WORKING_DIRECTORY`` with the parent
environment + ``<envs>`` + ``PYTHONUNBUFFERED=1`` + ``PYTHONPATH`` of the content/source roots; pytest configurations
become ``python -m pytest <target> <args>``. VS Code (``.vscode/launch.json``, ``tasks.json``): variables resolved the
way VS Code resolves them, ``${command:python.interpreterPath}`` being the selected interpreter.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


class Unresolvable(Exception):
    """A variable only VS Code itself can resolve (``${file}``, ``${input:..}``, most ``${command:..}``)."""


@dataclass
class Command:
    name: str
    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)  # the variables the configuration sets (on top of the parent)

    def full_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(OFFLINE_ENV)
        env.update(self.env)
        return env


def base_env() -> dict[str, str]:
    """The parent environment an IDE starts with: no PYTHONPATH, so the configuration must provide the sources."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OFFLINE_ENV)
    return env


def strip_jsonc(text: str) -> str:
    """Remove // and /* */ comments outside strings; trailing commas stay (and then fail json.loads: strict)."""
    out, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def load_jsonc(path: Path) -> Any:
    return json.loads(strip_jsonc(path.read_text(encoding="utf-8")))


# --------------------------------------------------------------------------------------------- VS Code


_VAR = re.compile(r"\$\{([^}]+)\}")


def resolve(value: Any, workspace: Path, python: str = sys.executable) -> Any:
    """Substitute VS Code variables in strings, lists and dicts."""
    if isinstance(value, dict):
        return {k: resolve(v, workspace, python) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, workspace, python) for v in value]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match) -> str:
        name = match.group(1)
        if name == "workspaceFolder":
            return str(workspace)
        if name == "workspaceFolderBasename":
            return workspace.name
        if name == "pathSeparator":
            return os.sep
        if name.startswith("env:"):
            return os.environ.get(name[4:], "")
        if name == "command:python.interpreterPath":
            return python
        raise Unresolvable(f"${{{name}}} is resolved by VS Code itself")

    return _VAR.sub(sub, value)


def launch_configs(project: Path) -> list[dict]:
    return load_jsonc(project / ".vscode" / "launch.json")["configurations"]


def tasks(project: Path) -> list[dict]:
    return json.loads((project / ".vscode" / "tasks.json").read_text(encoding="utf-8"))["tasks"]


def with_vscode_defaults(config: dict, project: Path, python: str = sys.executable) -> dict:
    """A launch configuration as VS Code hands it to debugpy: variables resolved, its defaults added."""
    resolved = resolve(config, project, python)
    resolved.setdefault("cwd", str(project))
    resolved.setdefault("console", "integratedTerminal")
    resolved.setdefault("justMyCode", True)
    if resolved["request"] == "launch":
        resolved.setdefault("python", [python])
        env_file = Path(resolved.get("envFile", project / ".env"))
        if env_file.is_file():  # VS Code merges the env file under the configuration's own env
            file_env = dict(
                line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line and line[0] != "#"
            )
            resolved["env"] = {**file_env, **resolved.get("env", {})}
    return resolved


def vscode_launch_command(config: dict, project: Path, python: str = sys.executable) -> Command:
    cfg = resolve(config, project, python)
    target = ["-m", cfg["module"]] if "module" in cfg else [cfg["program"]]
    argv = [python, *cfg.get("pythonArgs", []), *target, *cfg.get("args", [])]
    return Command(cfg["name"], argv, Path(cfg.get("cwd", project)), dict(cfg.get("env", {})))


def vscode_task_command(task: dict, project: Path, python: str = sys.executable) -> Command:
    t = resolve(task, project, python)
    options = t.get("options", {})
    argv = [t["command"], *t.get("args", [])] if t["type"] == "process" else shlex.split(t["command"])
    return Command(t["label"], argv, Path(options.get("cwd", project)), dict(options.get("env", {})))


# --------------------------------------------------------------------------------------------- PyCharm


def _macros(text: str, project: Path) -> str:
    return text.replace("$PROJECT_DIR$", str(project)).replace("$MODULE_DIR$", str(project))


@dataclass
class PyCharmConfig:
    file: Path
    name: str
    type: str
    factory: str
    module: str | None
    options: dict[str, str]
    envs: dict[str, str]
    element: ET.Element


def pycharm_configs(project: Path) -> list[PyCharmConfig]:
    configs = []
    for path in sorted((project / ".idea" / "runConfigurations").glob("*.xml")):
        root = ET.parse(path).getroot()
        assert root.tag == "component" and root.get("name") == "ProjectRunConfigurationManager", path
        (conf,) = root.findall("configuration")
        module = conf.find("module")
        configs.append(
            PyCharmConfig(
                file=path,
                name=conf.get("name"),
                type=conf.get("type"),
                factory=conf.get("factoryName"),
                module=None if module is None else module.get("name"),
                options={o.get("name"): o.get("value") for o in conf.findall("option") if o.get("value") is not None},
                envs={e.get("name"): e.get("value") for e in conf.findall("envs/env")},
                element=conf,
            )
        )
    return configs


def iml_path(project: Path) -> Path:
    """The module file modules.xml lists (module name = its stem)."""
    root = ET.parse(project / ".idea" / "modules.xml").getroot()
    (module,) = root.findall("component[@name='ProjectModuleManager']/modules/module")
    return Path(_macros(module.get("filepath"), project))


def iml_roots(project: Path) -> dict[str, list[Path]]:
    """content, source, test and excluded folders of the module."""
    root = ET.parse(iml_path(project)).getroot()
    roots: dict[str, list[Path]] = {"content": [], "source": [], "test": [], "exclude": []}

    def path(url: str) -> Path:
        assert url.startswith("file://$MODULE_DIR$"), url
        return Path(_macros(url[len("file://") :], project))

    for content in root.iter("content"):
        roots["content"].append(path(content.get("url")))
        for folder in content.findall("sourceFolder"):
            roots["test" if folder.get("isTestSource") == "true" else "source"].append(path(folder.get("url")))
        roots["exclude"] += [path(folder.get("url")) for folder in content.findall("excludeFolder")]
    return roots


def _json_option(value: str | None) -> str:
    """pytest configurations store their own options as JSON strings (``"&quot;PATH&quot;"``)."""
    return json.loads(value) if value else ""


def pycharm_command(cfg: PyCharmConfig, project: Path, python: str = sys.executable) -> Command:
    o = cfg.options
    env = {k: _macros(v, project) for k, v in cfg.envs.items()}
    env["PYTHONUNBUFFERED"] = "1"
    roots = iml_roots(project)
    pythonpath: list[Path] = []
    if o.get("ADD_CONTENT_ROOTS", "true") == "true":
        pythonpath += roots["content"]
    if o.get("ADD_SOURCE_ROOTS", "true") == "true":
        pythonpath += roots["source"] + roots["test"]
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    cwd = Path(_macros(o.get("WORKING_DIRECTORY") or "$PROJECT_DIR$", project))
    interpreter = [python, *shlex.split(_macros(o.get("INTERPRETER_OPTIONS", ""), project))]
    if cfg.type == "PythonConfigurationType":
        target = ["-m", o["SCRIPT_NAME"]] if o.get("MODULE_MODE") == "true" else [_macros(o["SCRIPT_NAME"], project)]
        params = shlex.split(_macros(o.get("PARAMETERS", ""), project))
        return Command(cfg.name, [*interpreter, *target, *params], cwd, env)
    if cfg.type == "tests" and cfg.factory == "py.test":
        target = _macros(_json_option(o.get("_new_target")), project)
        extra = shlex.split(_json_option(o.get("_new_additionalArguments")))
        keywords = _json_option(o.get("_new_keywords"))
        argv = [*interpreter, "-m", "pytest", target, *extra, *(["-k", keywords] if keywords else [])]
        return Command(cfg.name, argv, cwd, env)
    raise ValueError(f"{cfg.name}: {cfg.type} is not a command PyCharm runs")


# Dependency order of the entry-point configurations: fine-tuning and generation read what pre-training wrote,
# prediction what the classifiers' trainings wrote.
RUN_ORDER = [
    "Pretrain (debug profile)",
    "Pretrain",
    "Tune (debug study)",
    "Fine-tune SFT",
    "Fine-tune classify",
    "Vision (digits ResNet)",
    "Speech (commands Conformer)",
    "Generate",
    "Predict (text classifier)",
    "Predict (digits ResNet)",
    "Predict (commands Conformer)",
    "Plan (memory)",
    "Tests (pytest)",
]


# --------------------------------------------------------------------------------------------- problem matchers


@dataclass
class Problem:
    file: str
    line: int | None
    message: str


def problem_pattern(pattern: dict) -> dict:
    """A single-line problem pattern as VS Code's ProblemPatternParser reads it (problemMatcher.ts): unset groups
    default to file 1, line 2, column 3, message 0 (only file 1 and message 0 with ``location`` or kind "file"),
    and a pattern without a file and a message group, or without a line/location group, is rejected."""
    if not isinstance(pattern, dict) or "regexp" not in pattern:
        raise ValueError(f"only inline single-line patterns are modelled here, got {pattern!r}")
    groups = {k: pattern[k] for k in ("file", "location", "line", "column", "message") if k in pattern}
    kind_file = pattern.get("kind", "location").lower() == "file"
    defaults = {"file": 1, "message": 0}
    if "location" not in groups and not kind_file:
        defaults.update(line=2, column=3)
    parsed = {**defaults, **groups, "regexp": re.compile(pattern["regexp"]), "kind_file": kind_file}
    if not kind_file and "location" not in parsed and "line" not in parsed:
        raise ValueError("the problem pattern must either have kind: 'file' or a line or location match group")
    return parsed


def _group(found: re.Match, pattern: dict, name: str) -> str | None:
    index = pattern.get(name)
    return found.group(index).strip() if index is not None and index <= len(found.groups()) else None


def match_problems(matcher: dict, lines: list[str]) -> list[Problem]:
    """The problems VS Code reports for ``lines``: a marker needs a file, a location and a message, the way
    AbstractLineMatcher.getMarkerMatch builds it."""
    pattern = problem_pattern(matcher["pattern"])
    problems = []
    for text in lines:
        found = pattern["regexp"].search(text)
        if not found:
            continue
        file, message = _group(found, pattern, "file"), _group(found, pattern, "message")
        where = _group(found, pattern, "location") or _group(found, pattern, "line")
        if file and message and (pattern["kind_file"] or where):
            digits = re.match(r"\d+", where or "")
            # VS Code's parseInt turns a non-number into NaN and still reports the problem: None here.
            problems.append(Problem(file, 0 if pattern["kind_file"] else int(digits[0]) if digits else None, message))
    return problems
