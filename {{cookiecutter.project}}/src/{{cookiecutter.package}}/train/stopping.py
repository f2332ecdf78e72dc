"""Early stopping and the overfitting signal, decided at every evaluation (``train.early_stopping``).

:class:`Watch` follows one validation metric. At each evaluation it compares the value with the best so far (an
improvement must beat it by ``min_delta``), counts the evaluations since, and measures the gap between the validation
loss and the mean training loss since the previous evaluation (logged as ``eval/train_gap``). Two signals follow:

- the **overfitting warning** (one line), when the metric has not improved for ``warn_after`` evaluations while the
  training loss fell below its level at the best evaluation: the model is learning the training set, not the task;
- with ``enabled``, **early stopping**, after ``patience`` evaluations without an improvement. Each new best is
  checkpointed and named by ``checkpoints/best`` (which retention never prunes); at the end :func:`restore_best`
  loads the best checkpoint's weights, so the final evaluation and the exports are the best model's.

Every rank takes rank 0's decision (:meth:`Watch.evaluated`), so all ranks stop at the same step even if their
numbers differ in the last bit. The state is plain data saved in every checkpoint: a resumed run keeps its best
value, its patience count and its training-loss window exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from ..config import ConfigError, EarlyStoppingConfig
from . import checkpoint as ckpt
from .distributed import all_gather_object, get_rank, notice
from .manifest import find_damage

MINIMIZED = ("loss", "perplexity")  # metrics that improve downwards; every other one (accuracy, F1, ...) upwards


def direction(metric: str, mode: str | None) -> str:
    """``mode`` if given, else "min" for a loss or perplexity and "max" for anything else."""
    return mode or ("min" if metric in MINIMIZED else "max")


def check_metric(cfg: EarlyStoppingConfig, reported: tuple[str, ...], eval_every: int) -> None:
    """Raise :class:`ConfigError` (one line) when early stopping cannot work: a metric the program does not report,
    or no periodic evaluation. ``reported`` empty = not known in advance (checked at the first evaluation)."""
    if reported and cfg.metric not in reported:
        raise ConfigError(
            f"train.early_stopping.metric={cfg.metric!r} is not reported by this program: it reports "
            + ", ".join(reported)
        )
    if cfg.enabled and eval_every <= 0:
        raise ConfigError("train.early_stopping.enabled needs a validation set and train.eval_every > 0")


@dataclass
class Verdict:
    """What one evaluation decided (the same on every rank)."""

    improved: bool = False  # a new best value
    stop: str | None = None  # why the run stops here (one line), when it does
    warning: str | None = None  # the overfitting warning, when due
    gap: float | None = None  # validation loss - mean training loss since the previous evaluation


@dataclass
class _State:
    metric: str
    mode: str
    best: float | None = None
    best_step: int | None = None
    bad: int = 0  # evaluations since the best
    train_sum: float = 0.0  # training losses since the previous evaluation
    train_count: int = 0
    train_at_best: float | None = None  # mean training loss of the window that ended at the best evaluation
    gap_at_best: float | None = None
    stopped_at: int | None = None


class Watch:
    """The validation metric's best value, the evaluations since, and the training-loss window (see the module)."""

    def __init__(self, cfg: EarlyStoppingConfig) -> None:
        self.cfg = cfg
        self.state = _State(cfg.metric, direction(cfg.metric, cfg.mode))

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    @property
    def best_step(self) -> int | None:
        return self.state.best_step

    @property
    def stopped(self) -> bool:
        """Out of patience: a resumed run stopped early stays stopped unless it is given more patience."""
        return self.cfg.enabled and self.state.bad >= self.cfg.patience

    def add_training(self, records: list[dict]) -> None:
        """Training losses of the steps just read (non-finite ones never reach an evaluation)."""
        s = self.state
        s.train_sum += sum(r["loss"] for r in records)
        s.train_count += len(records)

    def _improves(self, value: float) -> bool:
        s, delta = self.state, self.cfg.min_delta
        if s.best is None:
            return math.isfinite(value)
        return value < s.best - delta if s.mode == "min" else value > s.best + delta

    def update(self, step: int, evals: dict[str, float]) -> Verdict:
        """This rank's verdict on the evaluation ``evals`` (``eval_*`` keys) after ``step``."""
        s, key = self.state, f"eval_{self.cfg.metric}"
        train = s.train_sum / s.train_count if s.train_count else None
        s.train_sum, s.train_count = 0.0, 0
        gap = evals["eval_loss"] - train if "eval_loss" in evals and train is not None else None
        if key not in evals and self.cfg.enabled:
            reported = ", ".join(k[5:] for k in evals)
            raise ConfigError(f"train.early_stopping.metric={self.cfg.metric!r} is not evaluated (got {reported})")
        if key not in evals:  # a job of its own that reports other numbers: nothing to watch
            return Verdict(gap=gap)
        value = evals[key]
        if self._improves(value):
            s.best, s.best_step, s.bad, s.train_at_best, s.gap_at_best = value, step, 0, train, gap
            return Verdict(improved=True, gap=gap)
        s.bad += 1
        verdict = Verdict(gap=gap)
        falling = train is not None and s.train_at_best is not None and train < s.train_at_best
        if self.cfg.warn_after and s.bad == self.cfg.warn_after and falling:
            verdict.warning = self._overfitting(train, gap)
        if self.cfg.enabled and s.bad >= self.cfg.patience:
            s.stopped_at = step
            verdict.stop = (
                f"early stopping at step {step}: validation {self.cfg.metric} has not improved for {s.bad} "
                f"evaluations (patience {self.cfg.patience}); best {s.best:.4g} at step {s.best_step}"
            )
        return verdict

    def _overfitting(self, train: float, gap: float | None) -> str:
        s = self.state
        was = f" (was {s.gap_at_best:.4f} at the best)" if s.gap_at_best is not None else ""
        gap_text = f"; validation - training loss gap {gap:.4f}{was}" if gap is not None else ""
        return (
            f"warning: overfitting? validation {s.metric} has not improved for {s.bad} evaluations (best {s.best:.4g} "
            f"at step {s.best_step}) while the training loss fell {s.train_at_best:.4f} -> {train:.4f}{gap_text}"
        )

    def evaluated(self, step: int, evals: dict[str, float]) -> Verdict:
        """:meth:`update`, then every rank takes rank 0's verdict and state: the same decision everywhere."""
        verdict = self.update(step, evals)
        verdict, state = all_gather_object((verdict, self.state_dict()))[0]
        self.load_state_dict(state)
        return verdict

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict | None) -> None:
        """Restore a checkpoint's state; one saved for another metric or direction starts afresh (its best value
        means nothing for this one)."""
        if not state:
            return
        fresh = _State(self.cfg.metric, direction(self.cfg.metric, self.cfg.mode))
        if (state.get("metric"), state.get("mode")) != (fresh.metric, fresh.mode):
            notice(f"notice: the checkpoint watched {state.get('metric')} ({state.get('mode')}): starting afresh")
            state = asdict(fresh)
        self.state = _State(**state)


# --------------------------------------------------------------------------------------------------------------------
# The best checkpoint
# --------------------------------------------------------------------------------------------------------------------


def best_checkpoint(root: Path, step: int) -> Path | None:
    """Checkpoint ``step`` (the run's best, as its saved state says) if it is intact; ``root/best`` is repaired when
    it names anything else (a kill between publishing and pointing, a damaged or edited file). None, with a notice,
    when the checkpoint is missing or damaged. Main process."""
    path = root / ckpt.step_dir_name(step)
    if not ckpt.is_complete(path):
        notice(f"notice: the best checkpoint {path} is missing")
        return None
    if (damage := find_damage(path)) is not None:
        notice(f"notice: the best checkpoint {path} is damaged: {damage}")
        return None
    if ckpt.read_pointer(root, ckpt.BEST_FILE) != path:
        notice(f"notice: {root / ckpt.BEST_FILE} did not name {path.name}: repaired")
        ckpt.write_pointer(root, ckpt.BEST_FILE, path.name)
    return path


def restore_best(root: Path, model: nn.Module, watch: Watch, last_step: int) -> int | None:
    """With early stopping on, load the best checkpoint's weights into the unwrapped ``model`` on every rank and
    return its step (the weights are already the best when it is ``last_step``); None when there is none to load
    (the last weights stay, with a notice)."""
    step = watch.best_step
    if not watch.enabled or step is None:
        return None
    if step == last_step:
        best = f"validation {watch.cfg.metric} {watch.state.best:.4g}"
        notice(f"early stopping: the last step, {step}, is the best ({best})")
        return step
    path = all_gather_object(best_checkpoint(root, step) if get_rank() == 0 else None)[0]
    if path is None:
        notice(f"notice: keeping the weights of step {last_step}: the best checkpoint cannot be read")
        return None
    ckpt.load_weights(path, model)
    notice(
        f"early stopping: restored the best checkpoint {path} (validation {watch.cfg.metric} {watch.state.best:.4g}): "
        f"the final evaluation and exports use it, not step {last_step}"
    )
    return step


# --------------------------------------------------------------------------------------------------------------------
# Listening to evaluations (tune.py reports them to its study)
# --------------------------------------------------------------------------------------------------------------------

Listener = Callable[[int, dict[str, float], Watch], None]
_LISTENERS: list[Listener] = []


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call ``listener(step, evals, watch)`` after every evaluation of the runs inside the block (on every rank). An
    exception it raises ends the run like any other (tune.py's pruner raises ``optuna.TrialPruned``)."""
    _LISTENERS.append(listener)
    try:
        yield
    finally:
        _LISTENERS.remove(listener)


def tell_listeners(step: int, evals: dict[str, float], watch: Watch) -> None:
    for listener in list(_LISTENERS):
        listener(step, evals, watch)
