"""Breakpoints really hit: the real debugpy adapter driven over DAP with every launch.json configuration, attaching
to an entry point's own ``--debugpy`` listener through a container-style path mapping, ``--break-on-nonfinite``
stopping at an injected NaN, and PyCharm's pydevd protocol against ``--pycharm-debug``.

The breakpoint goes on the line of ``train/step.py`` marked ``# breakpoint: loss is computed`` (found by the
marker, never by number). Each test prints the time from start to the first stop.
"""

from __future__ import annotations

import ast
import inspect
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import DEFAULT_PACKAGE, DEFAULT_PROJECT, bake
from dap import DAPClient, kill_group
from ide_configs import RUN_ORDER, base_env, launch_configs, pycharm_configs, with_vscode_defaults
from packaging.specifiers import SpecifierSet
from pydevd_ide import PydevdIDE
from test_ide_files import fast_args

MARKER = "# breakpoint: loss is computed"
FIRST_STOP_TIMEOUT = 180.0  # torch import + tokenizer + model set-up on a slow 2-core CI machine
EXIT_TIMEOUT = 180.0
LISTEN = re.compile(r"^debugpy listening on (\S+):(\d+)$")
INJECT_ENV = f"{DEFAULT_PACKAGE.upper()}_INJECT_NAN_AT"
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Our own baked project (runs write into it), pre-trained once so generate has a model to load."""
    return bake(tmp_path_factory.mktemp("debugger"))


def step_file(project: Path) -> Path:
    return project / "src" / DEFAULT_PACKAGE / "train" / "step.py"


def marker_line(path: Path, marker: str = MARKER) -> int:
    lines = [i for i, text in enumerate(path.read_text().splitlines(), 1) if marker in text]
    assert len(lines) == 1, f"{path} should contain {marker!r} exactly once, found {len(lines)}"
    return lines[0]


def adapter_env() -> dict[str, str]:
    env = base_env()
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # pydevd's frozen-modules warning on 3.11+
    return env


def report_timing(name: str, seconds: float) -> None:
    TIMINGS[name] = seconds


class Program:
    """An entry point started by the test (not by the adapter): own process group, output drained on threads."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]):
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._drain, args=(stream,), daemon=True)
            for stream in (self.proc.stdout, self.proc.stderr)
        ]
        for thread in self._threads:
            thread.start()

    def _drain(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_line(self, pattern: re.Pattern, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if match := pattern.match(line):
                        return match
                code = self.proc.poll()
                assert code is None, f"exited {code} before {pattern.pattern}:\n{self.output}"
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no line matching {pattern.pattern} within {timeout}s:\n{self.output}"
                self._cond.wait(min(remaining, 0.5))

    @property
    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        for thread in self._threads:
            thread.join(timeout=5)
        return code

    def kill(self) -> None:
        kill_group(self.proc.pid)
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


# --------------------------------------------------------------------------------------------- launch.json

# predict: (the source of the model's forward, its class, an argument of forward) per configuration. The text
# classifier is transformers' own model (its configuration debugs library code: justMyCode false).
PREDICT_FORWARD = {
    "Predict (text classifier)": (None, "LlamaForSequenceClassification", "input_ids"),
    "Predict (digits ResNet)": ("model/resnet.py", "ResNet", "pixel_values"),
    "Predict (commands Conformer)": ("model/conformer.py", "ConformerClassifier", "input_values"),
}
# entry points that call train_step
TRAINING = set(RUN_ORDER) - {"Generate", "Plan (memory)", "Tests (pytest)"} - set(PREDICT_FORWARD)
NOT_LAUNCHABLE_HERE = {
    "Debug test (Testing view)": "its program is ${file}: VS Code's Testing view fills it in",
}


def launch_config(project: Path, name: str) -> dict:
    (config,) = [c for c in launch_configs(project) if c["name"] == name]
    return config


def body_line(path: Path, class_name: str, function: str) -> int:
    """The line of the first statement of ``class_name.function`` in ``path`` (after its docstring)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name]
    (fn,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == function]
    docstring = isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant)
    return fn.body[1 if docstring else 0].lineno


def forward_breakpoint(project: Path, name: str) -> tuple[Path, int, str]:
    """(file, line, a local to expect) of the first statement of the predicted model's forward."""
    source, class_name, argument = PREDICT_FORWARD[name]
    if source is None:  # a transformers class: where its (inherited, decorated) forward is defined
        import transformers

        forward = inspect.unwrap(getattr(transformers, class_name).forward)
        path, class_name = Path(inspect.getsourcefile(forward)), forward.__qualname__.split(".")[0]
    else:
        path = project / "src" / DEFAULT_PACKAGE / source
    return path, body_line(path, class_name, "forward"), argument


def test_every_launch_configuration_is_covered(project):
    names = {c["name"] for c in launch_configs(project)}
    attach = {c["name"] for c in launch_configs(project) if c["request"] == "attach"}
    assert names == set(RUN_ORDER) | set(NOT_LAUNCHABLE_HERE) | attach
    assert attach == {
        "Attach to container (debugpy :5678)",
        "Attach to local process (debugpy :5678)",
        "Attach to torchrun rank 0 (debugpy :5678)",
        "Attach to torchrun rank 1 (debugpy :5679)",
    }


def run_launch(project: Path, config: dict, breakpoints: dict[str, list[int]], env: dict[str, str] | None = None):
    """Launch ``config`` through ``python -m debugpy.adapter`` the way VS Code does; returns (client, seconds to
    the first stop or None). The caller closes the client."""
    resolved = with_vscode_defaults(config, project)
    if env:
        resolved["env"] = {**resolved.get("env", {}), **env}
    client = DAPClient.start_adapter(env=adapter_env())
    start = time.monotonic()
    client.initialize()
    seq = client.send_request("launch", resolved)
    client.configure(breakpoints, timeout=60)
    client.wait_response(seq, timeout=60)
    return client, start


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN_ORDER)
def test_launch_configuration(project, name):
    config = launch_config(project, name)
    argv = ["-m", config["module"], *config["args"]]
    config = {**config, "args": [*config["args"], *fast_args(argv, DEFAULT_PACKAGE)]}
    assert len(config["args"]) > len(argv) - 2, "every launch configuration gets its fast arguments"
    if name in TRAINING:
        path, line, expect = step_file(project), marker_line(step_file(project)), "loss"
    elif name == "Tests (pytest)":  # debugging a test: stop inside one of the generated tests
        path = project / "tests" / "test_debug.py"
        line, expect = marker_line(path, "assert parse_address(text) == expected"), "expected"
    elif name in PREDICT_FORWARD:  # a breakpoint in the model's forward stops there
        path, line, expect = forward_breakpoint(project, name)
    else:
        path = None
    client, start = run_launch(project, config, {str(path): [line]} if path else {})
    try:
        if path is not None:
            stopped = client.wait_stopped(FIRST_STOP_TIMEOUT)
            report_timing(f"launch {name}", time.monotonic() - start)
            assert stopped["reason"] == "breakpoint"
            frame = client.top_frame(stopped["threadId"])
            assert Path(frame["source"]["path"]).resolve() == path.resolve() and frame["line"] == line
            variables = client.locals(frame["id"])
            assert expect in variables, sorted(variables)
            if expect == "loss":
                assert variables["loss"]["type"] == "Tensor"
                loss = float(client.evaluate("loss.item()", frame["id"]))
                assert 0 < loss < 20
            client.clear_breakpoints(path)
            client.request("continue", {"threadId": stopped["threadId"]})
        code = client.exit_code(EXIT_TIMEOUT)
        assert code == 0, f"{name} exited {code}:\n{client.terminal_output()[-3000:]}"
    finally:
        client.close()


# --------------------------------------------------------------------------------------------- attach


def local_checkout(project: Path, root: Path) -> Path:
    """A second copy of the sources: the IDE's side of a container's path mapping."""
    local = root / project.name
    if not local.exists():
        shutil.copytree(project, local, ignore=shutil.ignore_patterns("runs", ".cache", ".git", "__pycache__"))
    return local


def start_pretrain(project: Path, *args: str, env: dict[str, str] | None = None) -> Program:
    run_env = base_env()
    run_env.update({"PYTHONPATH": str(project / "src"), "PYDEVD_DISABLE_FILE_VALIDATION": "1", **(env or {})})
    return Program([sys.executable, "-m", f"{DEFAULT_PACKAGE}.pretrain", *args], project, run_env)


def start_listening_pretrain(project: Path, *extra: str, env: dict[str, str] | None = None) -> Program:
    return start_pretrain(
        project, "--config", "configs/pretrain.yaml", "--debug", "--train.max_steps", "1", *extra, env=env
    )


def attach_and_stop(resolved: dict, port: int, local_step: Path, line: int) -> float:
    """Attach the way VS Code does with ``resolved`` (an attach configuration, variables resolved) to the adapter on
    ``port``, stop at ``local_step:line``, check that the frame is reported at that IDE-side path with ``loss`` in
    scope, and let the program run on. Returns the monotonic time of the stop."""
    host = resolved["connect"]["host"]
    with DAPClient.connect(host, port) as client:
        client.initialize()
        seq = client.send_request("attach", {**resolved, "connect": {"host": host, "port": port}})
        client.configure({str(local_step): [line]})
        client.wait_response(seq, timeout=30)
        stopped = client.wait_stopped(FIRST_STOP_TIMEOUT)
        stopped_at = time.monotonic()
        frame = client.top_frame(stopped["threadId"])
        assert frame["source"]["path"] == str(local_step), "the stop is reported in the IDE's (local) path"
        assert frame["line"] == line
        assert "loss" in client.locals(frame["id"])
        client.clear_breakpoints(local_step)
        client.request("continue", {"threadId": stopped["threadId"]})
        client.close(terminate=False)
    return stopped_at


@pytest.mark.slow
def test_attach_to_container_configuration(project, tmp_path):
    """The program runs at the "remote" path (the container's /workspaces/<project>); VS Code has the sources at
    another path and sets its breakpoint there; the configuration's pathMappings make it hit. (tests/test_container.py
    does the same against the real dev container.)"""
    config = launch_config(project, "Attach to container (debugpy :5678)")
    (mapping,) = config["pathMappings"]
    assert mapping["remoteRoot"] == f"/workspaces/{DEFAULT_PROJECT}"
    local = local_checkout(project, tmp_path / "local")
    start = time.monotonic()
    program = start_listening_pretrain(project, "--debugpy", "127.0.0.1:0", "--wait-for-client")
    try:
        match = program.wait_line(LISTEN, FIRST_STOP_TIMEOUT)
        host, port = match.group(1), int(match.group(2))
        resolved = with_vscode_defaults(config, local)  # ${workspaceFolder} = the local checkout
        resolved["connect"] = {"host": host, "port": port}
        resolved["pathMappings"] = [{"localRoot": resolved["pathMappings"][0]["localRoot"], "remoteRoot": str(project)}]
        assert resolved["pathMappings"][0]["localRoot"] == str(local)
        local_step = step_file(local)
        stopped_at = attach_and_stop(resolved, port, local_step, marker_line(local_step))
        report_timing("attach (container path mapping)", stopped_at - start)
        assert program.wait(EXIT_TIMEOUT) == 0, program.output
    finally:
        program.kill()


@pytest.mark.slow
def test_break_on_nonfinite_stops_in_the_debugger_at_the_module(project):
    """A NaN injected into layers.1.mlp at step 1 stops the debugger in the guard, which names the module."""
    config = launch_config(project, "Pretrain (debug profile)")
    # Two steps and a NaN at step 1: the guard's step is the training log's number, whether that counts from 0 or 1.
    config = {**config, "args": [*config["args"], "--train.max_steps", "2", "--break-on-nonfinite"]}
    client, start = run_launch(project, config, {}, env={INJECT_ENV: "layers.1.mlp:1"})
    try:
        stopped = client.wait_stopped(FIRST_STOP_TIMEOUT)
        report_timing("--break-on-nonfinite (injected NaN)", time.monotonic() - start)
        frames = client.request("stackTrace", {"threadId": stopped["threadId"], "levels": 30})["stackFrames"]
        guard = next(f for f in frames if f["source"].get("path", "").endswith("debug.py") and f["name"] == "_trip")
        where = client.evaluate("where", guard["id"])
        assert "layers.1.mlp" in where, where
        assert client.evaluate("self.step", guard["id"]) == "1"
        assert "1 NaN" in client.evaluate("self.report", guard["id"])
        client.request("continue", {"threadId": stopped["threadId"]})
        code = client.exit_code(EXIT_TIMEOUT)
        output = client.terminal_output()
        assert code != 0, "training must not go on with a NaN"
        assert "non-finite output of module 'layers.1.mlp' (SwiGLU) at step 1" in output, output[-3000:]
    finally:
        client.close()


@pytest.mark.slow
def test_break_on_nonfinite_without_debugger_is_a_clear_error(project):
    """A checkpoint every step and a NaN at step 3: the run stops with the module named, and step 2's checkpoint is
    still the latest. (The debug profile saves only at the end; the explicit --train.save_every beats it.)"""
    ckpts = project / "runs" / "nan-after-save-debug" / "checkpoints"
    args = ["--debug", "--name", "nan-after-save", "--train.max_steps", "4"]
    args += ["--train.save_every", "1", "--train.eval_every", "0", "--train.keep_checkpoints", "0"]
    program = start_pretrain(project, *args, "--break-on-nonfinite", env={INJECT_ENV: "layers.0.self_attn:3"})
    try:
        code = program.wait(EXIT_TIMEOUT)
        assert code != 0
        assert "non-finite output of module 'layers.0.self_attn'" in program.output
        assert "at step 3" in program.output
        assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000001", "step-000002"], program.output
        assert (ckpts / "latest").read_text().strip() == "step-000002", "the last good checkpoint stays the latest"
    finally:
        program.kill()


# --------------------------------------------------------------------------------------------- PyCharm (pydevd)


@pytest.mark.slow
def test_pycharm_debug_server_hits_the_breakpoint(project, tmp_path):
    """PyCharm's "Python Debug Server" played by the test: the program connects with --pycharm-debug, the
    IDE maps its local paths to the program's through the run configuration's path mapping."""
    (server,) = [c for c in pycharm_configs(project) if c.name == "Python Debug Server"]
    (mapping,) = server.element.findall("PathMappingSettings/option[@name='pathMappings']/list/mapping")
    assert mapping.get("remote-root") == f"/workspaces/{DEFAULT_PROJECT}"
    local = local_checkout(project, tmp_path / "local")
    local_root = Path(mapping.get("local-root").replace("$PROJECT_DIR$", str(local)))
    remote_root = project  # where the program really runs (the container's /workspaces/<project>)

    def to_remote(path: Path) -> str:
        return str(remote_root / path.relative_to(local_root))

    local_step = step_file(local)
    line = marker_line(local_step)
    with PydevdIDE() as ide:
        start = time.monotonic()
        program = start_listening_pretrain(project, "--pycharm-debug", f"127.0.0.1:{ide.port}")
        try:
            ide.accept(FIRST_STOP_TIMEOUT)
            assert ide.handshake()
            ide.set_breakpoint(to_remote(local_step), line)
            ide.run()
            thread_id, frames = ide.wait_suspended(FIRST_STOP_TIMEOUT)
            report_timing("PyCharm debug server (pydevd)", time.monotonic() - start)
            top = frames[0]
            assert Path(local_root / Path(top["file"]).relative_to(remote_root)) == local_step
            assert int(top["line"]) == line and top["name"] == "train_step"
            variables = ide.frame_variables(thread_id, top["id"])
            assert "loss" in variables and variables["loss"]["type"] == "Tensor", sorted(variables)
            ide.remove_breakpoint(to_remote(local_step))
            ide.resume(thread_id)
            assert program.wait(EXIT_TIMEOUT) == 0, program.output + ide.console_output()
            assert "done: step 1" in ide.console_output()  # stdout went to the IDE's console
        finally:
            program.kill()


# The oldest pydevd-pycharm build the project's `pycharm` extra allows (PyPI lists 243.15521.16 as the first 243
# build; 253 renamed settrace's stdoutToServer/stderrToServer keywords). The newest is whatever PyPI has today.
OLDEST_PYDEVD_PYCHARM = "243.15521.16"


def settrace_signature(archive: Path) -> inspect.Signature:
    """settrace's signature read from a pydevd-pycharm sdist or wheel without importing (or building) it."""
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as whl:
            (name,) = [n for n in whl.namelist() if n == "pydevd.py"]
            source = whl.read(name).decode("utf-8")
    else:
        with tarfile.open(archive) as sdist:
            (member,) = [m for m in sdist.getmembers() if m.name.count("/") == 1 and m.name.endswith("/pydevd.py")]
            source = sdist.extractfile(member).read().decode("utf-8")
    (func,) = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "settrace"]
    func.body, func.decorator_list, func.returns = [ast.Pass()], [], None
    module = ast.fix_missing_locations(ast.Module(body=[func], type_ignores=[]))
    namespace: dict = {}
    exec(compile(module, str(archive), "exec"), namespace)  # defaults are literals: nothing of pydevd runs
    return inspect.signature(namespace["settrace"])


@pytest.fixture(scope="session")
def pydevd_pycharm_archives(tmp_path_factory) -> dict[str, Path]:
    """The oldest allowed and the newest pydevd-pycharm from PyPI, downloaded once per session (no dependencies)."""
    out = tmp_path_factory.mktemp("pydevd-pycharm")
    archives = {}
    for label, requirement in (("oldest", f"pydevd-pycharm=={OLDEST_PYDEVD_PYCHARM}"), ("newest", "pydevd-pycharm")):
        dest = out / label
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), requirement],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot download {requirement} from the package index: {result.stderr.strip()[-300:]}")
        (archives[label],) = dest.iterdir()
    return archives


def test_pycharm_settrace_call_suits_every_allowed_build(project, pydevd_pycharm_archives):
    """The entry points' settrace call binds to the same meaning in the oldest allowed and the newest build."""
    pyproject = (project / "pyproject.toml").read_text(encoding="utf-8")
    (spec,) = re.findall(r'"pydevd-pycharm([<>=!~][^"]*)"', pyproject)
    assert SpecifierSet(spec).contains(OLDEST_PYDEVD_PYCHARM) and not SpecifierSet(spec).contains("242.26775.22")
    debug_py = project / "src" / DEFAULT_PACKAGE / "debug.py"
    (call,) = [
        node
        for node in ast.walk(ast.parse(debug_py.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "pydevd_pycharm.settrace"
    ]
    args = [ast.unparse(a) for a in call.args]
    kwargs = {k.arg: ast.unparse(k.value) for k in call.keywords}
    for label, archive in pydevd_pycharm_archives.items():
        signature = settrace_signature(archive)
        try:
            bound = signature.bind(*args, **kwargs).arguments
        except TypeError as error:
            raise AssertionError(f"{archive.name} ({label}): settrace{signature} rejects the call: {error}") from None
        meaning = {name.replace("_", "").lower(): value for name, value in bound.items()}
        assert meaning == {
            "host": "host",
            "stdouttoserver": "True",
            "stderrtoserver": "True",
            "port": "port",
            "suspend": "False",
        }, f"{archive.name} ({label}): {bound}"


def test_timings_are_reported(request, capsys):
    """Runs last in this module: one line per measured first stop, on the terminal and in the JUnit properties."""
    if not TIMINGS:
        pytest.skip("no debugger test ran (deselected)")
    with capsys.disabled():
        for name, seconds in TIMINGS.items():
            request.node.user_properties.append((f"first_breakpoint_s[{name}]", round(seconds, 2)))
            print(f"\nfirst breakpoint {seconds:6.2f} s  {name}", end="")
        print()
    assert all(0 < v < FIRST_STOP_TIMEOUT for v in TIMINGS.values())
