"""``python -m <package>.tune``: the space file's one-line errors, trials that are normal runs with the recipe's
metric as objective, pruned trials marked PRUNED, two workers sharing one study without losing or repeating a
trial, a killed study that resumes its trial from the run's checkpoint, and what a study leaves behind (table,
best.yaml that --config takes, plots, hparams). Vision's study: test_vision.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage
from optuna.trial import TrialState

from {{ cookiecutter.package }} import tune
from {{ cookiecutter.package }}.config import DebugConfig, parse_config
from {{ cookiecutter.package }}.config.finetune import FinetuneConfig
from {{ cookiecutter.package }}.config.pretrain import PretrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LR = {"low": 1.0e-3, "high": 1.0e-2, "log": True}


def _overrides(pretrain_args: list[str]) -> dict:
    """The tiny pre-training run of conftest's pretrain_args as the space's overrides (dotted paths)."""
    pairs = dict(zip(pretrain_args[::2], pretrain_args[1::2], strict=True))
    return {k[2:]: yaml.safe_load(v) for k, v in pairs.items() if k not in ("--name", "--out_dir")}


def _space(tmp_path: Path, pretrain_args: list[str], **fields) -> Path:
    space = {"program": "pretrain", "trials": 3, "pruner": "none", "overrides": _overrides(pretrain_args)}
    space["params"] = {"optim.lr": LR}
    space.update(fields)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space), encoding="utf-8")
    return path


def _storage(study_dir: Path) -> JournalStorage:
    path = str(study_dir / "journal.log")
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def _exit_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        tune.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ---- bad input: one line, exit 2 -------------------------------------------------------------------------------------


def _param(path: str, **spec) -> dict:
    return dict(params={path: spec})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (_param("optim.lrr", **LR), "unknown config path 'optim.lrr': optim has no field 'lrr'"),
        (_param("trainer.lr", **LR), "unknown config path 'trainer.lr': PretrainConfig has no field 'trainer'"),
        (dict(overrides={"train.max_step": 3}), "unknown config path 'train.max_step': train has no field 'max_step'"),
        (_param("optim.lr", low=0.01, high=0.01), "params.optim.lr: empty range [0.01, 0.01]"),
        (_param("optim.warmup_steps", low=5, high=2), "params.optim.warmup_steps: empty range [5, 2]"),
        (_param("train.batch_size", choices=[]), "params.train.batch_size: empty choices"),
        (_param("train.batch_size", low=2.5, high=8), "low, high and step must be int numbers"),
        (_param("optim.lr", low=0.0, high=0.1, log=True), "a log range needs low > 0"),
        (_param("train.device", low=1, high=2), "a range needs an int or float field"),
        ({"program": "generate"}, "program 'generate' is not a training program here"),
        ({"pruner": "hyperband"}, "pruner must be one of median, successive_halving, none"),
        ({"trial": 3}, "unknown key 'trial'"),
        (
            dict(overrides={"train.early_stopping.metric": "accuracy"}),
            "train.early_stopping.metric='accuracy' is not reported by pretrain: it reports loss, perplexity",
        ),
    ],
)
def test_bad_space_files_exit_2_with_one_line(tmp_path, pretrain_args, capsys, fields, message):
    line = _exit_line(capsys, ["--space", str(_space(tmp_path, pretrain_args, **fields)), "--out_dir", str(tmp_path)])
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "tune-space" / "trials").exists()  # nothing ran


def test_a_value_the_program_refuses_exits_2_before_any_trial(tmp_path, pretrain_args, capsys):
    space = _space(tmp_path, pretrain_args, params={"optim.lr": dict(low=1.0e-6, high=1.0e-5, log=True)})
    line = _exit_line(capsys, ["--space", str(space), "--out_dir", str(tmp_path)])  # min_lr 3e-5 > lr
    assert "optim.min_lr" in line and "expected in [0, optim.lr]" in line


@pytest.mark.parametrize("url", ["sqlite:////nonexistent/dir/study.db", "nosuchdialect://host/db"])
def test_a_storage_that_cannot_be_opened_exits_2(tmp_path, pretrain_args, capsys, url):
    line = _exit_line(capsys, ["--space", str(_space(tmp_path, pretrain_args)), "--storage", url])
    assert line.startswith(f"error: --storage {url} cannot be opened: ")


def test_missing_optuna_names_the_extra(tmp_path, pretrain_args, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    line = _exit_line(capsys, ["--space", str(_space(tmp_path, pretrain_args))])
    assert line == 'error: tune needs the optional extra: pip install -e ".[tune]" (optuna, matplotlib)'


def test_every_shipped_space_parses_into_its_program(monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    for path in sorted((CONFIGS / "tune").glob("*.yaml")):
        space = tune.load_space(path)
        metric, _ = tune.check(space, DebugConfig())
        assert space.params and metric in space.module.reported_metrics(space.config({}, False)), path.name


# ---- studies ---------------------------------------------------------------------------------------------------------


def test_a_study_runs_normal_trials_and_leaves_a_recipe_plots_and_hparams(tmp_path, pretrain_args, capsys):
    space = _space(tmp_path, pretrain_args, trials=2, params={"optim.lr": LR, "train.batch_size": dict(choices=[2, 4])})
    study = tune.run(*parse_config(tune.TuneConfig, ["--space", str(space), "--out_dir", str(tmp_path / "runs")]))
    study_dir = tmp_path / "runs" / "tune-space"
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:  # a normal run each: its config, checkpoints, metrics; the objective its last validation loss
        run_dir = study_dir / "trials" / f"trial-{t.number:03d}"
        cfg, _ = parse_config(PretrainConfig, ["--config", str(run_dir / "config.yaml")])
        assert (cfg.optim.lr, cfg.train.batch_size) == (t.params["optim.lr"], t.params["train.batch_size"])
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert t.value == records[-1]["eval_loss"] and t.intermediate_values == {4: records[3]["eval_loss"], 8: t.value}
        assert (run_dir / "checkpoints" / "step-000008").is_dir()
    best = min(trials, key=lambda t: t.value)
    recipe, _ = parse_config(PretrainConfig, ["--config", str(study_dir / "best.yaml")])
    assert (recipe.optim.lr, recipe.train.batch_size) == (best.params["optim.lr"], best.params["train.batch_size"])
    assert recipe.train.max_steps == 8 and recipe.name == "pretrain"  # the overrides; a run of its own name
    assert sorted(p.name for p in (study_dir / "plots").iterdir()) == sorted(tune_report_plots())
    rows = (study_dir / "trials.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:6] == ["trial", "state", "loss", "run", "seconds", "cpu_seconds"] and len(rows) == 3
    assert all(t.user_attrs["cpu_seconds"] > 0 for t in trials)  # the worker's CPU time in each trial
    assert all(list((study_dir / "tb" / f"trial-{t.number:03d}").rglob("events.out.tfevents.*")) for t in trials)
    out = capsys.readouterr().out
    assert f"best: trial {best.number}, validation loss {best.value:.4g}" in out


def tune_report_plots() -> list[str]:
    from {{ cookiecutter.package }}.tune_report import PLOTS

    return list(PLOTS)


def test_a_poor_trial_is_pruned_and_marked_pruned(tmp_path, pretrain_args):
    space = _space(tmp_path, pretrain_args, trials=3, pruner="median")
    study_dir = tmp_path / "runs" / "tune-space"
    study_dir.mkdir(parents=True)
    queued = optuna.create_study(study_name="tune-space", storage=_storage(study_dir), direction="minimize")
    for lr in (3e-3, 3e-3, 1.0e-3):  # the third learns slowest: worse than the median at its first evaluation
        queued.enqueue_trial({"optim.lr": lr})
    study = tune.run(*parse_config(tune.TuneConfig, ["--space", str(space), "--out_dir", str(tmp_path / "runs")]))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    pruned = study.trials[2]
    assert list(pruned.intermediate_values) == [4]  # Optuna keeps its last report as its value
    assert not (study_dir / "trials" / "trial-002" / "checkpoints" / "step-000008").exists()


def test_a_trial_the_program_refuses_fails_alone_and_the_study_goes_on(tmp_path, pretrain_args, capsys):
    space = _space(tmp_path, pretrain_args, trials=2, params={"train.batch_size": dict(choices=[4, 0])})
    study_dir = tmp_path / "runs" / "tune-space"
    study_dir.mkdir(parents=True)
    queued = optuna.create_study(study_name="tune-space", storage=_storage(study_dir), direction="minimize")
    for batch_size in (0, 4):
        queued.enqueue_trial({"train.batch_size": batch_size})
    study = tune.run(*parse_config(tune.TuneConfig, ["--space", str(space), "--out_dir", str(tmp_path / "runs")]))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    err = capsys.readouterr().err
    assert "error: train.batch_size=0 is invalid: expected >= 1" in err
    assert "trial 0: failed: the program refused its config (the error above)" in err


def _start(space: Path, out: Path, env: dict, package: str, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", f"{package}.tune", "--space", str(space), "--out_dir", str(out), *extra]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two_workers_share(space: Path, out: Path, env: dict, package: str, storage: Callable, *extra: str) -> None:
    """Two workers on one study of 4 trials (``extra``: their storage option; ``storage()`` opens it): trials 0 to
    3, each complete, each run by exactly one worker, both taking part."""
    workers = [_start(space, out, env, package, *extra) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = optuna.load_study(study_name="tune-space", storage=storage())
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both took part
    runs = sorted(p.name for p in (out / "tune-space" / "trials").iterdir())
    assert runs == [f"trial-{n:03d}" for n in range(4)]
    for output in outputs:  # each trial ran in exactly one worker
        assert sum(f"trial {n}: validation loss" in output for n in range(4)) >= 1
    assert sum(f"trial {n}: validation loss" in output for n in range(4) for output in outputs) == 4


@pytest.mark.slow
def test_two_workers_share_one_study_without_losing_or_repeating_a_trial(
    tmp_path, pretrain_args, subprocess_env, package_name
):
    space, out = _space(tmp_path, pretrain_args, trials=4), tmp_path / "runs"
    _two_workers_share(space, out, subprocess_env, package_name, lambda: _storage(out / "tune-space"))


POSTGRES_MISSING = "PostgreSQL is not installed (Debian: apt-get install postgresql; pip install psycopg2-binary)"


def _postgres_bindir() -> Path | None:
    """The server's programs (initdb, pg_ctl): where pg_config says, else Debian's versioned directory."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if done.returncode == 0 and (Path(done.stdout.strip()) / "initdb").is_file():
            return Path(done.stdout.strip())
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


@pytest.fixture
def postgres_url():
    """A throw-away PostgreSQL cluster on a unix socket, its database ``study``: its SQLAlchemy URL."""
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip(POSTGRES_MISSING)
    pytest.importorskip("psycopg2", reason=POSTGRES_MISSING)
    root = Path(tempfile.mkdtemp(prefix="pg"))  # short: a socket's path has at most 107 bytes
    as_owner: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: the cluster is the postgres user's
        shutil.chown(root, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    server = f"-k {root} -c listen_addresses='' -F"  # no TCP port to collide with; no fsync in a throw-away
    steps = [
        ["initdb", "-D", f"{root}/data", "-A", "trust", "-U", "tune", "--no-sync", "-E", "UTF8"],
        ["pg_ctl", "-D", f"{root}/data", "-l", f"{root}/server.log", "-o", server, "-w", "start"],
        ["createdb", "-h", str(root), "-U", "tune", "study"],
    ]
    try:
        for program, *args in steps:
            argv = [*as_owner, str(bindir / program), *args]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{program}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        yield f"postgresql+psycopg2://tune@/study?host={root}"
    finally:
        stop = [*as_owner, str(bindir / "pg_ctl"), "-D", f"{root}/data", "-m", "immediate", "stop"]
        subprocess.run(stop, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow  # like the other PostgreSQL test: the fast tier runs where no server is installed (the container)
def test_workers_opening_a_new_postgresql_study_at_once_all_get_it(tmp_path, postgres_url):
    """On an empty database every opener creates the tables: PostgreSQL fails all but one with a duplicate key (what
    the two-worker test met in CI). Six openers released together must all get the storage."""
    start = threading.Barrier(6)

    def open_together() -> object:
        start.wait()
        return tune.open_storage(optuna, postgres_url, tmp_path)

    with ThreadPoolExecutor(6) as pool:
        storages = list(pool.map(lambda _: open_together(), range(6)))
    assert all(isinstance(s, optuna.storages.RDBStorage) for s in storages)
    assert optuna.get_all_study_names(storages[0]) == []


@pytest.mark.slow
def test_two_workers_share_one_postgresql_study(tmp_path, pretrain_args, subprocess_env, package_name, postgres_url):
    space, out = _space(tmp_path, pretrain_args, trials=4), tmp_path / "runs"
    storage = partial(optuna.storages.RDBStorage, postgres_url)
    _two_workers_share(space, out, subprocess_env, package_name, storage, "--storage", postgres_url)
    assert not (out / "tune-space" / "journal.log").exists()  # the study lived in the database


@pytest.mark.slow
def test_a_killed_study_resumes_its_trial_from_the_checkpoint(tmp_path, pretrain_args, subprocess_env, package_name):
    slow = {**_overrides(pretrain_args), "train.max_steps": 200, "train.save_every": 4, "train.eval_every": 100}
    space = _space(tmp_path, pretrain_args, trials=1, overrides=slow)
    study_dir = tmp_path / "runs" / "tune-space"
    worker = _start(space, tmp_path / "runs", subprocess_env, package_name)
    checkpoint = study_dir / "trials" / "trial-000" / "checkpoints" / "latest"  # (step-000004 is soon pruned)
    deadline = time.monotonic() + 300
    while not checkpoint.is_file() and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.communicate(timeout=60)
    again = _start(space, tmp_path / "runs", subprocess_env, package_name)
    output = again.communicate(timeout=600)[0]
    assert again.returncode == 0, output
    study = optuna.load_study(study_name="tune-space", storage=_storage(study_dir))
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE], output
    retried = next(t for t in study.trials if t.user_attrs.get("resumes") == 0)
    assert retried.user_attrs["run"] == "trial-000" and retried.params == study.trials[0].params
    assert "trial 0: its worker stopped; queued again to resume trial-000" in output
    assert f"resumed from {study_dir / 'trials' / 'trial-000' / 'checkpoints'}" in output


@pytest.mark.slow
def test_finetune_classify_debug_study(tmp_path, subprocess_env, package_name):
    shutil.copytree(CONFIGS, tmp_path / "configs")  # the space names its recipe relative to the working directory
    argv = [sys.executable, "-m", f"{package_name}.tune", "--space", "configs/tune/finetune-classify.yaml"]
    start = time.monotonic()
    done = subprocess.run([*argv, "--debug"], cwd=tmp_path, env=subprocess_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    study_dir = tmp_path / "runs" / "tune-finetune-classify-debug"
    rows = (study_dir / "trials.tsv").read_text().splitlines()
    assert len(rows) == 3 and all(row.split("\t")[1] in ("COMPLETE", "PRUNED") for row in rows[1:])
    best, _ = parse_config(FinetuneConfig, ["--config", str(study_dir / "best.yaml")])
    assert best.task == "classify" and best.train.early_stopping.metric == "accuracy"
    print(f"finetune-classify tune --debug: {time.monotonic() - start:.1f} s")
