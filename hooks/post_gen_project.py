"""Shape the generated project to the answers, record them, and say what to do next.

Runs inside the new project directory. Nothing here is required for the project's tests to pass: creating the
virtual environment is opt-in and only warns when it fails. When cruft renders the template only to compare two
versions of it (`cruft update`, `cruft diff`), the hook shapes the files and does nothing else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ANSWERS = json.loads(r"""{{ cookiecutter | tojson }}""")
PROJECT = Path.cwd()


def remove(relative: str) -> None:
    path = PROJECT / relative
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# What each extra project adds (extra_projects): its files go unless the answer selects it. The shared files (debug
# profile, README, Makefile, IDE launch.json) hold its parts inside Jinja conditions instead.
EXTRA_PROJECT_FILES = {
    "vision": [
        "src/{package}/vision.py",
        "src/{package}/config/vision.py",
        "src/{package}/model/resnet.py",
        "src/{package}/data/images.py",
        "src/{package}/model/pretrained_resnet.py",
        "src/{package}/data/image_augment.py",
        "configs/vision.yaml",
        "configs/tune/vision.yaml",
        "docs/vision.md",
        "tests/test_vision.py",
        ".idea/runConfigurations/Vision__digits_ResNet_.xml",
    ],
    "speech": [
        "src/{package}/speech.py",
        "src/{package}/config/speech.py",
        "src/{package}/model/conformer.py",
        "src/{package}/data/speech.py",
        "src/{package}/data/wav.py",
        "src/{package}/data/audio_features.py",
        "src/{package}/data/audio_augment.py",
        "src/{package}/data/builtin/speech_commands.npz",
        "src/{package}/data/builtin/speech_commands.md",
        "scripts/build_speech_commands.py",
        "configs/speech.yaml",
        "configs/tune/speech.yaml",
        "docs/speech.md",
        "tests/test_speech.py",
        "tests/test_audio_features.py",
        "tests/test_audio_augment.py",
        ".idea/runConfigurations/Speech__commands_Conformer_.xml",
    ],
}


def prune() -> None:
    for project, files in EXTRA_PROJECT_FILES.items():
        if ANSWERS["extra_projects"] not in (project, "both"):
            for relative in files:
                remove(relative.format(package=ANSWERS["package"]))
    if ANSWERS["ide"] == "vscode":
        remove(".idea")
    if ANSWERS["ide"] == "pycharm":
        remove(".vscode")
    if ANSWERS["devcontainer"] == "no":
        remove(".devcontainer")
    licenses = PROJECT / ".licenses"
    if ANSWERS["license"] != "none":
        (licenses / ANSWERS["license"]).replace(PROJECT / "LICENSE")
    shutil.rmtree(licenses)


def record_answers() -> None:
    """Write the answers the way cruft/cookiecutter replay expect them, so the project can be regenerated."""
    answers = {key: value for key, value in ANSWERS.items() if not key.startswith("_")}
    record = {"template": ANSWERS.get("_template", ""), "checkout": ANSWERS.get("_checkout"), "context": answers}
    (PROJECT / ".cookiecutter.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def rendered_for_a_diff() -> bool:
    """Whether cruft renders this copy only to diff it: `cruft update` and `cruft diff` render the old and the new
    template into fresh `tempfile.mkdtemp()` directories and patch the user's project with the difference, so a .git
    made here would be patched into the project (and the update lost), and a .venv built here thrown away.

    cruft's context carries `_commit` (plain cookiecutter's never does) and `cruft create` renders where the user says,
    not straight into a bare temporary directory."""
    if "_commit" not in ANSWERS:
        return False
    render_dir = PROJECT.resolve().parent
    in_temp = render_dir.parent == Path(tempfile.gettempdir()).resolve()
    return in_temp and re.fullmatch(r"tmp[a-z0-9_]{8}", render_dir.name) is not None


def init_git() -> bool:
    """A repository with every file staged: the user's first commit is theirs to make (with `.cruft.json`, which cruft
    writes after this hook); `cruft update` wants that clean tree."""
    git = shutil.which("git")
    if git is None or (PROJECT / ".git").exists():
        return False
    try:
        subprocess.run([git, "init", "--quiet"], cwd=PROJECT, check=True)
        subprocess.run([git, "add", "--all"], cwd=PROJECT, check=True)
    except subprocess.CalledProcessError as error:
        print(f"warning: git init failed ({error}); the project is complete without it", file=sys.stderr)
        return False
    return True


def create_venv() -> bool:
    """`make setup`, the one place that knows which Python and which PyTorch build the project's .venv gets."""
    make = shutil.which("make")
    if make is None:
        print("warning: make not found, .venv not created: see the README's Install section", file=sys.stderr)
        return False
    # An environment active around cookiecutter is not this project's: with VIRTUAL_ENV set, make would install there.
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    try:
        subprocess.run([make, "setup"], cwd=PROJECT, env=env, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"warning: could not create .venv ({error}); run `make setup` in {PROJECT}", file=sys.stderr)
        return False
    return True


def next_steps(git_ready: bool, venv_ready: bool) -> str:
    steps = [f"cd {PROJECT.name}"]
    if git_ready:
        steps.append('git add --all && git commit -m "New project from the llm-lab template"')
    if not venv_ready:
        steps.append("make setup            # .venv, the PyTorch build for this machine, pip install -e '.[dev]'")
    steps += [
        "make demo             # pretrain a tiny LM offline, fine-tune it with LoRA, generate",
        "make test             # the project's own tests",
    ]
    ides = {"both": "PyCharm or VS Code", "pycharm": "PyCharm", "vscode": "VS Code"}[ANSWERS["ide"]]
    lines = [f"Created {PROJECT}", "", "Next steps:", *(f"  {step}" for step in steps), ""]
    lines.append(f"Open the folder in {ides}: the interpreter is .venv, run/debug configurations are ready.")
    return "\n".join(lines)


prune()
record_answers()
if not rendered_for_a_diff():
    git_ready = init_git()
    venv_ready = create_venv() if ANSWERS["create_venv"] == "yes" else False
    print(next_steps(git_ready, venv_ready))
