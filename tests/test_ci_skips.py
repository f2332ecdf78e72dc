"""The CI skip policy (tests/ci_skips.py) and the tool look-up (conftest.tool), run on small pytest sessions."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from ci_skips import CI_ALLOWED_SKIPS
from conftest import tool

pytest_plugins = ["pytester"]

SESSION = """
import pytest

def test_runs():
    assert True

def test_skips():
    pytest.skip("tool not found")

@pytest.fixture
def refused():
    pytest.skip("download refused")

def test_fixture_skips(refused):
    pass

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False
"""


@pytest.mark.parametrize("ci", ["true", None])
def test_a_skip_fails_only_under_ci(pytester, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    pytester.makepyfile(SESSION)
    result = pytester.runpytest("-p", "ci_skips")
    if ci:
        result.assert_outcomes(passed=1, failed=1, errors=1, xfailed=1)  # a fixture's skip fails its set-up
        result.stdout.fnmatch_lines(["*skipped under CI=true (tool not found)*", "*CI_ALLOWED_SKIPS*"])
    else:
        result.assert_outcomes(passed=1, skipped=2, xfailed=1)


def test_allowed_skips_stay_skips(pytester, monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setitem(CI_ALLOWED_SKIPS, "test_allowed.py::test_skips", "reason for the test")
    pytester.makepyfile(test_allowed=SESSION)
    pytester.runpytest("-p", "ci_skips").assert_outcomes(passed=1, skipped=1, errors=1, xfailed=1)


def test_allow_list_entries_say_why():
    assert all(isinstance(why, str) and len(why.split()) >= 3 for why in CI_ALLOWED_SKIPS.values())


def test_tool_is_found_beside_the_interpreter_before_path(tmp_path, monkeypatch):
    """`make test` runs .venv/bin/python with PATH untouched: a tool in .venv/bin must still be found, first."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    beside = bin_dir / "lintertool"
    beside.write_text("#!/bin/sh\n")
    beside.chmod(beside.stat().st_mode | stat.S_IXUSR)
    on_path = tmp_path / "path"
    on_path.mkdir()
    (on_path / "lintertool").write_text("#!/bin/sh\n")
    (on_path / "lintertool").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", str(on_path))
    assert tool("lintertool") == str(beside)
    beside.unlink()
    assert tool("lintertool") == str(on_path / "lintertool")
    assert tool("no-such-tool-anywhere") is None


def test_the_test_requirements_tools_are_found():
    """What CI relies on: hadolint and shellcheck from requirements-test.txt are found by this interpreter."""
    for name in ("hadolint", "shellcheck"):
        found = tool(name)
        assert found and os.access(found, os.X_OK) and Path(found).exists(), name
