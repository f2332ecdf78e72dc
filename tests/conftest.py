"""Shared fixtures: bake the template with cookiecutter's API and run what a user would run in the result.

Heavy dependencies (torch, transformers, peft, ...) are installed once in the environment that runs these tests
(`make test` does that, in the template's .venv); every baked project runs against them with its `src/` on PYTHONPATH,
exactly what PyCharm's "add source roots" does. Slow tests prove the real install commands in fresh environments.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from cookiecutter.main import cookiecutter

pytest_plugins = ["ci_skips"]

TEMPLATE = Path(__file__).resolve().parents[1]
DEFAULT_PROJECT = "llm-lab"
DEFAULT_PACKAGE = "llm_lab"

# Named combinations: every value of every choice variable appears at least once, plus the defaults.
COMBINATIONS: dict[str, dict[str, str]] = {
    "defaults": {},
    "pycharm-only": {"ide": "pycharm", "devcontainer": "no", "license": "Apache-2.0", "extra_projects": "vision"},
    "vscode-only": {"ide": "vscode", "license": "BSD-3-Clause", "python_version": "3.12", "extra_projects": "speech"},
    "no-container-no-license": {
        "devcontainer": "no",
        "license": "none",
        "python_version": "3.13",
        "extra_projects": "none",
    },
    "py310-cuda12": {"python_version": "3.10", "cuda_version": "12.8.1", "project": "tiny-gpt"},
    "custom-names": {
        "project": "my-llm2",
        "package": "my_llm_core",
        "author": 'Ann "Quote" O\'Neil',
        "description": 'Says """hi""" and {braces}',
        "base_model": "/models/local llama",
    },
}


def answers(**overrides: str) -> dict[str, str]:
    """The answers of ``--no-input``: each choice's first value, ``package`` derived, then ``overrides``."""
    raw = json.loads((TEMPLATE / "cookiecutter.json").read_text())
    context = {k: (v[0] if isinstance(v, list) else v) for k, v in raw.items() if not k.startswith("_")}
    context.update(overrides)
    if "package" not in overrides:
        context["package"] = context["project"].lower().replace("-", "_").replace(".", "_")
    return context


def bake(output_dir: Path, **context: str) -> Path:
    """Bake the template with the defaults overridden by ``context``; never creates a venv."""
    extra = {"create_venv": "no", **context}
    return Path(cookiecutter(str(TEMPLATE), no_input=True, output_dir=str(output_dir), extra_context=extra))


def project_env(project: Path) -> dict[str, str]:
    """The environment a user's IDE gives a run configuration: sources on PYTHONPATH, unbuffered, offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(project / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def command(argv: list, *, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with a bounded wait and its output captured; with ``check``, a failure shows that output."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"`{shlex.join(map(str, argv))}` exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
            f"\n--- stderr\n{result.stderr[-4000:]}"
        )
    return result


def run(project: Path, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` in a baked project the way its README says, with a bounded wait."""
    return command([sys.executable, *args], cwd=project, env=project_env(project), timeout=timeout, check=check)


def tool(name: str) -> str | None:
    """A command the test requirements install (hadolint, shellcheck, ...): beside the interpreter running the tests
    first, since `make test` runs `.venv/bin/python` without putting `.venv/bin` on PATH, then on PATH."""
    beside = Path(sys.executable).parent / name  # not resolved: a venv's python is a link out of its bin/
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def venv_sharing_this_environment(path: Path) -> Path:
    """A new venv that also sees the packages of the environment running the tests, so installing into it reuses torch
    & co. instead of downloading them; returns its python.

    `--system-site-packages` would not do: it exposes the base interpreter's packages, not those of the template's
    .venv that `make test` runs in.
    """
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    Path(purelib, "test_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


@pytest.fixture(scope="session")
def baked_projects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every named combination, baked once per test session."""
    root = tmp_path_factory.mktemp("bakes")
    return {name: bake(root / name, **context) for name, context in COMBINATIONS.items()}


@pytest.fixture(scope="session")
def default_project(baked_projects: dict[str, Path]) -> Path:
    return baked_projects["defaults"]
