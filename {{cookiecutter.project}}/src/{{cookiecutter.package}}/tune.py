"""Hyper-parameter studies on the validation set, with Optuna: ``python -m <package>.tune --space FILE``.

    python -m <package>.tune --space configs/tune/pretrain.yaml            # the study the file describes
    python -m <package>.tune --space configs/tune/pretrain.yaml --debug    # 2 tiny trials in seconds
    python -m <package>.tune --space configs/tune/pretrain.yaml --storage postgresql://user@host/db   # many machines

The space file (:mod:`.tune_space`) names the program, its recipe and the distributions of config paths. Each trial
is a normal run of the program in this process (a breakpoint in ``train_step`` stops inside it), with its own run
directory ``<out_dir>/<study>/trials/trial-NNN/`` (config.yaml, checkpoints, TensorBoard). Its objective is the
validation metric the recipe names (``train.early_stopping.metric``, in its direction): with early stopping on, the
best checkpoint's, else the last evaluation's. Every evaluation is reported to Optuna, whose pruner (median or
successive halving) stops a poor trial early; such a trial is marked PRUNED, never FAIL.

The study lives in ``<out_dir>/<study>/``: ``journal.log`` (Optuna's JournalStorage, safe for several worker processes
on one machine: start the same command N times), or any Optuna RDB URL with ``--storage`` (workers on several
machines share it). Workers take trials under a lock until the study has ``trials`` of them, so none is lost or run
twice. A killed worker's trial is taken up again, from its run's last checkpoint, by the next worker started on that
machine: a killed study resumes by running the same command. At the end: a table of the trials, ``best.yaml`` (the
best trial's recipe: ``--config`` takes it as is), plots as PNG in ``plots/`` and TensorBoard's hparams view in ``tb/``.

Needs the optional extra: ``pip install -e ".[tune]"`` (optuna, matplotlib). Exit codes: 0 done, 2 bad input (space
file, storage, missing extra), 130 interrupted (run the same command to resume).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from .cli import run_cli
from .config import ConfigError, DebugConfig
from .train.step import NonFiniteError
from .train.stopping import direction, listening
from .tune_space import Space, load_space

WORKER = f"{socket.gethostname()}:{os.getpid()}"
DEBUG_TRIALS = 2


@dataclass
class TuneConfig:
    """``python -m <package>.tune``: an Optuna study over one training program's runs."""

    debug_section: ClassVar[str | None] = None  # --debug is the trials' own profile (and 2 trials), not a section

    space: str = ""  # the search space YAML (see tune_space.py); configs/tune/ has one per program
    name: str | None = None  # study name and directory under out_dir; None = tune-<space file name>
    out_dir: str = "runs"
    trials: int | None = None  # trials of the whole study; None = the space file's (2 under --debug)
    pruner: Literal["median", "successive_halving", "none"] | None = None  # None = the space file's
    # None = <out_dir>/<name>/journal.log; or an Optuna RDB URL (sqlite:///study.db, postgresql://user@host/db, ...)
    storage: str | None = None


def require_optuna() -> Any:
    """optuna, or one line naming the extra that brings it (and matplotlib, for the plots)."""
    try:
        import matplotlib  # noqa: F401
        import optuna
    except ImportError:
        raise ConfigError('tune needs the optional extra: pip install -e ".[tune]" (optuna, matplotlib)') from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our lines say what happens; optuna's repeat them
    return optuna


def open_storage(optuna: Any, url: str | None, study_dir: Path) -> Any:
    """The study's storage: a journal file (default), or an RDB URL; one line when it cannot be opened."""
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    try:
        if url is None or "://" not in url:
            path = str(study_dir / "journal.log") if url is None else url
            return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
        return _rdb_storage(optuna, url)
    except Exception as err:  # sqlalchemy, a driver or the file system: each has its own errors
        raise ConfigError(f"--storage {url or study_dir / 'journal.log'} cannot be opened: {_line(err)}") from None


def _rdb_storage(optuna: Any, url: str, attempts: int = 5) -> Any:
    """``RDBStorage(url)``. Workers started together on a new database race to create its tables: PostgreSQL fails
    the losers' CREATE with a duplicate key or table (IntegrityError / ProgrammingError) once the winner commits.
    A loser's next attempt finds the tables made; any other error is the caller's at once."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(1, attempts + 1):
        try:
            return optuna.storages.RDBStorage(url)
        except (IntegrityError, ProgrammingError):
            if attempt == attempts:
                raise
            time.sleep(0.2 * attempt)


def _line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def make_pruner(optuna: Any, name: str) -> Any:
    if name == "median":  # stop a trial whose value is worse than the median of the others' at the same step
        return optuna.pruners.MedianPruner(n_startup_trials=2)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


# --------------------------------------------------------------------------------------------------------------------
# Taking trials: under a lock, up to the study's count; a dead worker's trial is queued again
# --------------------------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def retry(optuna: Any, study: Any, trial: Any) -> None:
    """Mark a trial whose worker died (or was interrupted) FAIL and queue its parameters again, to resume its run."""
    study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    attrs = {"run": trial.user_attrs.get("run", run_name(trial.number)), "resumes": trial.number}
    study.enqueue_trial(dict(trial.params), user_attrs=attrs)
    print(f"trial {trial.number}: its worker stopped; queued again to resume {attrs['run']}", file=sys.stderr)


def reap(optuna: Any, study: Any) -> None:
    """Queue again the running trials of this machine's workers that are gone (killed, crashed)."""
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if owner_host == host and pid.isdigit() and not _alive(int(pid)):
            retry(optuna, study, trial)


def next_trial(optuna: Any, study: Any, total: int, lock: Any) -> Any | None:
    """The next trial for this worker, or None when the study has ``total`` trials (finished, running or queued;
    failed ones count too, except those queued again)."""
    states = optuna.trial.TrialState
    lock.acquire()
    try:
        reap(optuna, study)
        trials = study.get_trials(deepcopy=False)
        resumed = {t.user_attrs.get("resumes") for t in trials}
        waiting = sum(t.state == states.WAITING for t in trials)
        taken = sum(t.state != states.FAIL or t.number not in resumed for t in trials)
        if not waiting and taken >= total:
            return None
        trial = study.ask()
        trial.set_user_attr("worker", WORKER)
        return trial
    finally:
        lock.release()


# --------------------------------------------------------------------------------------------------------------------
# One trial: a normal run of the program, its evaluations reported
# --------------------------------------------------------------------------------------------------------------------


def run_name(number: int) -> str:
    return f"trial-{number:03d}"


@dataclass
class Objective:
    """Follows a trial's evaluations: reports each to Optuna (which may prune) and keeps the objective value."""

    optuna: Any
    trial: Any
    metric: str
    value: float | None = None

    def __call__(self, step: int, evals: dict[str, float], watch: Any) -> None:
        last = evals.get(f"eval_{self.metric}")
        if last is None:
            return
        self.value = watch.state.best if watch.enabled else last  # the weights the run ends with
        self.trial.report(last, step)
        if self.trial.should_prune():
            raise self.optuna.TrialPruned(f"validation {self.metric} {last:.4g} at step {step}")


def run_trial(
    optuna: Any, space: Space, trial: Any, study_dir: Path, dbg: DebugConfig, metric: str
) -> tuple[Any, float | None]:
    """Run ``trial``; (its final state, its value of validation ``metric`` or None). Failures of the run are the
    trial's, not the study's."""
    states = optuna.trial.TrialState
    name = trial.user_attrs.get("run") or run_name(trial.number)
    trial.set_user_attr("run", name)
    values = {p.path: p.suggest(trial) for p in space.params}
    print(f"trial {trial.number} ({name}): " + "  ".join(f"{k} {v}" for k, v in values.items()), flush=True)
    resumes = "resumes" in trial.user_attrs
    objective = Objective(optuna, trial, metric)
    try:
        cfg = space.config(values, dbg.debug)  # a value the program refuses fails this trial, in one line
        train = dataclasses.replace(cfg.train, resume="auto" if resumes else "never", overwrite=not resumes)
        cfg = dataclasses.replace(cfg, name=name, out_dir=str(study_dir / "trials"), train=train)
        with listening(objective):
            space.module.run(cfg, dbg)
    except optuna.TrialPruned as why:
        print(f"trial {trial.number}: pruned ({why})", flush=True)
        return states.PRUNED, None
    except (ConfigError, NonFiniteError, SystemExit) as err:  # SystemExit: parse_config printed why
        why = "the program refused its config (the error above)" if isinstance(err, SystemExit) else _line(err)
        print(f"trial {trial.number}: failed: {why}", file=sys.stderr, flush=True)
        return states.FAIL, None
    if objective.value is None:
        print(f"trial {trial.number}: failed: no validation {objective.metric} was reported", file=sys.stderr)
        return states.FAIL, None
    return states.COMPLETE, objective.value


# --------------------------------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------------------------------


def check(space: Space, dbg: DebugConfig) -> tuple[str, str]:
    """(metric, direction) of the study, after parsing one trial's config: every bad input fails here, in one
    line, before a trial runs."""
    cfg = space.config({p.path: p.sample() for p in space.params}, dbg.debug)
    stopping = cfg.train.early_stopping
    reported = space.module.reported_metrics(cfg)
    if stopping.metric not in reported:
        raise ConfigError(
            f"train.early_stopping.metric={stopping.metric!r} is not reported by {space.program}: it reports "
            + ", ".join(reported)
        )
    return stopping.metric, direction(stopping.metric, stopping.mode)


def study_dir_of(cfg: TuneConfig, space: Space, debug: bool) -> Path:
    """``<out_dir>/<name>``; under --debug a finished debug study is replaced, so that the next one trains."""
    name = (cfg.name or f"tune-{space.source.stem}") + ("-debug" if debug else "")
    path = Path(cfg.out_dir) / name
    if debug and cfg.storage is None and (path / "trials.tsv").is_file():  # its end was reported
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(cfg: TuneConfig, dbg: DebugConfig | None = None) -> Any:
    """Run this worker's share of the study; returns the Optuna study. Raises ConfigError for bad input."""
    from .debug import start_debugger
    from .tune_report import write_hparams, write_report

    dbg = dbg or DebugConfig()
    optuna = require_optuna()
    if not cfg.space:
        raise ConfigError("--space FILE is required (configs/tune/ has one per program)")
    space = load_space(cfg.space, cfg.trials or (DEBUG_TRIALS if dbg.debug else None), cfg.pruner)
    metric, goal = check(space, dbg)
    study_dir = study_dir_of(cfg, space, dbg.debug)
    storage = open_storage(optuna, cfg.storage, study_dir)
    study = optuna.create_study(
        study_name=study_dir.name,
        storage=storage,
        direction="minimize" if goal == "min" else "maximize",
        sampler=optuna.samplers.TPESampler(n_startup_trials=max(2, min(10, space.trials // 3))),
        pruner=make_pruner(optuna, space.pruner),
        load_if_exists=True,
    )
    start_debugger(dbg, 0)  # once, here: the trials run in this process
    trial_dbg = dataclasses.replace(dbg, debugpy=None, pycharm_debug=None, wait_for_client=False)
    lock = optuna.storages.journal.JournalFileOpenLock(str(study_dir / "tune"))
    print(f"study {study.study_name}: {space.trials} trials of {space.program}, {goal}imize validation {metric}")
    while (trial := next_trial(optuna, study, space.trials, lock)) is not None:
        cpu = time.process_time()  # what a trial costs even on a shared machine, where its wall time is the load's
        try:
            state, value = run_trial(optuna, space, trial, study_dir, trial_dbg, metric)
        except KeyboardInterrupt:
            retry(optuna, study, study.trials[trial.number])
            raise
        trial.set_user_attr("cpu_seconds", round(time.process_time() - cpu, 1))
        study.tell(trial, value, state=state)
        if value is not None:
            print(f"trial {trial.number}: validation {metric} {value:.4g}", flush=True)
            write_hparams(study_dir, trial.user_attrs["run"], trial.params, metric, value)
    write_report(study, space, study_dir, metric)
    return study


def main(argv: list[str] | None = None) -> None:
    hint = "interrupted: run the same command to resume the study (the trial resumes from its last checkpoint)"
    run_cli(TuneConfig, run, argv, prog=f"python -m {__package__}.tune", interrupted=hint)


if __name__ == "__main__":
    main()
