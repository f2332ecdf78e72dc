"""Benchmark a language model with EleutherAI's lm-evaluation-harness: ``python -m <package>.evaluate RUN_DIR``.

``RUN_DIR`` is a pre-training run (its ``hf/`` export), an SFT fine-tune (its merged ``hf/``, or its ``adapter/`` on
the base model the adapter names) or any transformers causal-LM directory; the harness's own HF model class (``HFLM``)
loads it, so the scores are the harness's, computed the way it computes them for every other model.

    python -m <package>.evaluate runs/pretrain                               # the offline tasks (data/benchmark.py)
    python -m <package>.evaluate runs/finetune-sft --perplexity_file held_out.txt
    python -m <package>.evaluate runs/finetune-sft --tasks hellaswag,arc_easy --limit 200   # harness tasks: online

``--tasks`` (comma-separated): ``shakespeare_play``, ``shakespeare_genre`` and ``shakespeare_ppl`` are built from the
shipped data and run offline; any other name is a task of the harness's registry (its data set downloads from the
Hugging Face hub). ``--perplexity_file FILE`` adds ``file_ppl``: word / byte perplexity and bits per byte on the
paragraphs of FILE, the plain baseline. ``--chat auto`` renders prompts with the tokenizer's chat template for an SFT
run (as ``generate`` does for an adapter); ``always`` / ``never`` decide instead.

Results: ``RUN_DIR/benchmark.json`` (each task's metrics, merged with earlier evaluations of other tasks, plus what was
evaluated how) and TensorBoard scalars ``benchmark/<task>/<metric>`` in ``RUN_DIR/tb`` at the run's last step.
lm-evaluation-harness is an optional extra: ``pip install -e ".[eval]"``.

Exit codes: 0 done, 2 bad input (lm_eval missing, a run directory that holds no causal LM, an unknown task, an
unreadable file): one line on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .cli import run_guarded
from .config import ConfigError, DebugConfig, ToolParser, debug_run_dir
from .data.benchmark import OFFLINE_TASKS, file_perplexity_task
from .lora import ADAPTER_DIR, MERGED_DIR, adapter_config
from .train.distributed import resolve_device
from .train.logger import METRICS_FILE

RESULTS_FILE = "benchmark.json"
MISSING = 'evaluate needs EleutherAI\'s lm-evaluation-harness (lm_eval): pip install -e ".[eval]"'


def build_parser() -> ToolParser:
    parser = ToolParser(prog=f"python -m {__package__}.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a pretrain or SFT run directory, or a transformers causal-LM directory")
    parser.add_argument("--tasks", default=",".join(OFFLINE_TASKS), help="comma-separated task names")
    parser.add_argument("--perplexity_file", help="also measure perplexity on the paragraphs of this text file")
    parser.add_argument("--limit", type=int, help="evaluate only the first N documents of each task")
    parser.add_argument("--num_fewshot", type=int, help="examples in each prompt (harness tasks' default: theirs)")
    parser.add_argument("--chat", choices=["auto", "always", "never"], default="auto", help="chat template prompts")
    parser.add_argument("--batch_size", type=int, default=16, help="requests per forward pass")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, mps")
    return parser


def run_task(run_dir: Path) -> str | None:
    path = run_dir / METRICS_FILE
    return json.loads(path.read_text(encoding="utf-8")).get("task") if path.is_file() else None


def is_causal_lm(model_dir: Path) -> bool:
    path = model_dir / "config.json"
    architectures = json.loads(path.read_text(encoding="utf-8")).get("architectures") if path.is_file() else None
    return any(name.endswith("ForCausalLM") for name in architectures or [])


def model_args(run_dir: Path) -> dict[str, str]:
    """HFLM's ``pretrained`` (and ``peft``, ``tokenizer``) for a run directory or a model directory."""
    for model_dir in (run_dir / MERGED_DIR, run_dir):
        if is_causal_lm(model_dir):
            return {"pretrained": str(model_dir)}
    adapter = run_dir / ADAPTER_DIR
    if (adapter / "adapter_config.json").is_file() and adapter_config(adapter).get("task_type") == "CAUSAL_LM":
        base = adapter_config(adapter)["base_model_name_or_path"]
        return {"pretrained": base, "peft": str(adapter), "tokenizer": str(adapter)}
    what = f"a {task} run" if (task := run_task(run_dir)) else "not a run directory"
    raise ConfigError(f"{run_dir}: no causal language model here ({what}): evaluate takes a pretrain or SFT run")


def task_list(names: str, perplexity_file: str | None) -> list[str | dict[str, Any]]:
    """The offline tasks as configs, other names as they are (the harness's registry resolves them)."""
    tasks: list[str | dict[str, Any]] = [OFFLINE_TASKS[n]() if n in OFFLINE_TASKS else n for n in names.split(",") if n]
    if perplexity_file is not None:
        if not Path(perplexity_file).is_file():
            raise ConfigError(f"--perplexity_file {perplexity_file}: no such file")
        tasks.append(file_perplexity_task(perplexity_file))
    if not tasks:
        raise ConfigError("no tasks: name some with --tasks or give --perplexity_file")
    return tasks


def use_chat(setting: str, run_dir: Path) -> bool:
    return setting == "always" or (setting == "auto" and run_task(run_dir) == "sft")


def harness_evaluate(args: Any, model: dict[str, str], chat: bool) -> dict[str, Any]:
    """lm_eval's ``simple_evaluate`` on ``HFLM``. The registry of the harness's own tasks is indexed only when one of
    them is named (it reads hundreds of files), and the names are checked before the model loads."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = task_list(args.tasks, args.perplexity_file)
    named = [t for t in tasks if isinstance(t, str)]
    manager = TaskManager(include_defaults=bool(named))
    unknown = [name for name in named if name not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--tasks: {', '.join(unknown)}: neither an offline task ({', '.join(OFFLINE_TASKS)}) "
                          "nor in lm_eval's registry")  # fmt: skip
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    lm = HFLM(**model, device=str(device), batch_size=args.batch_size)
    return simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=args.limit, num_fewshot=args.num_fewshot,
        apply_chat_template=chat, log_samples=False, verbosity="WARNING",
    )  # fmt: skip


def scores(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """task -> metric -> value: the numbers among lm_eval's ``"<metric>,<filter>"`` keys, named ``metric`` (the
    unfiltered ``none``) or ``metric_filter``."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        out[task] = {}
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")
            if comma and isinstance(value, int | float):
                out[task][metric if filter_name == "none" else f"{metric}_{filter_name}"] = value
    return out


def last_step(run_dir: Path) -> int:
    """The last training step the run logged (0 for a model directory)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return int(json.loads(lines[-1]).get("step", 0)) if lines else 0


def write_results(run_dir: Path, record: dict[str, Any]) -> Path:
    """benchmark.json, keeping the tasks earlier evaluations scored, and TensorBoard scalars."""
    from torch.utils.tensorboard import SummaryWriter

    path = run_dir / RESULTS_FILE
    merged = json.loads(path.read_text(encoding="utf-8"))["results"] if path.is_file() else {}
    merged.update(record["results"])
    path.write_text(json.dumps({**record, "results": merged}, indent=2) + "\n", encoding="utf-8")
    with SummaryWriter(str(run_dir / "tb")) as writer:
        for task, metrics in record["results"].items():
            for metric, value in metrics.items():
                if not metric.endswith("_stderr"):
                    writer.add_scalar(f"benchmark/{task}/{metric}", value, record["step"])
    return path


def evaluate(args: Any, dbg: DebugConfig) -> dict[str, Any]:
    """Run the tasks, write and print the results; returns what benchmark.json gained. Raises ConfigError."""
    from .debug import start_debugger

    start_debugger(dbg)
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(MISSING) from None
    run_dir = debug_run_dir(args.run_dir, dbg.debug)
    model, chat = model_args(run_dir), use_chat(args.chat, run_dir)
    output = harness_evaluate(args, model, chat)
    record = {
        "model": model, "chat_template": chat, "limit": args.limit, "num_fewshot": args.num_fewshot,
        "lm_eval": lm_eval.__version__, "step": last_step(run_dir), "results": scores(output["results"]),
    }  # fmt: skip
    path = write_results(run_dir, record)
    for task, metrics in record["results"].items():
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("_stderr"))
        print(f"{task}: {shown}", flush=True)
    print(f"results written to {path} and {run_dir / 'tb'}", flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    args, dbg = build_parser().parse_tool_args(argv)
    run_guarded(evaluate, args, dbg)


if __name__ == "__main__":
    sys.exit(main())
