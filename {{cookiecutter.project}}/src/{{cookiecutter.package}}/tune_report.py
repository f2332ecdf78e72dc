"""What a study leaves for a person (:mod:`.tune`): a table of its trials (printed and ``trials.tsv``), ``best.yaml``
(the best trial's recipe), plots as PNG through Optuna's matplotlib backend, and TensorBoard's hparams view."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from .tune_space import Space

PLOTS = {  # file name -> optuna.visualization.matplotlib function
    "history.png": "plot_optimization_history",  # each trial's value and the best so far
    "intermediate.png": "plot_intermediate_values",  # every trial's curve: where the pruned ones stopped
    "importances.png": "plot_param_importances",  # how much each parameter moved the value
    "parallel.png": "plot_parallel_coordinate",  # every trial's parameters as one line, coloured by its value
}


def _atomic_write(path: Path, text: str) -> None:
    """Several workers may finish at once: each file is whole, one of theirs."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def trials_table(study: Any, metric: str) -> list[list[str]]:
    """Header and one row per trial: number, state, value, run, duration, CPU time of its worker, parameters."""
    names = sorted({name for t in study.trials for name in t.params})
    rows = [["trial", "state", metric, "run", "seconds", "cpu_seconds", *names]]
    for t in study.trials:
        seconds = f"{t.duration.total_seconds():.0f}" if t.duration is not None else ""
        cpu = f"{t.user_attrs['cpu_seconds']:.0f}" if "cpu_seconds" in t.user_attrs else ""
        value = f"{t.value:.4g}" if t.value is not None else ""
        params = [_short(t.params[name]) if name in t.params else "" for name in names]
        rows.append([str(t.number), t.state.name, value, str(t.user_attrs.get("run", "")), seconds, cpu, *params])
    return rows


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def best_recipe(study: Any, space: Space, metric: str, path: Path) -> str:
    """``best.yaml`` at ``path``: the recipes, the overrides and the best trial's values, with a header saying where
    they come from and how to train them again."""
    best = study.best_trial
    header = [
        f"# The best trial of study {study.study_name}: trial {best.number} ({best.user_attrs.get('run')}), "
        f"validation {metric} {best.value:.6g}.",
        f"#   python -m {__package__}.{space.program} --config {path}   # trains it again",
        f"# Search space {space.source}; recipes {', '.join(space.configs) or 'none'} + overrides + the values below.",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(space.recipe(best.params), sort_keys=False)


def save_plots(study: Any, plots: Path) -> list[str]:
    """The PNGs of :data:`PLOTS` that this study can draw (importances need two finished trials, ...)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    plots.mkdir(exist_ok=True)
    written = []
    for name, function in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
                axes = getattr(vis, function)(study)
            figure = getattr(axes, "figure", None) or axes.flat[0].figure  # an Axes, or an array of them
            figure.set_size_inches(10, 6)
            figure.savefig(plots / f".{name}.{os.getpid()}.png", dpi=100, bbox_inches="tight")
            plt.close(figure)
            os.replace(plots / f".{name}.{os.getpid()}.png", plots / name)
            written.append(name)
        except Exception as err:  # a plot this study cannot draw yet (too few trials) is skipped, with a line
            print(f"notice: no {name}: {' '.join(str(err).split())[:200]}", file=sys.stderr)
    return written


def write_hparams(study_dir: Path, run: str, params: dict[str, Any], metric: str, value: float) -> None:
    """One finished trial in TensorBoard's hparams view (``<study>/tb``)."""
    from torch.utils.tensorboard import SummaryWriter

    hparams = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in params.items()}
    with SummaryWriter(str(study_dir / "tb" / run)) as writer:
        writer.add_hparams(hparams, {f"hparam/{metric}": value}, run_name=".")


def write_report(study: Any, space: Space, study_dir: Path, metric: str) -> None:
    """The table (printed and ``trials.tsv``), ``best.yaml`` and the plots, from the study as it stands."""
    rows = trials_table(study, metric)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows))
    _atomic_write(study_dir / "trials.tsv", "".join("\t".join(row) + "\n" for row in rows))
    if not any(t.state.name == "COMPLETE" for t in study.trials):  # pruned and failed ones have no best
        print(f"no trial has completed yet: nothing to write beyond {study_dir / 'trials.tsv'}")
        return
    _atomic_write(study_dir / "best.yaml", best_recipe(study, space, metric, study_dir / "best.yaml"))
    written = save_plots(study, study_dir / "plots")
    best = study.best_trial
    print(f"best: trial {best.number}, validation {metric} {best.value:.4g}: {study_dir / 'best.yaml'}")
    print(f"plots: {', '.join(str(study_dir / 'plots' / name) for name in written)}; hparams: {study_dir / 'tb'}")
