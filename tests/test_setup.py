"""First run on a stock machine: the template's commands in their own venv, and the generated `make setup`'s choice of
Python and of PyTorch build.

The build choice is read from the commands make prints (`make -n`): PyTorch's real indexes are out of reach here. One
slow test runs the whole `make demo` with an externally managed Python and a local PEP 503 index holding the CPU wheel,
which exercises pip's real index mechanism end to end.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import COMBINATIONS, TEMPLATE, bake

MAKE = shutil.which("make") or "make"
THIS_PYTHON = "{}.{}".format(*sys.version_info[:2])
PYTORCH_INDEX = "https://download.pytorch.org/whl/"
GPU = 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5f0e3f3a-1b2c-4d5e-8f90-0123456789ab)"'
NO_DRIVER = 'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."; exit 9'
# What a caller's environment could slip into make: variables of an outer `make test`, an active venv, our own knobs.
LEAKS = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VIRTUAL_ENV", "PYTHON", "PYTHONPATH", "TORCH", "TORCH_INDEX_URL", "ARGS")


def make(
    directory: Path, *args: str, path: str | None = None, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    base = {key: value for key, value in os.environ.items() if key not in LEAKS}
    if path is not None:
        base["PATH"] = path
    return subprocess.run(
        [MAKE, "--no-print-directory", *args],
        cwd=directory,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bin_dir(tmp_path: Path, nvidia_smi: str | None = None, **links: str) -> str:
    """A PATH of grep, the given links and maybe a fake nvidia-smi: a real one (or a python3.X) stays out of sight."""
    directory = tmp_path / "bin"
    directory.mkdir()
    for name, target in {"grep": shutil.which("grep") or "/bin/grep", **links}.items():
        (directory / name).symlink_to(target)
    if nvidia_smi is not None:
        script = directory / "nvidia-smi"
        script.write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        script.chmod(0o755)
    return str(directory)


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def torch_command(project: Path, path: str, *overrides: str, **env: str) -> str:
    """The torch install line `make setup` would run, checked to come before the project's own install."""
    result = make(project, "-n", "setup", *overrides, path=path, **env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    torch = [i for i, line in enumerate(lines) if "-m pip install torch" in line]
    project_install = [i for i, line in enumerate(lines) if '-m pip install -e ".[dev]"' in line]
    assert len(torch) == 1 and len(project_install) == 1 and torch[0] < project_install[0], result.stdout
    return lines[torch[0]].strip()


# --------------------------------------------------------------------------------------------- PyTorch build


@pytest.mark.parametrize(
    ("nvidia_smi", "expected"),
    [
        (None, f".venv/bin/python -m pip install torch --index-url {PYTORCH_INDEX}cpu"),
        (NO_DRIVER, f".venv/bin/python -m pip install torch --index-url {PYTORCH_INDEX}cpu"),
        (GPU, ".venv/bin/python -m pip install torch"),
    ],
    ids=["no-nvidia-smi", "nvidia-smi-failing", "gpu"],
)
def test_torch_build_follows_nvidia_smi(default_project: Path, tmp_path: Path, nvidia_smi, expected) -> None:
    assert torch_command(default_project, bin_dir(tmp_path, nvidia_smi)) == expected


@pytest.mark.parametrize("build", ["cpu", "cu126", "cu128", "cu130"])
def test_torch_override_wins_over_a_gpu(default_project: Path, tmp_path: Path, build: str) -> None:
    command = torch_command(default_project, bin_dir(tmp_path, GPU), f"TORCH={build}")
    assert command == f".venv/bin/python -m pip install torch --index-url {PYTORCH_INDEX}{build}"


def test_torch_default_without_a_gpu_and_from_the_environment(default_project: Path, tmp_path: Path) -> None:
    assert torch_command(default_project, bin_dir(tmp_path), TORCH="default") == ".venv/bin/python -m pip install torch"


def test_torch_index_url_wins_over_everything(default_project: Path, tmp_path: Path) -> None:
    command = torch_command(
        default_project, bin_dir(tmp_path, GPU), "TORCH=cu128", "TORCH_INDEX_URL=file:///srv/simple"
    )
    assert command == ".venv/bin/python -m pip install torch --index-url file:///srv/simple"


def test_unknown_torch_build_is_one_line(default_project: Path, tmp_path: Path) -> None:
    result = make(default_project, "-n", "setup", "TORCH=cuda", path=bin_dir(tmp_path))
    assert result.returncode != 0
    assert "TORCH=cuda is not a PyTorch build: use one of cpu cu126 cu128 cu130 default" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# --------------------------------------------------------------------------------------------- Python version


def baked_for_another_python(baked_projects: dict[str, Path]) -> tuple[Path, str]:
    for name, answers in COMBINATIONS.items():
        version = answers.get("python_version", "3.11")
        if version != THIS_PYTHON:
            return baked_projects[name], version
    raise AssertionError("every combination uses this interpreter's version")


def test_missing_python_version_is_named_not_replaced(baked_projects: dict[str, Path], tmp_path: Path) -> None:
    """python3 (another version) is on PATH, python3.X is not: no fallback, one line saying what to install."""
    project, version = baked_for_another_python(baked_projects)
    result = make(project, "setup", path=bin_dir(tmp_path, python3=sys.executable))
    assert result.returncode != 0
    assert error_lines(result) == [
        f"error: this project uses Python {version} and python{version} was not found: install Python {version} "
        f"(pyenv install {version}, uv python install {version}, or your system's python{version} package) "
        f"or pass PYTHON=/path/to/python{version}"
    ]
    assert not (project / ".venv").exists()


def test_another_python_version_is_refused(baked_projects: dict[str, Path], tmp_path: Path) -> None:
    project, version = baked_for_another_python(baked_projects)
    result = make(project, "setup", f"PYTHON={sys.executable}")
    assert result.returncode != 0
    [line] = error_lines(result)
    assert line.startswith(f"error: this project uses Python {version} and {sys.executable} is Python {THIS_PYTHON}:")
    assert not (project / ".venv").exists()


def test_missing_ensurepip_names_the_package(tmp_path: Path) -> None:
    """Debian/Ubuntu without python3.X-venv: both Makefiles stop with the package to install, before any venv exists."""
    shadow = tmp_path / "no-ensurepip"
    shadow.mkdir()
    (shadow / "ensurepip.py").write_text("raise ImportError('ensurepip is not installed, as without python3-venv')\n")
    expected = (
        f"error: {sys.executable} cannot create virtual environments (no ensurepip): install the "
        f"python{THIS_PYTHON}-venv package (Debian/Ubuntu: sudo apt install python{THIS_PYTHON}-venv)"
    )
    project = bake(tmp_path / "bake", python_version=THIS_PYTHON)
    # The template's Makefile alone in a directory: the template's own .venv (running these tests) stays out of it.
    template = tmp_path / "template"
    template.mkdir()
    shutil.copy(TEMPLATE / "Makefile", template)
    for directory, target in ((project, "setup"), (template, "venv")):
        result = make(directory, target, f"PYTHON={sys.executable}", PYTHONPATH=str(shadow))
        assert result.returncode != 0
        assert error_lines(result) == [expected], result.stderr
        assert not (directory / ".venv").exists()


# --------------------------------------------------------------------------------------------- template commands


@pytest.mark.parametrize("target", ["demo", "test"])
def test_template_commands_install_into_their_own_venv(tmp_path: Path, target: str) -> None:
    """Every pip install of `make demo`/`make test` goes into .venv, which is made first from PYTHON."""
    shutil.copy(TEMPLATE / "Makefile", tmp_path)
    dry = make(tmp_path, "-n", target, "PYTHON=/usr/bin/python3", "MAKE=echo make")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    installs = [i for i, line in enumerate(lines) if " -m pip install" in line]
    assert installs and all(lines[i].startswith(".venv/bin/python -m pip install") for i in installs), dry.stdout
    assert lines.index("/usr/bin/python3 -m venv .venv") < installs[0]
    if target == "test":
        assert lines[installs[0]] == f".venv/bin/python -m pip install torch --index-url {PYTORCH_INDEX}cpu"


# --------------------------------------------------------------------------------------------- end to end


def pip_config() -> dict[str, str]:
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    ).stdout
    config: dict[str, str] = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        config.setdefault(key.rpartition(".")[2], value.strip("'\""))
    return config


def local_cpu_torch_wheel(config: dict[str, str], python_tag: str) -> Path | None:
    """The CPU torch wheel that pip's find-links offer on this machine, since PyTorch's own index is out of reach."""
    for location in config.get("find-links", "").split():
        directory = Path(location.removeprefix("file://"))
        if directory.is_dir():
            wheels = sorted(directory.glob(f"torch-*+cpu-{python_tag}-{python_tag}-*.whl"))
            if wheels:
                return wheels[-1]
    return None


def simple_index(root: Path, wheel: Path, python_version: str) -> str:
    """A PEP 503 index laid out like PyTorch's CPU index: torch and the wheels of its dependencies (fetched through
    pip's configured index), served as file://."""
    files = root / "files"
    files.mkdir(parents=True)
    (files / wheel.name).symlink_to(wheel)
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(name).decode())
    requires = [r for r in metadata.get_all("Requires-Dist", []) if "extra ==" not in r]
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(files)]
    download += ["--python-version", python_version, *requires]
    subprocess.run(download, check=True, capture_output=True, timeout=600)
    projects: dict[str, list[str]] = defaultdict(list)
    for file in sorted(files.iterdir()):
        projects[re.sub(r"[-_.]+", "-", file.name.split("-")[0]).lower()].append(file.name)
    for project, names in projects.items():
        links = "".join(f'<a href="../../files/{n}">{n}</a>\n' for n in names)
        page = root / "simple" / project / "index.html"
        page.parent.mkdir(parents=True)
        page.write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
    links = "".join(f'<a href="{p}/">{p}</a>\n' for p in projects)
    (root / "simple" / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
    return (root / "simple").as_uri()


def externally_managed_python() -> str | None:
    """A Python that refuses `pip install` into itself (PEP 668): Debian's and Ubuntu's /usr/bin/python3."""
    for candidate in ("/usr/bin/python3", shutil.which("python3")):
        if candidate and Path(candidate).exists():
            stdlib = subprocess.run(
                [candidate, "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout.strip()
            if stdlib and Path(stdlib, "EXTERNALLY-MANAGED").is_file():
                return candidate
    return None


def prefix_of(python: str) -> str:
    probe = subprocess.run([python, "-c", "import sys; print(sys.base_prefix)"], capture_output=True, text=True)
    return probe.stdout.strip()


def can_import(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True, timeout=60).returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_with_an_externally_managed_python(tmp_path: Path) -> None:
    """`make demo PYTHON=/usr/bin/python3` on a copy of the template: its own .venv, the generated project's .venv with
    the CPU torch from a local index (the printed command before pip's output), the debug demo to the end."""
    python = externally_managed_python()
    if python is None:
        pytest.skip("no externally managed Python here (Debian/Ubuntu's /usr/bin/python3)")
    tag = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
    ).stdout.strip()
    config = pip_config()
    wheel = local_cpu_torch_wheel(config, "cp" + tag.replace(".", ""))
    if wheel is None:
        pytest.skip(f"no CPU torch wheel for Python {tag} in pip's find-links")
    refused = subprocess.run(
        [python, "-m", "pip", "install", "--dry-run", "cookiecutter"], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0
    assert "externally-managed-environment" in refused.stderr or "No module named pip" in refused.stderr
    had_cookiecutter = can_import(python, "cookiecutter")

    index = simple_index(tmp_path / "index", wheel, tag)
    template = tmp_path / "template"
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "__pycache__", ".pytest_cache", ".ruff_cache")
    shutil.copytree(TEMPLATE, template, ignore=ignore)
    # Only the index under test may offer torch: this machine's pip configuration adds indexes a user's does not have
    # (one of them with a CUDA torch); the rest of the install comes from pip's default index.
    isolated = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    isolated |= {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1"}
    if "cert" in config:
        isolated.setdefault("PIP_CERT", config["cert"])
    result = subprocess.run(
        [MAKE, "demo", f"PYTHON={python}", "ARGS=--debug", f"TORCH_INDEX_URL={index}"],
        cwd=template,
        env={k: v for k, v in isolated.items() if k not in LEAKS},
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    out = result.stdout

    assert f"{python} -m venv .venv" in out and (template / ".venv" / "bin" / "python").exists()
    if not had_cookiecutter:
        assert not can_import(python, "cookiecutter"), "cookiecutter went into the system Python"
    project = template / "build" / "llm-lab"
    command = f".venv/bin/python -m pip install torch --index-url {index}"
    assert command in out
    printed = out.index(command)
    assert printed < out.index(f"Looking in indexes: {index}", printed) < out.index("Successfully installed", printed)
    probe = "import sys, torch; print(torch.version.cuda, torch.__file__.startswith(sys.prefix), sys.base_prefix)"
    venv_python = str(project / ".venv" / "bin" / "python")
    cuda, inside, base = subprocess.run([venv_python, "-c", probe], capture_output=True, text=True).stdout.split()
    assert (cuda, inside) == ("None", "True"), "the generated .venv holds its own CPU torch"
    assert base == prefix_of(python), "the generated .venv is made from the same Python"
    runs = project / "runs"
    assert (runs / "pretrain-debug" / "hf" / "config.json").is_file()
    assert (runs / "finetune-sft-debug" / "adapter" / "adapter_config.json").is_file()
    assert (runs / "finetune-classify-debug" / "metrics.json").is_file()
    assert "MACBETH." in out
