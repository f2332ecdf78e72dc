"""Classify new inputs with a trained classifier: ``python -m <package>.predict RUN_DIR INPUTS...``.

``RUN_DIR`` is the run directory of a finished classifier training (``finetune --task classify``, and each extra
project's): the label map, the model and the preprocessing all come from it (classifiers/), read with the training
code's own functions and the run's saved config, so a new input is prepared exactly as the training data was.
``INPUTS`` are files and folders (every file of a folder, recursively, with the classifier's suffixes); a text
classifier reads one text per file, or one text per line of standard input when no input (or ``-``) is given.

One line per input: the predicted label, the probability of every class, and the file::

    python -m <package>.predict runs/finetune-classify samples/text
    tragedy	comedy=0.3179 history=0.0389 tragedy=0.6432	samples/text/tragedy/00000.txt
    python -m <package>.predict runs/finetune-classify --json < passages.txt     # JSON lines: file (here
                                                  # <stdin>:N, the line number), label, probabilities (label -> p)

Inputs go through the model ``--batch_size`` at a time, on the GPU when there is one (``--device``). ``--debug``
reads the run ``--debug`` wrote (``RUN_DIR-debug``); ``--debugpy`` / ``--pycharm-debug`` attach an IDE as for every
entry point, and the model's ``forward`` is plain eager code where a breakpoint stops.

Exit codes: 0 done, 2 bad input (a run directory that is not a finished classifier's, an unreadable file, an audio
file below the model's sample rate, ...): one line on stderr naming it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

from .classifiers import Classifier, load_classifier
from .cli import run_guarded
from .config import ConfigError, DebugConfig, ToolParser, debug_run_dir
from .train.distributed import resolve_device

STDIN = "-"


def build_parser() -> ToolParser:
    parser = ToolParser(prog=f"python -m {__package__}.predict", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the run directory of a finished classifier training")
    parser.add_argument("inputs", nargs="*", help="files and folders; none or - = one text per line of stdin")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    parser.add_argument("--batch_size", type=int, default=64, help="inputs per forward pass")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, mps")
    return parser


def input_files(inputs: list[str], suffixes: tuple[str, ...]) -> Iterator[Path]:
    """Each named file, and every file with one of ``suffixes`` under each named folder (sorted)."""
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise ConfigError(f"{path}: no {' / '.join(suffixes)} files in this folder")
            yield from found
        elif path.is_file():
            yield path
        else:
            raise ConfigError(f"{path}: no such file or folder")


def examples(classifier: Classifier, inputs: list[str], stdin: TextIO) -> Iterator[tuple[str, Any]]:
    """(where it came from, the example) for every input, read as it is needed."""
    if inputs and inputs != [STDIN]:
        for path in input_files(inputs, classifier.suffixes):
            yield str(path), classifier.read_file(path)
        return
    if classifier.read_line is None:
        raise ConfigError("this classifier reads files: name the files or folders to classify")
    for number, line in enumerate(stdin, start=1):
        if line.strip():
            yield f"<stdin>:{number}", classifier.read_line(line.rstrip("\r\n"))


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def format_line(source: str, labels: list[str], probs: list[float], as_json: bool) -> str:
    label = labels[max(range(len(probs)), key=probs.__getitem__)]
    if as_json:
        return json.dumps({"file": source, "label": label, "probabilities": dict(zip(labels, probs, strict=True))})
    scores = " ".join(f"{name}={p:.4f}" for name, p in zip(labels, probs, strict=True))
    return f"{label}\t{scores}\t{source}"


def predict(args: Any, dbg: DebugConfig, out: TextIO | None = None, stdin: TextIO | None = None) -> int:
    """Print one line per input (to ``out``, default stdout; texts from ``stdin``, default standard input); returns
    how many. Raises ConfigError for bad input."""
    from .debug import start_debugger

    start_debugger(dbg)
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size {args.batch_size}: expected >= 1")
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    classifier = load_classifier(debug_run_dir(args.run_dir, dbg.debug), device)
    count = 0
    out = out or sys.stdout
    for batch in batched(examples(classifier, args.inputs, stdin or sys.stdin), args.batch_size):
        sources, items = zip(*batch, strict=True)
        for source, probs in zip(sources, classifier.probabilities(list(items)).tolist(), strict=True):
            print(format_line(source, classifier.labels, probs, args.json), file=out, flush=True)
        count += len(batch)
    return count


def main(argv: list[str] | None = None) -> None:
    args, dbg = build_parser().parse_tool_args(argv)
    run_guarded(predict, args, dbg)


if __name__ == "__main__":
    main()
