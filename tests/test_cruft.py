"""cruft serves a generated project: `cruft check` sees a new template commit, `cruft update` brings it in and keeps the
user's own edits, for a project made with `cruft create` and for one made with plain cookiecutter and then linked.

Everything runs offline on a local git clone of the template; cruft re-renders the template in temporary directories
during an update, where the post-generation hook must leave out git and the virtual environment.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import TEMPLATE, bake

IDENTITY = {
    "GIT_AUTHOR_NAME": "Template Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Template Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **IDENTITY}
    result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout


def cruft(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cruft", *args],
        cwd=cwd,
        env={**os.environ, **IDENTITY, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def template_clone(path: Path) -> tuple[Path, str]:
    """The template's files as they are now (committed or not, ignored ones left out) in a new repository of one
    commit: the template at a fixed point that the test can then move on."""
    listed = git(TEMPLATE, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for relative in filter(None, listed):
        source = TEMPLATE / relative
        if source.is_file():  # a file deleted from the work tree but not yet from the index is listed too
            (path / relative).parent.mkdir(parents=True, exist_ok=True)
            (path / relative).write_bytes(source.read_bytes())
            (path / relative).chmod(source.stat().st_mode)
    git(path, "init", "--quiet")
    git(path, "add", "--all")
    git(path, "commit", "--quiet", "-m", "template, first version")
    return path, git(path, "rev-parse", "HEAD").strip()


def fake_make(directory: Path) -> tuple[dict[str, str], Path]:
    """A `make` on PATH that records where it ran: the hook's `make setup` without building a venv."""
    log = directory / "make-calls.log"
    script = directory / "bin" / "make"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$PWD $*" >> "{log}"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{script.parent}{os.pathsep}{os.environ['PATH']}"}, log


TEMPLATE_LINE = "# a line the template's second commit adds"
OWN_LINE = "# the user's own note"


def append_and_commit(repo: Path, relative: str, line: str, message: str) -> None:
    """A commit that adds `line` at the end of one file: the template moving on, or the user's own edit."""
    path = repo / relative
    path.write_text(path.read_text() + f"{line}\n")
    git(repo, "commit", "--quiet", "-am", message)


def edit_both(project: Path, template: Path) -> None:
    """The user edits one file of the project and commits; then the template changes another in a second commit."""
    append_and_commit(project, "configs/finetune-sft.yaml", OWN_LINE, "my own change")
    append_and_commit(template, "{{cookiecutter.project}}/Makefile", TEMPLATE_LINE, "template, second version")


def update_and_check(project: Path, template: Path, env: dict[str, str]) -> None:
    """check (out of date), update (its output shown with `pytest -s`), check (up to date)."""
    stale = cruft(project, "check")
    assert stale.returncode != 0 and "out of date" in stale.stdout, stale.stdout + stale.stderr
    update = cruft(project, "update", "-y", env=env)
    assert update.returncode == 0, update.stdout + update.stderr
    assert "error" not in (update.stdout + update.stderr).lower()
    assert "Next steps" not in update.stdout, "the hook spoke from cruft's re-render"
    fresh = cruft(project, "check")
    assert fresh.returncode == 0 and "up to date" in fresh.stdout, fresh.stdout + fresh.stderr
    for command, result in [("check", stale), ("update -y", update), ("check", fresh)]:
        print(f"$ cruft {command}\n{result.stdout}{result.stderr}")
    assert json.loads((project / ".cruft.json").read_text())["commit"] == git(template, "rev-parse", "HEAD").strip()


def assert_updated(project: Path) -> None:
    assert TEMPLATE_LINE in (project / "Makefile").read_text(), "the template's change did not arrive"
    assert OWN_LINE in (project / "configs" / "finetune-sft.yaml").read_text(), "the user's edit was lost"
    status = git(project, "status", "--porcelain").splitlines()
    assert sorted(line[3:] for line in status) == [".cruft.json", "Makefile"], status
    assert not list(project.rglob("*.rej")), "a hunk of the update was rejected"


def test_cruft_create_check_update(tmp_path: Path) -> None:
    """create_venv=yes: `make setup` runs once at create, never in the update's re-renders."""
    template, _ = template_clone(tmp_path / "template")
    env, make_log = fake_make(tmp_path)
    venv_yes = ["--extra-context", '{"create_venv": "yes"}']
    created = cruft(tmp_path, "create", "--no-input", str(template), *venv_yes, env=env)
    assert created.returncode == 0, created.stdout + created.stderr
    project = tmp_path / "llm-lab"
    assert make_log.read_text().splitlines() == [f"{project} setup"]
    assert git(project, "status", "--porcelain").strip(), "the hook stages the files for the user's first commit"
    git(project, "add", "--all")
    git(project, "commit", "--quiet", "-m", "new project")
    assert cruft(project, "check").returncode == 0
    edit_both(project, template)

    update_and_check(project, template, env)

    assert_updated(project)
    assert make_log.read_text().splitlines() == [f"{project} setup"], "cruft's re-render ran `make setup`"


def test_cookiecutter_project_linked_then_updated(tmp_path: Path) -> None:
    """A project baked with plain cookiecutter, linked with the answers it recorded and the commit it came from."""
    template, first = template_clone(tmp_path / "template")
    answers = {"project": "linked-lab", "extra_projects": "vision", "ide": "vscode"}
    plain = [sys.executable, "-m", "cookiecutter", "--no-input", "-o", str(tmp_path), str(template)]
    subprocess.run([*plain, *(f"{k}={v}" for k, v in answers.items())], check=True, capture_output=True, timeout=120)
    project = tmp_path / "linked-lab"
    git(project, "add", "--all")
    git(project, "commit", "--quiet", "-m", "new project")
    recorded = json.loads((project / ".cookiecutter.json").read_text())["context"]
    answers_again = ["--extra-context", json.dumps(recorded)]
    linked = cruft(project, "link", "--no-input", "--checkout", first, str(template), *answers_again)
    assert linked.returncode == 0, linked.stdout + linked.stderr
    no_diff = cruft(project, "diff", "--exit-code")
    assert no_diff.returncode == 0, "the recorded answers do not render this project again:\n" + no_diff.stdout
    git(project, "add", ".cruft.json")
    git(project, "commit", "--quiet", "-m", "link to the template")
    edit_both(project, template)

    update_and_check(project, template, {})

    assert_updated(project)
    assert json.loads((project / ".cruft.json").read_text())["context"]["cookiecutter"]["ide"] == "vscode"


def test_plain_cookiecutter_in_a_temporary_directory_gets_its_repository() -> None:
    """Only cruft's renders skip git: plain cookiecutter's context has no `_commit`, wherever it renders."""
    parent = Path(tempfile.mkdtemp())
    try:
        assert (bake(parent) / ".git").is_dir()
    finally:
        shutil.rmtree(parent)
