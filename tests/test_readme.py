"""The README's two commands are the ones that work: CI runs the test command, the demo command is executable."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEMPLATE, bake, project_env

README = (TEMPLATE / "README.md").read_text()


def quickstart_commands() -> list[str]:
    """The commands of the README's quickstart block, comments stripped."""
    block = re.search(r"## Quickstart.*?```(?:bash|sh)?\n(.*?)```", README, re.S)
    assert block, "README has no Quickstart code block"
    return [line.partition("#")[0].strip() for line in block.group(1).splitlines() if line.partition("#")[0].strip()]


def test_readme_has_exactly_the_two_commands() -> None:
    assert quickstart_commands() == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (TEMPLATE / ".ci" / "run").read_text()
    steps = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert steps[-1] == quickstart_commands()[1]
    # The only other things CI may do: start a Docker engine for the container tier, install PostgreSQL for the
    # generated project's shared-study test, and put the CPU wheel into the venv `make test` uses (and the preamble).
    makefile = (TEMPLATE / "Makefile").read_text()
    venv_python = re.search(r"^\s*PY := (\.venv/\S+)$", makefile, re.M).group(1)
    assert [s for s in steps[:-1] if not s.startswith(("set ", "cd "))] == [
        ". .ci/docker-engine",
        ". .ci/postgresql",
        "make venv",
        f"{venv_python} -m pip install torch==2.13.0",
    ]


def test_make_targets_behind_the_commands_exist() -> None:
    makefile = (TEMPLATE / "Makefile").read_text()
    for command in quickstart_commands():
        target = command.split()[-1]
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no target {target!r}"


def test_demo_target_runs_the_generated_projects_demo() -> None:
    """`make demo` bakes with the defaults and hands over to the generated project's own `make demo`."""
    dry = subprocess.run(
        ["make", "-n", "demo", "MAKE=echo make"], cwd=TEMPLATE, capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0, dry.stderr
    assert "cookiecutter --no-input" in dry.stdout
    assert "-C build/llm-lab demo" in dry.stdout


@pytest.mark.slow
def test_generated_demo_pipeline_runs_offline(tmp_path: Path) -> None:
    """The generated README's demo (pretrain -> SFT -> classify -> generate), with the debug profile's step counts."""
    project = bake(tmp_path)
    result = subprocess.run(
        ["make", "pipeline", f"PY={sys.executable}", "ARGS=--debug"],
        cwd=project,
        env=project_env(project),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    runs = project / "runs"
    assert (runs / "pretrain-debug" / "hf" / "config.json").is_file()
    assert (runs / "finetune-sft-debug" / "adapter" / "adapter_config.json").is_file()
    assert (runs / "finetune-classify-debug" / "adapter" / "adapter_config.json").is_file()
    assert (runs / "finetune-classify-debug" / "metrics.json").is_file()


def test_gpu_check_is_one_command_documented_where_users_look(default_project: Path) -> None:
    """`make gpu-check` runs the CUDA tests and the GPU benchmark table, and the README and the container guide both
    tell a user to run it (the first thing on a new GPU box)."""
    makefile = (default_project / "Makefile").read_text()
    target = re.search(r"^gpu-check:.*?\n((?:\t.*\n)+)", makefile, re.M)
    assert target, "the generated Makefile has no gpu-check target"
    recipe = [line.strip() for line in target.group(1).splitlines()]
    assert recipe == ["$(PY) -m pytest -m cuda", "$(PY) -m $(PACKAGE).bench gpu-check"]
    for doc in ("README.md", "docs/ide-and-containers.md"):
        text = (default_project / doc).read_text()
        assert "make gpu-check" in text and "bench gpu-check" in text, doc
