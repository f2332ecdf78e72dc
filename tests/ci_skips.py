"""Under CI=true a skipped template test fails the run, unless the allow-list below names it.

A skip is a check that did not run. Tools looked up on a PATH that `make test` never set, or a download that was
refused, once turned six checks into silent skips in every CI run; a failure says so where a skip would not.
Loaded by conftest.py (``pytest_plugins``), so it applies to every test of the template.
"""

from __future__ import annotations

import os

import pytest

# Test ids (without parameters) that may skip under CI=true, each with the reason it is allowed. Keep it short: an
# entry is a check CI will never run.
CI_ALLOWED_SKIPS: dict[str, str] = {
    # Not a check: it prints the first-breakpoint times of the debugger tests, and has none when they are deselected.
    "tests/test_debugger.py::test_timings_are_reported": "reports timings only, none when those tests are deselected",
}


def skip_is_allowed(nodeid: str) -> bool:
    return nodeid.split("[", 1)[0] in CI_ALLOWED_SKIPS


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return
    if skip_is_allowed(item.nodeid):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI=true ({reason}): the template's CI runs every check. Make the check runnable here, or add "
        f"{item.nodeid.split('[', 1)[0]!r} to CI_ALLOWED_SKIPS in tests/ci_skips.py with the reason"
    )
