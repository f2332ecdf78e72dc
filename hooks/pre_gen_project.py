"""Validate the answers before cookiecutter writes anything.

The answers arrive through ``tojson`` so that a value containing quotes or triple quotes stays data and cannot break
or inject into this script. Each rejection prints one line (what is wrong, what would be accepted) and exits 1;
cookiecutter then removes the half-created project directory.
"""

from __future__ import annotations

import json
import keyword
import re
import sys

ANSWERS = json.loads(r"""{{ cookiecutter | tojson }}""")

PROJECT_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
PACKAGE_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
CUDA_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+$")
SUPPORTED_PYTHONS = ("3.10", "3.11", "3.12", "3.13")
SUPPORTED_CUDA_MAJORS = (12, 13)
CHOICES = {
    "python_version": SUPPORTED_PYTHONS,
    "ide": ("both", "pycharm", "vscode"),
    "devcontainer": ("yes", "no"),
    "extra_projects": ("both", "vision", "speech", "none"),
    "license": ("MIT", "Apache-2.0", "BSD-3-Clause", "none"),
    "create_venv": ("no", "yes"),
}
# Import names the generated project depends on or that pytest/tooling resolve first: a package with one of these
# names would shadow it (``import torch`` would find the project instead).
SHADOWED = {
    "torch", "transformers", "peft", "tokenizers", "safetensors", "tensorboard", "tqdm", "numpy", "jsonargparse",
    "yaml", "debugpy", "pydevd", "pydevd_pycharm", "pytest", "sklearn", "ruff", "setuptools", "pip", "huggingface_hub",
    "accelerate", "bitsandbytes", "datasets", "cookiecutter", "pre_commit", "test", "tests", "src", "conftest",
}  # fmt: skip


def fail(message: str) -> None:
    print(f"ERROR: {message}", file=sys.stderr)
    sys.exit(1)


def validate(answers: dict) -> None:
    project = answers.get("project", "")
    if not PROJECT_RE.match(project) or len(project) > 64:
        fail(
            f"project {project!r} is not a kebab-case name: use lowercase letters, digits and single hyphens, "
            "starting with a letter, at most 64 characters (e.g. 'my-llm')"
        )

    package = answers.get("package", "")
    if not PACKAGE_RE.match(package) or not package.isidentifier():
        fail(
            f"package {package!r} is not a Python identifier: "
            "use lowercase letters, digits and underscores (e.g. 'my_llm')"
        )
    if keyword.iskeyword(package) or keyword.issoftkeyword(package):
        fail(f"package {package!r} is a Python keyword: choose another name (e.g. '{package}_lm')")
    if package in sys.stdlib_module_names or package in SHADOWED:
        fail(
            f"package {package!r} would shadow the module of the same name (standard library or a dependency): "
            f"choose another name (e.g. '{package}_lm')"
        )

    for name, allowed in CHOICES.items():
        value = answers.get(name)
        if value not in allowed:
            fail(f"{name} {value!r} is not supported: choose one of {', '.join(allowed)}")

    cuda = answers.get("cuda_version", "")
    match = CUDA_RE.match(cuda)
    if not match:
        fail(f"cuda_version {cuda!r} is malformed: use MAJOR.MINOR.PATCH as in nvidia/cuda image tags (e.g. '13.0.1')")
    if int(match.group(1)) not in SUPPORTED_CUDA_MAJORS:
        fail(
            f"cuda_version {cuda!r} has no PyTorch wheels: "
            f"use a CUDA {' or '.join(map(str, SUPPORTED_CUDA_MAJORS))}.x version (e.g. '12.8.1')"
        )

    email = answers.get("email", "")
    if not EMAIL_RE.match(email):
        fail(f"email {email!r} is not an e-mail address: use name@host")
    for name in ("description", "author", "email", "base_model"):
        value = answers.get(name, "")
        if not value.strip() or "\n" in value or "\r" in value:
            fail(f"{name} must be one non-empty line")


validate(ANSWERS)
