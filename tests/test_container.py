"""The dev container, built and run (marker ``container``): the generated ``.devcontainer/`` of a default bake,
started the way VS Code, PyCharm and the Dev Containers CLI start it, on a Docker engine of this machine.

No image registry is reachable from CI, so the two images the Dockerfile starts from are stand-ins under the exact
names it uses: for the CUDA base a Debian 12 made with debootstrap that has what the real image has and the Dockerfile
relies on (its PATH and CUDA variables, a user ``ubuntu`` with UID 1000) plus a system ``python3.11``, so the
"base image already has the Python" path runs offline; for uv's image the two binaries of the uv wheel of the pinned
version. An image of that name that is not one of ours (a pulled ``nvidia/cuda``) is used as it is.

``devcontainer up`` (``@devcontainers/cli`` from npm) builds the generated Dockerfile unmodified. ``--override-config``
replaces devcontainer.json rather than merging, so the test writes the project's configuration plus only what this
machine lacks (host networking for the build and the container, the local CPU torch wheel) and checks that nothing
else differs. The proxy's CA goes where the docs tell users to put theirs: ``.devcontainer/ca-certificates/``.

Three host users start it: the main run (a user whose UID is the container user's 1000, or the user running the
tests when that is not root) gets every check, including a debugger attached from the host through the real debugpy
adapter with the "Attach to container" configuration's path mappings; then a user with another UID (updateRemoteUserUID
maps ``dev`` to it) and root with a root-owned workspace (the onCreateCommand gives it to ``dev``).

It skips with one line when no Docker engine answers or a tool is missing, and the runs as other host users need
root; under ``CI=true`` such a skip fails the run (tests/ci_skips.py): CI must run all of it. Images, the CLI and
the torch wheel are kept between runs (``CONTAINER_TEST_CACHE``); containers are removed, named volumes are left
alone. Each phase is timed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import inspect
import io
import json
import os
import platform
import pwd
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import DEFAULT_PACKAGE, DEFAULT_PROJECT, TEMPLATE, bake, command
from ide_configs import with_vscode_defaults
from test_debugger import FIRST_STOP_TIMEOUT, LISTEN, Program, attach_and_stop, launch_config, marker_line, step_file
from test_devcontainer import devcontainer, from_images
from test_project_tools import ALLOWED_SKIP_REASON, assert_only_allowed_skips

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(3600)]

CLI_PACKAGE = "@devcontainers/cli@0.89.0"
STAND_IN = "llm-lab-template.stand-in"  # label of the images this module made; its value is the recipe's digest
PYTHON = "3.11"  # the default bake's python_version, which Debian 12 has as its system Python
DEV_UID = 1000  # the container user's UID in the image
MAPPED_UID = 1970  # a host user with another UID: updateRemoteUserUID maps dev to it
WHEELS = "/opt/torch-wheel"  # where the container sees the local torch wheel
CUDA_PATH = "/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# In the container the generated suite may also skip what this image leaves out on purpose: a C++ compiler
# (inductor on the CPU), and the optional extras that `.[dev]` (the README's install) does not bring: W&B, lm_eval.
CONTAINER_SKIPS = re.compile(
    f"{ALLOWED_SKIP_REASON.pattern}|inductor needs a C\\+\\+ compiler|W&B is optional|lm-evaluation-harness is optional"
)
TIMINGS: dict[str, float] = {}
IS_ROOT = os.geteuid() == 0
CACHE = Path(
    os.environ.get("CONTAINER_TEST_CACHE")
    # Root's home is closed to the other host users the CLI runs as, so the shared files go where they can read them.
    or ("/var/cache/llm-lab-template-tests" if IS_ROOT else Path.home() / ".cache" / "llm-lab-template-tests")
)


@contextlib.contextmanager
def timed(phase: str) -> Iterator[None]:
    start = time.monotonic()
    yield
    TIMINGS[phase] = time.monotonic() - start


def shared_dir(path: Path) -> Path:
    """A folder the other host users can read (the CLI, the override config, their workspaces' parents)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------------------------- the engine and tools


@pytest.fixture(scope="module")
def engine() -> None:
    if shutil.which("docker") is None:
        pytest.skip("no docker client on PATH")
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"no Docker engine answers (`docker info`: {last}); .ci/run starts one")
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing (the Dev Containers CLI comes from npm)")
    shared_dir(CACHE)


@pytest.fixture(scope="module")
def cli(engine) -> list[str]:
    """The Dev Containers CLI, installed once with npm into the cache."""
    prefix = shared_dir(CACHE / ("devcontainers-cli-" + CLI_PACKAGE.rsplit("@", 1)[1]))
    entry = prefix / "node_modules" / "@devcontainers" / "cli" / "devcontainer.js"
    if not entry.is_file():
        with timed("npm install the Dev Containers CLI"):
            command(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", CLI_PACKAGE], timeout=900)
        command(["chmod", "-R", "a+rX", str(prefix)])
    return ["node", str(entry)]


# --------------------------------------------------------------------------------------------- stand-in images


def image_labels(name: str) -> dict[str, str] | None:
    """The labels of a local image, or None when there is no image of that name."""
    result = subprocess.run(["docker", "image", "inspect", name], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)[0]["Config"].get("Labels") or {}


def ensure_stand_in(name: str, make: Callable[[str, list[str]], None]) -> bool:
    """Make a stand-in unless that image is there: a real one (without our label) is used as it is, one of ours only
    while its recipe (the source of ``make``) is unchanged. True when the image is a stand-in."""
    digest = hashlib.sha256(inspect.getsource(make).encode()).hexdigest()[:16]
    labels = image_labels(name)
    if labels is not None and labels.get(STAND_IN, digest) == digest:
        return STAND_IN in labels
    with timed(f"stand-in {name}"):
        make(name, ["--change", f"LABEL {STAND_IN}={digest}"])
    return True


def make_cuda_stand_in(name: str, label: list[str]) -> None:
    """Debian 12 (debootstrap minbase) with what nvidia/cuda's base image has and the Dockerfile relies on: PATH and
    the CUDA variables, user ubuntu with UID 1000; plus Debian 12's system Python (the default bake's version)."""
    if not IS_ROOT or shutil.which("debootstrap") is None:
        pytest.skip(f"no {name} image, and making its stand-in needs root and debootstrap")
    cuda_version = name.split(":")[1].split("-")[0]
    with tempfile.TemporaryDirectory(prefix="cuda-stand-in-") as tmp:
        root = Path(tmp) / "rootfs"
        command(["debootstrap", "--variant=minbase", f"--include=python{PYTHON}", "bookworm", str(root)], timeout=1800)
        command(["chroot", str(root), "useradd", "--create-home", "--shell", "/bin/bash", "--uid", "1000", "ubuntu"])
        for leftover in [*root.glob("var/cache/apt/archives/*.deb"), *root.glob("var/lib/apt/lists/*_*")]:
            leftover.unlink()
        changes = [f"ENV PATH={CUDA_PATH}", f"ENV CUDA_VERSION={cuda_version}", "ENV NVIDIA_VISIBLE_DEVICES=all"]
        changes += ["ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility", 'CMD ["/bin/bash"]']
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["docker", "import", *label, *(f"--change={c}" for c in changes), "-", name],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            timeout=600,
        )
        tar.stdout.close()
        assert tar.wait(timeout=60) == 0 and imported.returncode == 0, imported.stderr


def make_uv_stand_in(name: str, label: list[str]) -> None:
    """uv's image is FROM scratch with /uv and /uvx: the same two binaries, from the uv wheel of that version."""
    version = name.rsplit(":", 1)[1]
    with tempfile.TemporaryDirectory(prefix="uv-stand-in-") as tmp:
        download = [sys.executable, "-m", "pip", "download", f"uv=={version}", "--no-deps", "--only-binary=:all:"]
        command([*download, "--dest", tmp], timeout=600)
        (wheel,) = Path(tmp).glob("uv-*.whl")
        archive = Path(tmp) / "uv.tar"
        with zipfile.ZipFile(wheel) as whl, tarfile.open(archive, "w") as tar:
            for tool in ("uv", "uvx"):
                data = whl.read(f"uv-{version}.data/scripts/{tool}")
                info = tarfile.TarInfo(tool)
                info.size, info.mode = len(data), 0o755
                tar.addfile(info, io.BytesIO(data))
        command(["docker", "import", *label, str(archive), name])


@pytest.fixture(scope="module")
def base_images(engine, tmp_path_factory) -> dict[str, bool]:
    """Both images the generated Dockerfile names (resolved from a default bake) -> whether it is a stand-in."""
    project = bake(tmp_path_factory.mktemp("names"))
    assert json.loads((project / ".cookiecutter.json").read_text())["context"]["python_version"] == PYTHON
    makers = {"uv": make_uv_stand_in, "dev": make_cuda_stand_in}  # stage -> maker (the stages' names in the Dockerfile)
    return {name: ensure_stand_in(name, makers[stage]) for stage, name in from_images(project).items()}


# --------------------------------------------------------------------------------------------- the torch wheel


@pytest.fixture(scope="module")
def torch_wheel(engine) -> Path:
    """The CPU torch wheel of the version these tests run with, for the container's Python, beside a constraint that
    keeps pip from preferring PyPI's newer (CUDA) builds: from pip's own configuration (find-links, a mirror), else
    from PyTorch's CPU index (the Makefile's TORCH_INDEX_URL)."""
    version = importlib.metadata.version("torch").split("+")[0] + "+cpu"
    folder = shared_dir(CACHE / f"torch-{version}-py{PYTHON}")
    if not any(folder.glob("torch-*.whl")):
        download = [sys.executable, "-m", "pip", "download", f"torch=={version}", "--no-deps", "--only-binary=:all:"]
        download += ["--python-version", PYTHON, "--platform", f"manylinux_2_28_{platform.machine()}"]
        download += ["--dest", str(folder)]
        index = re.search(r"^TORCH_INDEX_URL \?= (\S+)$", (TEMPLATE / "Makefile").read_text(), re.MULTILINE).group(1)
        with timed("download the CPU torch wheel"):
            found = command(download, check=False, timeout=1800).returncode == 0
            if not found and command([*download, "--index-url", index], check=False, timeout=1800).returncode != 0:
                pytest.skip(f"no CPU wheel of torch {version} for Python {PYTHON} (pip's configuration, {index})")
    (folder / "constraints.txt").write_text(f"torch=={version}\n")
    return folder


def machine_config(project: Path, wheels: Path) -> dict:
    """The project's devcontainer.json plus only what this machine lacks: host networking (the engine here has no
    bridge) for the build and the container, and the local CPU torch wheel for the postCreateCommand's install."""
    config = devcontainer(project)
    config["build"] = {**config["build"], "options": ["--network=host"]}
    config["runArgs"] = [*config["runArgs"], "--network=host"]
    config["mounts"] = [*config["mounts"], f"source={wheels},target={WHEELS},type=bind,readonly"]
    pip = {"PIP_FIND_LINKS": WHEELS, "PIP_CONSTRAINT": f"{WHEELS}/constraints.txt"}
    config["containerEnv"] = {**config["containerEnv"], **pip}
    return config


def differences(ours, theirs, where: str = "") -> set[str]:
    """Where two JSON values differ, as dotted paths; a list that only grew at its end is "<path> (appended)"."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        keys = ours.keys() | theirs.keys()
        return set().union(*(differences(ours.get(k), theirs.get(k), f"{where}.{k}".lstrip(".")) for k in keys))
    if isinstance(ours, list) and isinstance(theirs, list) and theirs[: len(ours)] == ours:
        return {f"{where} (appended)"} if len(theirs) > len(ours) else set()
    return set() if ours == theirs else {where}


def host_ca_bundle() -> Path | None:
    """The host's CA bundle: where a TLS-inspecting proxy sits, it holds the proxy's CA (harmless elsewhere)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (os.environ.get("SSL_CERT_FILE"), paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


# --------------------------------------------------------------------------------------------- host users and runs


def docker_socket_group() -> int:
    socket = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock").removeprefix("unix://")
    return os.stat(socket).st_gid


@dataclass
class HostUser:
    name: str
    uid: int
    gid: int

    def run_as(self) -> dict:
        """subprocess arguments for a command as this user, in the group that owns the Docker socket."""
        if self.uid == os.geteuid():
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": [docker_socket_group()]}

    def env(self) -> dict[str, str]:
        home = shared_dir(CACHE / "homes") / str(self.uid)
        home.mkdir(exist_ok=True)
        if IS_ROOT:
            os.chown(home, self.uid, self.gid)
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "USER": self.name}  # as a login sets them
        return env | ({"DOCKER_HOST": os.environ["DOCKER_HOST"]} if "DOCKER_HOST" in os.environ else {})


def current_user() -> HostUser:
    me = pwd.getpwuid(os.geteuid())
    return HostUser(me.pw_name, me.pw_uid, me.pw_gid)


def host_account(uid: int, name: str, made: list[str]) -> HostUser:
    """The host account with this UID (the CLI asks `id -un`): an existing one, or one made here (its name goes into
    ``made``, to be removed once its containers are gone: their processes keep the account in use until then)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        command(
            ["useradd", "--uid", str(uid), "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
        )
        entry = pwd.getpwuid(uid)
    if entry.pw_name == name:  # ours, made now or left by an interrupted run
        made.append(name)
    return HostUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


@dataclass
class Run:
    case: str
    workspace: Path
    override: Path
    container: str
    user: HostUser


def record_cli_phases(case: str, log: str) -> None:
    """The CLI's own timings (debug log): the image build, its UID layer and each command run in the container."""
    for ms, what in re.findall(r"Stop \((\d+) ms\): Run(?: in container)?: (.+)", log):
        if what.startswith("docker build"):
            TIMINGS[f"{case}: {'UID layer' if 'updateUID' in what else 'image'} build"] = int(ms) / 1000
        elif what.startswith("/bin/sh -c ") and int(ms) > 1000:
            TIMINGS[f"{case}: in container: {what.removeprefix('/bin/sh -c ')[:40]}"] = int(ms) / 1000


def start(case: str, owner: HostUser, cli: list[str], wheels: Path) -> Run:
    """Bake a default project into this case's fixed folder (fixed, so the images' names and their build cache carry
    over to the next test run), add the host's CA where the docs say, give it to ``owner``; `devcontainer up` as
    ``owner``."""
    parent = shared_dir(CACHE / "workspaces" / case)
    shutil.rmtree(parent, ignore_errors=True)
    workspace = bake(shared_dir(parent))
    if (bundle := host_ca_bundle()) is not None:
        shutil.copyfile(bundle, workspace / ".devcontainer" / "ca-certificates" / "host-ca-bundle.crt")
    override = parent / "override" / "devcontainer.json"
    shared_dir(override.parent)
    override.write_text(json.dumps(machine_config(workspace, wheels), indent=2))
    if IS_ROOT:
        command(["chown", "-R", f"{owner.uid}:{owner.gid}", str(workspace)])
    args = ["up", "--workspace-folder", str(workspace), "--override-config", str(override)]
    args += ["--remove-existing-container", "--log-level", "debug"]
    with timed(f"{case}: devcontainer up"):
        result = command([*cli, *args], env=owner.env(), timeout=3000, check=False, **owner.run_as())
    record_cli_phases(case, result.stderr)
    lines = result.stdout.strip().splitlines()
    outcome = json.loads(lines[-1]) if lines else {}
    assert outcome.get("outcome") == "success", f"up as {owner.name}: {outcome}\n{result.stderr[-6000:]}"
    return Run(case, workspace, override, outcome["containerId"], owner)


def start_case(case: str, uid: int | None, accounts: list[str], cli: list[str], wheels: Path) -> Run:
    """Start ``case`` as the host user with ``uid`` (None: the user running the tests; 0: root)."""
    if uid is None:
        return start(case, current_user(), cli, wheels)
    if not IS_ROOT:
        pytest.skip(f"starting the container as another host user ({case}) needs root")
    owner = current_user() if uid == 0 else host_account(uid, f"llmlab-{case}", accounts)
    return start(case, owner, cli, wheels)


@pytest.fixture(scope="module")
def runs(base_images, cli, torch_wheel) -> Iterator[dict[str, Future]]:
    """The three cases. The main one (host UID = the container user's 1000, nothing to map; the user running the
    tests when that is not root) starts first; then, in the background while its checks go on, a host user with
    another UID and root with a root-owned workspace, one after the other (their UID layers and installs overlap
    the main run's work instead of adding to it). At the end the containers go, then the host accounts made for
    them; images and named volumes stay."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="devcontainer-up")
    cases = {"main": DEV_UID if IS_ROOT else None, "mapped": MAPPED_UID, "root": 0}
    accounts: list[str] = []
    try:
        yield {case: pool.submit(start_case, case, uid, accounts, cli, torch_wheel) for case, uid in cases.items()}
    finally:
        pool.shutdown(wait=True)  # a run still starting finishes before its container goes
        for case in cases:
            label = f"label=devcontainer.local_folder={CACHE / 'workspaces' / case / DEFAULT_PROJECT}"
            for container in command(["docker", "ps", "-aq", "--filter", label], check=False).stdout.split():
                command(["docker", "rm", "-f", container], check=False)
        for name in accounts:
            command(["userdel", name])


@pytest.fixture(scope="module")
def main_run(runs) -> Run:
    return runs["main"].result()


@pytest.fixture(scope="module")
def mapped_run(runs) -> Run:
    return runs["mapped"].result()


@pytest.fixture(scope="module")
def root_run(runs) -> Run:
    return runs["root"].result()


def exec_argv(cli: list[str], run: Run, env: dict[str, str] | None = None) -> list[str]:
    """`devcontainer exec` in ``run``'s container (as its remoteUser), offline for Hugging Face, plus ``env``."""
    remote_env = [f"--remote-env={k}={v}" for k, v in {"HF_HUB_OFFLINE": "1", **(env or {})}.items()]
    return [*cli, "exec", "--workspace-folder", str(run.workspace), "--override-config", str(run.override), *remote_env]


def in_container(cli: list[str], run: Run, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return command([*exec_argv(cli, run), *argv], env=current_user().env(), timeout=timeout, check=False)


# --------------------------------------------------------------------------------------------- the main run


def test_override_config_differs_only_in_what_this_machine_lacks(main_run):
    ours = devcontainer(main_run.workspace)
    theirs = json.loads(main_run.override.read_text())
    assert differences(ours, theirs) == {
        "build.options",
        "runArgs (appended)",
        "mounts (appended)",
        "containerEnv.PIP_FIND_LINKS",
        "containerEnv.PIP_CONSTRAINT",
    }
    assert theirs["build"]["options"] == theirs["runArgs"][len(ours["runArgs"]) :] == ["--network=host"]


def test_post_create_installed_the_project(cli, main_run, torch_wheel):
    """The postCreateCommand installed the project editable from the mounted workspace into the image's venv, with
    the local CPU torch, writing as the host user."""
    probe = f"import sys, torch, {DEFAULT_PACKAGE} as p; print(sys.prefix, torch.__version__, p.__file__)"
    result = in_container(cli, main_run, "python", "-c", probe)
    assert result.returncode == 0, result.stdout + result.stderr
    prefix, torch_version, package = result.stdout.split()[-3:]
    assert prefix == "/home/dev/.venv"
    assert f"torch=={torch_version}" == (torch_wheel / "constraints.txt").read_text().strip()
    assert package == f"/workspaces/{main_run.workspace.name}/src/{DEFAULT_PACKAGE}/__init__.py"
    egg_info = main_run.workspace / "src" / f"{DEFAULT_PACKAGE}.egg-info"
    assert egg_info.is_dir() and egg_info.stat().st_uid == main_run.user.uid


def test_container_runs_with_a_stack_limit_and_no_memlock(cli, main_run):
    """A daemon that may not raise memlock (this one) refuses `--ulimit memlock=-1`; the stack limit it accepts."""
    limits = command(["docker", "inspect", "--format", "{{json .HostConfig.Ulimits}}", main_run.container]).stdout
    assert json.loads(limits) == [{"Name": "stack", "Hard": 67108864, "Soft": 67108864}]
    assert in_container(cli, main_run, "sh", "-c", "ulimit -s").stdout.split()[-1] == "65536"


def test_image_login_shell_keeps_the_venv_and_holds_no_uv_cache(main_run, base_images):
    """The generated Dockerfile's image (without the CLI's UID layer), started the way plain `docker run` or an IDE
    does: a login shell keeps the venv first on PATH although Debian's /etc/profile resets PATH (and loses it
    without the profile.d file); the venv's Python is the base image's own, so nothing was downloaded; no uv cache
    stayed in the image; uv trusts the system store; a C compiler is there for Triton."""
    image = command(["docker", "inspect", "--format", "{{.Config.Image}}", main_run.container]).stdout.strip()
    script = """bash -lc 'command -v python'; readlink -f "$VIRTUAL_ENV/bin/python"
        find / -xdev -type d -path '*/.cache/uv' -print; echo "UV_NATIVE_TLS=$UV_NATIVE_TLS"
        rm $(grep -l VIRTUAL_ENV /etc/profile.d/*.sh); bash -lc 'command -v python || echo none'
        command -v cc || echo no-cc"""
    argv = ["docker", "run", "--rm", "--network=host", "--user=root", image.removesuffix("-uid"), "bash", "-c", script]
    with timed("main: docker run of the image (login shell, caches)"):
        lines = command(argv, timeout=300).stdout.split()
    stand_in = base_images[from_images(main_run.workspace)["dev"]]
    python = "/usr/bin/python3.11" if stand_in else "/home/dev/.local/share/uv/python/"
    assert lines[0] == "/home/dev/.venv/bin/python" and lines[1].startswith(python), lines
    assert lines[2:4] == ["UV_NATIVE_TLS=true", "none"], "a uv cache in the image, or PATH kept without profile.d"
    assert lines[4:] == ["/usr/bin/cc"], "no C compiler: Triton (torch.compile on the GPU) could not build its launcher"


def test_pretrain_debug_runs_in_the_container(cli, main_run):
    with timed("main: pretrain --debug"):
        argv = ["python", "-m", f"{DEFAULT_PACKAGE}.pretrain", "--config", "configs/pretrain.yaml", "--debug"]
        result = in_container(cli, main_run, *argv)
    assert result.returncode == 0 and "done: step" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = main_run.workspace / "runs" / "pretrain-debug"
    assert run_dir.is_dir() and run_dir.stat().st_uid == main_run.user.uid


def test_generated_fast_tests_pass_in_the_container(cli, main_run):
    with timed("main: pytest -m 'not slow'"):
        argv = ["python", "-m", "pytest", "-q", "-rs", "-m", "not slow", "-p", "no:cacheprovider"]
        result = in_container(cli, main_run, *argv, timeout=1800)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-6000:] + result.stderr[-2000:]
    assert_only_allowed_skips(result.stdout, CONTAINER_SKIPS)


def test_debugger_attaches_from_the_host(cli, main_run):
    """VS Code's "Attach to container (debugpy :5678)" from the host: training runs in the container at
    /workspaces/<project> and waits; the host attaches through the real debugpy adapter with the configuration's
    pathMappings, and the stop in train_step is reported at the host's file. debugpy listens on the container's
    127.0.0.1, which the host reaches here through host networking, as VS Code's port forwarding does."""
    workspace = main_run.workspace
    resolved = with_vscode_defaults(launch_config(workspace, "Attach to container (debugpy :5678)"), workspace)
    assert resolved["pathMappings"] == [{"localRoot": str(workspace), "remoteRoot": f"/workspaces/{workspace.name}"}]
    argv = [*exec_argv(cli, main_run, {"PYDEVD_DISABLE_FILE_VALIDATION": "1"}), "python", "-m"]
    argv += [f"{DEFAULT_PACKAGE}.pretrain", "--config", "configs/pretrain.yaml", "--debug", "--train.max_steps", "1"]
    start = time.monotonic()
    program = Program([*argv, "--debugpy", "0", "--wait-for-client"], workspace, current_user().env())
    try:
        # debugpy's own line, never a probe of its port: a bare connect-and-close wedges the adapter (debugpy#1308).
        match = program.wait_line(LISTEN, FIRST_STOP_TIMEOUT)
        assert match.group(1) == "127.0.0.1"
        step = step_file(workspace)
        stopped_at = attach_and_stop(resolved, int(match.group(2)), step, marker_line(step))
        TIMINGS["main: start to the first stop, attached from the host"] = stopped_at - start
        assert program.wait(FIRST_STOP_TIMEOUT) == 0, program.output
    finally:
        program.kill()


# --------------------------------------------------------------------------------------------- other host users


def test_non_root_host_user_gets_the_container_user_mapped(cli, mapped_run):
    """updateRemoteUserUID gave dev the host user's UID: what the container writes into the workspace is theirs."""
    assert in_container(cli, mapped_run, "id", "-u").stdout.split()[-1] == str(MAPPED_UID)
    egg_info = mapped_run.workspace / "src" / f"{DEFAULT_PACKAGE}.egg-info"
    assert egg_info.is_dir() and egg_info.stat().st_uid == MAPPED_UID, "the postCreateCommand ran as the host user"
    assert mapped_run.workspace.stat().st_uid == MAPPED_UID, "the onCreateCommand leaves a user's workspace alone"
    # The cache volumes are this host user's own (the main case runs at the same time with dev as UID 1000).
    caches = in_container(cli, mapped_run, "stat", "-c", "%u", "/home/dev/.cache/pip", "/home/dev/.cache/huggingface")
    assert caches.stdout.split()[-2:] == [str(MAPPED_UID)] * 2, "a cache volume made for another host user"


def test_root_host_user_hands_the_workspace_to_the_container_user(cli, root_run):
    """Root on the host: nothing to map (dev stays 1000), so the onCreateCommand gave the root-owned workspace to dev
    and the postCreateCommand could install; root keeps full access to it on the host, being root."""
    assert in_container(cli, root_run, "id", "-u").stdout.split()[-1] == str(DEV_UID)
    assert root_run.workspace.stat().st_uid == DEV_UID
    egg_info = root_run.workspace / "src" / f"{DEFAULT_PACKAGE}.egg-info"
    assert egg_info.is_dir() and egg_info.stat().st_uid == DEV_UID


def test_timings_are_reported(request, capsys):
    """Runs last in this module: one line per measured phase, on the terminal and in the JUnit properties."""
    with capsys.disabled():
        for phase, seconds in TIMINGS.items():
            request.node.user_properties.append((f"container_phase_s[{phase}]", round(seconds, 1)))
            print(f"\ncontainer tier {seconds:7.1f} s  {phase}", end="")
        print()
    assert all(seconds > 0 for seconds in TIMINGS.values())
