"""The generated PyCharm and VS Code files: parsed, every reference resolved, and every configuration translated into
the command the IDE would run and run (debug profile, a couple of steps)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import COMBINATIONS, DEFAULT_PACKAGE, DEFAULT_PROJECT, bake
from ide_configs import (
    RUN_ORDER,
    Command,
    base_env,
    iml_path,
    iml_roots,
    launch_configs,
    load_jsonc,
    match_problems,
    pycharm_command,
    pycharm_configs,
    resolve,
    strip_jsonc,
    tasks,
    vscode_launch_command,
    vscode_task_command,
    with_vscode_defaults,
)

SCHEMAS = Path(__file__).parent / "schemas"
INSTALL = 'python -m pip install -e ".[dev]"'

# The design's entry-point table: IDE name -> (module, arguments). Both IDEs must say exactly this.
ENTRY_POINTS = {
    "Pretrain": (".pretrain", ["--config", "configs/pretrain.yaml"]),
    "Pretrain (debug profile)": (".pretrain", ["--config", "configs/pretrain.yaml", "--debug"]),
    "Tune (debug study)": (".tune", ["--space", "configs/tune/pretrain.yaml", "--debug"]),
    "Fine-tune SFT": (".finetune", ["--config", "configs/finetune-sft.yaml"]),
    "Fine-tune classify": (".finetune", ["--config", "configs/finetune-classify.yaml"]),
    "Generate": (".generate", ["--prompt", "MACBETH."]),
    "Predict (text classifier)": (".predict", ["runs/finetune-classify", "samples/text"]),
    "Plan (memory)": (".plan", ["--config", "configs/pretrain.yaml", "--gpus", "8", "--gpu-mem", "80"]),
    "Tests (pytest)": ("pytest", ["tests"]),
    "TensorBoard": ("tensorboard.main", ["--logdir", "runs", "--port", "6006"]),
}
# The extra projects' entry points, present when the extra_projects answer selects them.
EXTRA_ENTRY_POINTS = {
    "vision": {
        "Vision (digits ResNet)": (".vision", ["--config", "configs/vision.yaml"]),
        "Predict (digits ResNet)": (".predict", ["runs/vision", "samples/digits"]),
    },
    "speech": {
        "Speech (commands Conformer)": (".speech", ["--config", "configs/speech.yaml"]),
        "Predict (commands Conformer)": (".predict", ["runs/speech", "samples/speech"]),
    },
}

# What a test appends to keep a run short: the debug profile and a couple of steps.
FAST_ARGS = {
    ".pretrain": ["--debug", "--train.max_steps", "1"],
    # a small validation split: the final evaluation otherwise dominates a 2-step run
    ".finetune": ["--debug", "--train.max_steps", "1", "--data.val_fraction", "0.02"],
    ".generate": ["--debug", "--max_new_tokens", "8"],
    ".tune": ["--debug", "--trials", "1"],  # one trial of the debug profile
    ".vision": ["--debug", "--train.max_steps", "1"],
    ".speech": ["--debug", "--train.max_steps", "1"],
    ".predict": ["--debug"],  # the run the --debug training wrote: RUN_DIR-debug
    ".plan": ["--debug"],  # the debug profile's model: the same table, nothing to wait for
    # only tests/test_debug.py is collected (importing every test module is most of a short run)
    "pytest": ["-q", "-p", "no:cacheprovider", "--ignore-glob=*/test_[!d]*.py", "-k", "test_debug or parse_address"],
}


def package_of(project: Path) -> str:
    return json.loads((project / ".cookiecutter.json").read_text())["context"]["package"]


def entry_points(project: Path) -> dict[str, tuple[str, list[str]]]:
    """ENTRY_POINTS plus the extra projects this project was baked with."""
    extra = json.loads((project / ".cookiecutter.json").read_text())["context"]["extra_projects"]
    chosen = [name for name in EXTRA_ENTRY_POINTS if extra in (name, "both")]
    return {**ENTRY_POINTS, **{k: v for name in chosen for k, v in EXTRA_ENTRY_POINTS[name].items()}}


def expected_module(module: str, package: str) -> str:
    return package + module if module.startswith(".") else module


def normalized(command: Command) -> tuple[list[str], Path]:
    """Arguments naming an existing path relative to the working directory made absolute (PyCharm's pytest target
    is ``$PROJECT_DIR$/tests``, VS Code's ``tests``)."""
    argv = [
        str(command.cwd / a) if a and (command.cwd / a).exists() and not Path(a).is_absolute() else a
        for a in command.argv
    ]
    return argv, command.cwd


def fast_args(argv: list[str], package: str) -> list[str]:
    """FAST_ARGS for the command's module, without repeating a flag the configuration already passes."""
    module = argv[argv.index("-m") + 1] if "-m" in argv else ""
    extra = FAST_ARGS.get(module[len(package) :] if module.startswith(package) else module, [])
    return [arg for arg in extra if not (arg == "--debug" and arg in argv)]


def ide_projects(baked_projects: dict[str, Path], folder: str) -> list[Path]:
    return [p for p in baked_projects.values() if (p / folder).is_dir()]


# --------------------------------------------------------------------------------------------- which files exist


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_ide_folders_follow_the_answers(baked_projects, name):
    project, answers = baked_projects[name], COMBINATIONS[name]
    ide, container = answers.get("ide", "both"), answers.get("devcontainer", "yes")
    assert (project / ".idea").is_dir() == (ide in ("both", "pycharm"))
    assert (project / ".vscode").is_dir() == (ide in ("both", "vscode"))
    assert (project / ".devcontainer").is_dir() == (container == "yes")
    assert not (project / ".idea" / "workspace.xml").exists()


def test_shared_ide_files_are_not_gitignored(default_project):
    """A popular mistake: ignoring .idea/runConfigurations or .vscode/launch.json in the top .gitignore."""
    git = shutil.which("git")
    if git is None or not (default_project / ".git").is_dir():
        pytest.skip("needs git and the repository the post-gen hook creates")
    shared = [
        ".idea/runConfigurations/Pretrain.xml",
        ".idea/misc.xml",
        ".idea/modules.xml",
        f".idea/{DEFAULT_PROJECT}.iml",
        ".vscode/launch.json",
        ".vscode/settings.json",
        ".vscode/tasks.json",
        ".vscode/extensions.json",
        ".devcontainer/devcontainer.json",
    ]
    for path in shared:
        assert (default_project / path).is_file(), path
        ignored = subprocess.run([git, "check-ignore", "-q", path], cwd=default_project, check=False)
        assert ignored.returncode == 1, f"{path} is git-ignored"
    per_user = [".idea/workspace.xml", ".idea/shelf/x.xml", ".vscode/x.log"]
    for path in per_user:
        assert subprocess.run([git, "check-ignore", "-q", path], cwd=default_project, check=False).returncode == 0


def test_no_template_syntax_left(baked_projects):
    for project in baked_projects.values():
        for folder in (".idea", ".vscode", ".devcontainer"):
            for path in (project / folder).rglob("*") if (project / folder).exists() else []:
                if path.is_file():
                    text = path.read_text(encoding="utf-8")
                    assert "cookiecutter" not in text and "{{" not in text and "{%" not in text, path


# --------------------------------------------------------------------------------------------- PyCharm


def test_pycharm_project_files(baked_projects):
    projects = ide_projects(baked_projects, ".idea")
    assert len(projects) >= 2
    for project in projects:
        answers = json.loads((project / ".cookiecutter.json").read_text())["context"]
        idea = project / ".idea"
        for path in idea.rglob("*.xml"):
            ET.parse(path)  # every XML file parses
        # misc.xml names the interpreter exactly as PyCharm names a project venv.
        jdk = ET.parse(idea / "misc.xml").getroot().find("component[@name='ProjectRootManager']")
        assert jdk.get("project-jdk-name") == f"Python {answers['python_version']} ({project.name})"
        assert jdk.get("project-jdk-type") == "Python SDK"
        # modules.xml -> the .iml, whose stem is the module name the run configurations use.
        iml = iml_path(project)
        assert iml.is_file() and iml.parent == idea and iml.stem == project.name
        module = ET.parse(iml).getroot()
        assert module.get("type") == "PYTHON_MODULE"
        runner = module.find("component[@name='TestRunnerService']/option[@name='PROJECT_TEST_RUNNER']")
        assert runner is not None and runner.get("value") == "py.test"
        roots = iml_roots(project)
        assert roots["content"] == [project]
        assert roots["source"] == [project / "src"] and roots["test"] == [project / "tests"]
        assert all(p.is_dir() for p in roots["source"] + roots["test"])
        assert {project / ".venv", project / "runs"} <= set(roots["exclude"])
        assert (project / "src" / answers["package"] / "__init__.py").is_file()
        vcs = ET.parse(idea / "vcs.xml").getroot().find("component/mapping")
        assert vcs.get("vcs") == "Git" and vcs.get("directory") == "$PROJECT_DIR$"
        ignored = (idea / ".gitignore").read_text().split()
        assert {"/workspace.xml", "/shelf/"} <= set(ignored)
        profile = ET.parse(idea / "inspectionProfiles" / "profiles_settings.xml").getroot()
        assert profile.get("name") == "InspectionProjectProfileManager"


def test_pycharm_run_configurations(baked_projects):
    for project in ide_projects(baked_projects, ".idea"):
        package = package_of(project)
        configs = {c.name: c for c in pycharm_configs(project)}
        assert set(configs) == set(entry_points(project)) | {"Python Debug Server"}
        for cfg in configs.values():
            assert cfg.module == iml_path(project).stem, cfg.file
        for name, (module, args) in entry_points(project).items():
            cfg = configs[name]
            if cfg.type == "PythonConfigurationType":
                o = cfg.options
                # Follows whatever interpreter the project uses (.venv, a container), with sources on the path.
                assert o["IS_MODULE_SDK"] == "true" and o["SDK_HOME"] == "", name
                assert o["MODULE_MODE"] == "true" and o["WORKING_DIRECTORY"] == "$PROJECT_DIR$", name
                assert o["ADD_SOURCE_ROOTS"] == "true" and o["ADD_CONTENT_ROOTS"] == "true", name
                if o["SCRIPT_NAME"].startswith(package + "."):
                    assert (project / "src" / package / (o["SCRIPT_NAME"].split(".", 1)[1] + ".py")).is_file()
            else:
                assert (cfg.type, cfg.factory) == ("tests", "py.test")
            command = pycharm_command(cfg, project, "python")
            target = ["-m", expected_module(module, package)]
            expected = Command(name, ["python", *target, *args], project)
            assert normalized(command) == normalized(expected), name
            assert command.cwd == project
            assert str(project / "src") in command.env["PYTHONPATH"].split(":")
            for flag, value in zip(command.argv, command.argv[1:], strict=False):
                if flag == "--config":
                    assert (project / value).is_file(), f"{name}: {value} does not exist"
            for value in command.argv:
                if value.startswith("samples/"):  # the inputs of a predict configuration ship with the project
                    assert any((project / value).rglob("*.*")), f"{name}: {value} holds no input files"


def test_pycharm_debug_server_configuration(baked_projects):
    for project in ide_projects(baked_projects, ".idea"):
        (cfg,) = [c for c in pycharm_configs(project) if c.name == "Python Debug Server"]
        assert (cfg.type, cfg.factory) == ("PyRemoteDebugConfigurationType", "Python Remote Debug")
        assert 1024 <= int(cfg.options["PORT"]) < 65536 and cfg.options["HOST"] == "localhost"
        (mapping,) = cfg.element.findall("PathMappingSettings/option[@name='pathMappings']/list/mapping")
        assert mapping.get("local-root") == "$PROJECT_DIR$"
        assert mapping.get("remote-root") == f"/workspaces/{project.name}"
        devcontainer = project / ".devcontainer" / "devcontainer.json"
        if devcontainer.exists():
            assert load_jsonc(devcontainer)["workspaceFolder"] == mapping.get("remote-root")


# --------------------------------------------------------------------------------------------- VS Code


def test_vscode_files_are_strict_json(baked_projects):
    for project in ide_projects(baked_projects, ".vscode"):
        for name in ("settings", "tasks", "extensions"):
            json.loads((project / ".vscode" / f"{name}.json").read_text(encoding="utf-8"))  # pre-commit check-json
        # launch.json has comments (VS Code's own format, JSONC; pre-commit leaves it out): strict once they are gone.
        launch = strip_jsonc((project / ".vscode" / "launch.json").read_text(encoding="utf-8"))
        assert not re.search(r",\s*[}\]]", launch), "a trailing comma"
        json.loads(launch)


def test_launch_json_matches_schema_and_entry_points(baked_projects):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((SCHEMAS / "launch.debugpy.schema.json").read_text())
    for project in ide_projects(baked_projects, ".vscode"):
        package = package_of(project)
        launch = load_jsonc(project / ".vscode" / "launch.json")
        jsonschema.validate(launch, schema)
        configs = {c["name"]: c for c in launch["configurations"]}
        assert len(configs) == len(launch["configurations"]), "duplicate names"
        launchable = {c["name"] for c in launch["configurations"] if c["request"] == "launch" and "module" in c}
        assert launchable - {"Debug test (Testing view)"} == set(entry_points(project)) - {"TensorBoard"}
        for name, (module, args) in entry_points(project).items():
            if name == "TensorBoard":
                continue  # a task, not something to debug
            cfg = configs[name]
            assert cfg["type"] == "debugpy" and cfg["request"] == "launch"
            assert cfg["module"] == expected_module(module, package) and cfg["args"] == args
            assert cfg["env"]["PYTHONPATH"] == "${workspaceFolder}/src"  # works before the project is installed
            assert cfg["cwd"] == "${workspaceFolder}"
        (debug_test,) = [c for c in configs.values() if "debug-test" in c.get("purpose", [])]
        assert debug_test["request"] == "launch"
        attaches = [c for c in configs.values() if c["request"] == "attach"]
        (container,) = [c for c in attaches if c.get("pathMappings")]
        assert container["connect"]["port"] == 5678
        (mapping,) = container["pathMappings"]
        assert mapping == {"localRoot": "${workspaceFolder}", "remoteRoot": f"/workspaces/{project.name}"}
        assert all(c["connect"]["host"] in ("127.0.0.1", "localhost") for c in attaches)


def test_local_attach_starts_the_waiting_task(baked_projects):
    """ "Attach to local process" first runs the task that starts training paused on the port it attaches to."""
    for project in ide_projects(baked_projects, ".vscode"):
        (attach,) = [c for c in launch_configs(project) if c["name"].startswith("Attach to local process")]
        (task,) = [t for t in tasks(project) if t["label"] == attach.get("preLaunchTask")]
        command = vscode_task_command(task, project, "python")
        host, port = command.argv[command.argv.index("--debugpy") + 1].rsplit(":", 1)
        assert "--wait-for-client" in command.argv and attach["connect"] == {"host": host, "port": int(port)}
        # VS Code starts the debug session once the background task's matcher reports the end of its start-up.
        assert task["isBackground"] is True
        background = task["problemMatcher"]["background"]
        assert background["activeOnStart"] is True
        assert re.search(background["endsPattern"], f"debugpy listening on {host}:{port}")


def test_torchrun_compound_attaches_rank_0_and_1(baked_projects):
    """torchrun ranks listen on PORT + RANK (debug.py): the compound attaches to 5678 and 5679 at once."""
    for project in ide_projects(baked_projects, ".vscode"):
        launch = load_jsonc(project / ".vscode" / "launch.json")
        configs = {c["name"]: c for c in launch["configurations"]}
        (compound,) = [c for c in launch["compounds"] if "torchrun" in c["name"]]
        members = [configs[name] for name in compound["configurations"]]
        assert [m["request"] for m in members] == ["attach", "attach"]
        assert [m["connect"] for m in members] == [{"host": "127.0.0.1", "port": 5678 + rank} for rank in (0, 1)]
        assert not any("preLaunchTask" in m for m in members), "each rank is started by torchrun, not per session"


def tasks_validator():
    jsonschema = pytest.importorskip("jsonschema")
    path = SCHEMAS / "tasks.schema.json"
    if not path.is_file():
        pytest.skip(f"{path} is missing (see tests/schemas/SOURCES.md)")
    return jsonschema.Draft7Validator(json.loads(path.read_text(encoding="utf-8")))


def schema_errors(validator, instance) -> list[str]:
    """The innermost errors (oneOf branches report their own), one line each."""

    def leaves(error):
        if not error.context:
            yield error
        for child in error.context:
            yield from leaves(child)

    return sorted(
        {f"{list(e.absolute_path)}: {e.message[:160]}" for top in validator.iter_errors(instance) for e in leaves(top)}
    )


def test_tasks_schema_rejects_what_vs_code_rejects():
    validator = tasks_validator()
    task = {"label": "t", "type": "process", "command": "python"}
    assert not schema_errors(validator, {"version": "2.0.0", "tasks": [task]})
    background = {"activatesOnStart": True, "beginsPattern": "a", "endsPattern": "b"}
    for bad in (
        {
            "version": "2.0.0",
            "tasks": [{**task, "problemMatcher": {"pattern": {"regexp": "x"}, "background": background}}],
        },
        {"version": "2.0.0", "tasks": [{**task, "isBackgrond": True}]},
        {"version": "2.0.0", "tasks": [{"label": "t", "type": "process"}]},  # a process task needs a command
        {"version": "2.0.0", "tasks": [{**task, "group": {"kind": "tests"}}]},
        {"tasks": [task]},
    ):
        assert schema_errors(validator, bad), bad


def test_tasks_json_matches_vscode_schema(baked_projects):
    validator = tasks_validator()
    for project in ide_projects(baked_projects, ".vscode"):
        errors = schema_errors(validator, json.loads((project / ".vscode" / "tasks.json").read_text()))
        assert not errors, f"{project.name}: " + "\n".join(errors)


def test_task_problem_matchers_report_real_files(default_project):
    """Run through VS Code's matching rules, every problem a task's matcher reports names a file that exists and a
    line number: here on a real traceback out of the project's code and on the entry points' one-line errors."""
    crash = subprocess.run(
        [sys.executable, "-c", f"from {DEFAULT_PACKAGE}.debug import parse_address; parse_address('host:port')"],
        cwd=default_project,
        env={**base_env(), "PYTHONPATH": str(default_project / "src")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "Traceback" in crash.stderr, crash.stderr
    one_line_error = "error: --debugpy: invalid address 'host:port': expected [HOST:]PORT with PORT in 0..65535"
    output = [*crash.stderr.splitlines(), one_line_error]
    debug_py = default_project / "src" / DEFAULT_PACKAGE / "debug.py"
    matchers = [t["problemMatcher"] for t in tasks(default_project) if isinstance(t.get("problemMatcher"), dict)]
    assert matchers, "the background task needs a matcher (VS Code waits for its endsPattern)"
    for matcher in matchers:
        problems = match_problems(matcher, output)
        for problem in problems:
            assert Path(problem.file).is_file() and isinstance(problem.line, int), problem
        assert any(Path(p.file) == debug_py and p.message == "parse_address" for p in problems), problems


def test_both_ides_run_the_same_commands(default_project):
    """Same-named configurations in PyCharm and VS Code translate to the same command line and directory."""
    py = {
        c.name: pycharm_command(c, default_project, "python")
        for c in pycharm_configs(default_project)
        if c.type != "PyRemoteDebugConfigurationType"
    }
    vs = {
        c["name"]: vscode_launch_command(c, default_project, "python")
        for c in launch_configs(default_project)
        if c["request"] == "launch" and "module" in c
    }
    vs.update({t["label"]: vscode_task_command(t, default_project, "python") for t in tasks(default_project)})
    shared = set(py) & set(vs)
    assert shared >= set(entry_points(default_project))
    for name in shared:
        assert normalized(vs[name]) == normalized(py[name]), name


def test_settings_tasks_extensions(baked_projects):
    for project in ide_projects(baked_projects, ".vscode"):
        vscode = project / ".vscode"
        settings = json.loads((vscode / "settings.json").read_text())
        assert settings["python.testing.pytestEnabled"] is True and settings["python.testing.pytestArgs"] == ["tests"]
        assert settings["[python]"]["editor.defaultFormatter"] == "charliermarsh.ruff"
        assert not any(key.startswith("ruff.") and key.endswith("args") for key in settings)  # deprecated
        tasks_json = json.loads((vscode / "tasks.json").read_text())
        assert tasks_json["version"] == "2.0.0"
        labels = [t["label"] for t in tasks_json["tasks"]]
        assert len(labels) == len(set(labels))
        default_test = [t for t in tasks_json["tasks"] if t.get("group") == {"kind": "test", "isDefault": True}]
        assert len(default_test) == 1
        for cfg in launch_configs(project):
            if "preLaunchTask" in cfg:
                assert cfg["preLaunchTask"] in labels
        debugpy_task = [t for t in tasks_json["tasks"] if "--wait-for-client" in t.get("args", [])]
        assert len(debugpy_task) == 1 and debugpy_task[0]["isBackground"] is True
        extensions = json.loads((vscode / "extensions.json").read_text())
        assert {"ms-python.python", "ms-python.debugpy", "charliermarsh.ruff"} <= set(extensions["recommendations"])
        assert "ms-python.black-formatter" in extensions["unwantedRecommendations"]
        for ext in extensions["recommendations"] + extensions["unwantedRecommendations"]:
            publisher, _, name = ext.partition(".")
            assert publisher and name, ext


def test_custom_names_reach_every_ide_file(baked_projects):
    project = baked_projects["custom-names"]
    assert project.name == "my-llm2"
    configs = {c.name: c for c in pycharm_configs(project)}
    assert configs["Pretrain"].options["SCRIPT_NAME"] == "my_llm_core.pretrain"
    assert configs["Pretrain"].module == "my-llm2" and (project / ".idea" / "my-llm2.iml").is_file()
    launch = {c["name"]: c for c in launch_configs(project)}
    assert launch["Generate"]["module"] == "my_llm_core.generate"


# --------------------------------------------------------------------------------------------- run them


@pytest.fixture(scope="module")
def run_project(tmp_path_factory) -> Path:
    """A project of our own: runs write runs/ and caches into it."""
    return bake(tmp_path_factory.mktemp("ide-run"))


_RUNS: dict[tuple, subprocess.CompletedProcess[str]] = {}


def run_command(command: Command, extra: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run once per distinct (command line, directory, environment): "Pretrain" plus the fast arguments is the
    very same process as "Pretrain (debug profile)" plus them."""
    key = (tuple(normalized(command)[0] + extra), command.cwd, tuple(sorted(command.env.items())))
    if key in _RUNS:
        return _RUNS[key]
    result = subprocess.run(
        [*command.argv, *extra],
        cwd=command.cwd,
        env=command.full_env(base_env()),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, (
        f"{command.name}: {' '.join(command.argv + extra)} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )
    _RUNS[key] = result
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_tensorboard(command: Command, timeout: float = 90) -> None:
    """Start TensorBoard as configured (on a free port), wait until it answers HTTP, stop it."""
    argv = list(command.argv)
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    proc = subprocess.Popen(
        argv,
        cwd=command.cwd,
        env=command.full_env(base_env()),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"TensorBoard exited {proc.returncode}: {proc.stderr.read()[-2000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    assert response.status == 200
                    return
            except OSError:
                assert time.monotonic() < deadline, "TensorBoard did not answer"
                time.sleep(0.5)
    finally:
        from dap import kill_group

        kill_group(proc.pid)
        proc.wait(timeout=10)
        proc.stderr.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", [*RUN_ORDER, "TensorBoard"])
def test_pycharm_configuration_runs(run_project, name):
    (cfg,) = [c for c in pycharm_configs(run_project) if c.name == name]
    command = pycharm_command(cfg, run_project)
    if name == "TensorBoard":
        serve_tensorboard(command)
        return
    run_command(command, fast_args(command.argv, DEFAULT_PACKAGE))


@pytest.mark.slow
def test_vscode_tasks_run(run_project):
    """Every task's command: tests, TensorBoard, and the debugpy task (listens, then we attach and let it go)."""
    from dap import DAPClient

    for task in tasks(run_project):
        command = vscode_task_command(task, run_project)
        if "tensorboard.main" in command.argv:
            serve_tensorboard(command)
        elif "--wait-for-client" in command.argv:
            argv = list(command.argv)
            argv[argv.index("--debugpy") + 1] = "127.0.0.1:0"
            from test_debugger import LISTEN, Program

            program = Program([*argv, *fast_args(argv, DEFAULT_PACKAGE)], command.cwd, command.full_env(base_env()))
            try:
                match = program.wait_line(LISTEN, timeout=120)
                host, port = match.group(1), int(match.group(2))
                (local_attach,) = [c for c in launch_configs(run_project) if c.get("preLaunchTask") == task["label"]]
                attach = with_vscode_defaults(local_attach, run_project)
                task_port = int(command.argv[command.argv.index("--debugpy") + 1].rsplit(":", 1)[1])
                assert attach["connect"] == {"host": "127.0.0.1", "port": task_port}
                attach["connect"] = {"host": host, "port": port}  # the task's port, made free for the test
                with DAPClient.connect(host, port) as client:
                    client.initialize()
                    seq = client.send_request("attach", attach)
                    client.configure({})
                    client.wait_response(seq)
                    client.close(terminate=False)
                assert program.wait(timeout=120) == 0, program.output
            finally:
                program.kill()
        else:
            run_command(command, fast_args(command.argv, DEFAULT_PACKAGE))


def test_resolve_refuses_variables_only_vscode_knows(default_project):
    from ide_configs import Unresolvable

    assert resolve("${workspaceFolder}/src", default_project) == f"{default_project}/src"
    with pytest.raises(Unresolvable):
        resolve("${file}", default_project)
    with pytest.raises(Unresolvable):
        resolve("${input:port}", default_project)


def test_template_repository_pycharm_project(tmp_path):
    """The template's own .idea: tests are the test root, the Jinja project dir is excluded, configurations run."""
    template = Path(__file__).resolve().parents[1]
    roots = iml_roots(template)
    assert roots["test"] == [template / "tests"] and roots["source"] == []
    assert template / "{{cookiecutter.project}}" in roots["exclude"]
    configs = {c.name: c for c in pycharm_configs(template)}
    assert set(configs) == {"Template tests", "Bake defaults"}
    assert all(c.module == iml_path(template).stem for c in configs.values())
    tests_cmd = pycharm_command(configs["Template tests"], template, "python")
    assert tests_cmd.argv == ["python", "-m", "pytest", str(template / "tests")]
    bake_cmd = pycharm_command(configs["Bake defaults"], template)
    argv = list(bake_cmd.argv)
    argv[argv.index("--output-dir") + 1] = str(tmp_path)  # not into the checkout's build/
    result = subprocess.run(
        argv,
        cwd=bake_cmd.cwd,
        env=bake_cmd.full_env(base_env()),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / DEFAULT_PROJECT / ".idea" / "runConfigurations" / "Pretrain.xml").is_file()
