"""Run the baked project's own tools the way its README says: ruff, pre-commit, its test suite, its install."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import project_env, run, venv_sharing_this_environment

LINTED = ["defaults", "py310-cuda12", "custom-names", "pycharm-only", "vscode-only", "no-container-no-license"]

# The generated suite may skip only what this machine cannot run: tests that need a CUDA GPU, and on a GPU the QLoRA
# test without the optional bitsandbytes extra. Any other skip (a required package that fails to import, say) would
# turn a broken install into a green run. Outside CI the PostgreSQL study test may skip too: .ci/postgresql installs
# the server that CI runs it against.
ALLOWED_SKIP_REASON = re.compile(
    r'needs (a )?CUDA( GPU)?|QLoRA needs pip install -e "\.\[qlora\]"'
    + ("" if os.environ.get("CI") == "true" else r"|PostgreSQL is not installed")
)
SKIPPED_LINE = re.compile(r"^SKIPPED \[(\d+)\] (\S+:\d+): (.*)$", re.MULTILINE)


def assert_only_allowed_skips(pytest_stdout: str, allowed: re.Pattern = ALLOWED_SKIP_REASON) -> None:
    """Check pytest's ``-rs`` summary: every skip reason is an allowed one, and the summary lists every skip."""
    lines = SKIPPED_LINE.findall(pytest_stdout)
    unexpected = [f"{where}: {reason}" for _, where, reason in lines if not allowed.search(reason)]
    assert not unexpected, "unexpected skips in the generated suite:\n" + "\n".join(unexpected)
    total = re.search(r"(\d+) skipped", pytest_stdout)
    # A count the lines do not add up to would mean this parser missed some (a changed summary format).
    assert sum(int(n) for n, _, _ in lines) == (int(total.group(1)) if total else 0), pytest_stdout[-3000:]


@pytest.mark.parametrize("name", LINTED)
def test_ruff_clean(name: str, baked_projects: dict[str, Path]) -> None:
    project = baked_projects[name]
    check = run(project, "-m", "ruff", "check", ".", check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = run(project, "-m", "ruff", "format", "--check", ".", check=False)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_pre_commit_clean(baked_projects: dict[str, Path], tmp_path: Path) -> None:
    """pre-commit's local hooks (no network) pass on a freshly generated project, whose hook already staged it."""
    project = baked_projects["defaults"]
    env = project_env(project)
    env["PRE_COMMIT_HOME"] = str(tmp_path / "pre-commit-cache")
    # The hooks are `language: system`: they must find the tools of the environment that runs the tests.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    result = subprocess.run(
        [sys.executable, "-m", "pre_commit", "run", "--all-files", "--show-diff-on-failure"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    for hook in ("ruff check", "ruff format", "check yaml", "check toml", "check json"):
        assert hook in result.stdout


@pytest.mark.slow
def test_project_test_suite_passes(baked_projects: dict[str, Path]) -> None:
    """The generated project's own tests (slow ones included) pass, against the session's shared install."""
    project = baked_projects["defaults"]
    result = run(project, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
    assert_only_allowed_skips(result.stdout)


@pytest.mark.slow
def test_renamed_package_fast_tests_pass(baked_projects: dict[str, Path]) -> None:
    """A non-default package name, Python floor and IDE choice: the fast part of its suite passes too."""
    project = baked_projects["custom-names"]
    args = ["-m", "pytest", "-q", "-rs", "-m", "not slow", "-p", "no:cacheprovider"]
    result = run(project, *args, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert_only_allowed_skips(result.stdout)


@pytest.mark.slow
def test_readme_install_command_in_a_fresh_venv(baked_projects: dict[str, Path], tmp_path: Path) -> None:
    """`python -m pip install -e ".[dev]"` in a new venv: the project installs and its console scripts work.

    The venv sees the session's packages so that torch & co. are reused, not downloaded again.
    """
    project = baked_projects["py310-cuda12"]
    venv = tmp_path / "venv"
    python = venv_sharing_this_environment(venv)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-e", ".[dev]"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for script in ("tiny-gpt-pretrain", "tiny-gpt-finetune", "tiny-gpt-generate"):
        exe = venv / "bin" / script
        result = subprocess.run(
            [str(exe), "--help"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert "--debug" in result.stdout
    shutil.rmtree(venv)
