"""``bench prepare``: corpus preparation tokens/s against the `tokenizers` library's own encode_batch, and peak memory.

    python -m <pkg>.bench prepare                       # 500 MB of generated text, 2 alternating rounds
    python -m <pkg>.bench prepare --mb 100 --rss-mb 10  # smaller, plus one extra run at 10 MB for peak memory

The corpus: JSONL documents of 1-8 KB (web-page sized, like FineWeb-Edu's), each a run of paragraphs drawn at random
(seeded) from the built-in plays, written to a temporary folder. The tokenizer: a byte-level BPE (``--vocab-size``)
trained on the built-in corpus. Then, alternating A B A B (``--repeats`` rounds), each in a fresh process:
- ours: ``prepare_tokens`` end to end: read and parse the JSONL, encode, stage shards, assemble train/val, publish;
- tokenizers: the same documents, already parsed into memory before the clock starts, through the library's
  ``encode_batch_fast`` in batches of the same size, on the same cores: what the encoding alone costs.
Rows: tokens/s (median, min, max over rounds), tokens per CPU-second (user + system time of all the process's threads:
the cost of the work on shared cores, whatever else runs there) and peak resident memory (ru_maxrss of the process)
of each, then the ratios ours / tokenizers. ``--rss-mb`` sizes get one extra run of ours each, for memory at several
corpus sizes (flat is the goal: nothing grows with the corpus).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .data.builtin import read_corpus_text, split_plays
from .data.sources import resolve_source
from .data.token_cache import BATCH_CHARS, BATCH_PIECES, prepare_tokens
from .data.tokenizer import load_tokenizer, train_tokenizer


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """JSONL of 1-8 KB documents of random paragraph runs from the plays, until `megabytes` MB; returns documents."""
    paragraphs = [p for play in split_plays(read_corpus_text()) for p in play.text.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    target, written, documents = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            size, parts = rng.randint(1000, 8000), []
            start = rng.randrange(len(paragraphs))
            while sum(map(len, parts)) < size:
                parts.append(paragraphs[(start + len(parts)) % len(paragraphs)])
            line = json.dumps({"text": "\n\n".join(parts)}) + "\n"
            f.write(line)
            written, documents = written + len(line.encode()), documents + 1
    return documents


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: on shared cores, what the work cost whatever the load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_ours(corpus: Path, tokenizer: Path, work: Path) -> dict:
    cache, tok = work / "cache", load_tokenizer(tokenizer)
    start, cpu = time.perf_counter(), cpu_seconds()
    result = prepare_tokens(resolve_source(corpus), tok, cache, progress=False)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    tokens = result.meta["train_tokens"] + result.meta["val_tokens"]
    shutil.rmtree(cache)
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu, "documents": result.meta["documents"]}


def run_tokenizers(corpus: Path, tokenizer: Path) -> dict:
    backend = load_tokenizer(tokenizer).backend_tokenizer
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    start, cpu, tokens, i = time.perf_counter(), cpu_seconds(), 0, 0
    while i < len(texts):  # the same batching rule as ours: up to BATCH_CHARS characters or BATCH_PIECES texts
        j, chars = i, 0
        while j < len(texts) and chars < BATCH_CHARS and j - i < BATCH_PIECES:
            chars, j = chars + len(texts[j]), j + 1
        tokens += sum(len(e) for e in backend.encode_batch_fast(texts[i:j], add_special_tokens=False))
        i = j
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu, "documents": len(texts)}


def worker(argv: list[str]) -> None:
    """One timed run in this fresh process; prints its figures as one JSON line."""
    which, corpus, tokenizer, work = argv
    if which == "ours":
        row = run_ours(Path(corpus), Path(tokenizer), Path(work))
    else:
        row = run_tokenizers(Path(corpus), Path(tokenizer))
    print(json.dumps({**row, "peak_rss_mib": round(peak_rss_mib(), 1)}), flush=True)


def spawn(which: str, corpus: Path, tokenizer: Path, work: Path) -> dict:
    cmd = [sys.executable, "-m", __name__, which, str(corpus), str(tokenizer), str(work)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def summarize(name: str, runs: list[dict], common: dict) -> dict:
    rates = [r["tokens"] / r["seconds"] for r in runs]
    cpu_rates = [r["tokens"] / r["cpu_seconds"] for r in runs]
    return {
        **common,
        "model": name,
        "tokens_per_s": round(statistics.median(rates)),
        "tokens_per_s_min": round(min(rates)),
        "tokens_per_s_max": round(max(rates)),
        "tokens_per_cpu_s": round(statistics.median(cpu_rates)),
        "tokens": runs[0]["tokens"],
        "documents": runs[0]["documents"],
        "seconds_median": round(statistics.median(r["seconds"] for r in runs), 2),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
    }


def bench_prepare(args: argparse.Namespace) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir=args.dir))
    try:
        tokenizer = work / "tokenizer"
        train_tokenizer([read_corpus_text()], args.vocab_size, tokenizer)
        corpus = work / "corpus.jsonl"
        write_corpus(corpus, args.mb, args.seed)
        common = {"bench": "prepare", "mb": args.mb, "vocab_size": args.vocab_size, "cpus": os.cpu_count()}
        runs: dict[str, list[dict]] = {"ours": [], "tokenizers": []}
        for _ in range(args.repeats):
            for which in runs:
                runs[which].append(spawn(which, corpus, tokenizer, work))
        rows = [summarize(which, r, common) for which, r in runs.items()]
        ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
        cpu_ratio = rows[0]["tokens_per_cpu_s"] / rows[1]["tokens_per_cpu_s"]
        ratios = {"ours_over_tokenizers": round(ratio, 3), "ours_over_tokenizers_cpu": round(cpu_ratio, 3)}
        rows.append({**common, "model": "ratio", **ratios, "repeats": args.repeats})
        for mb in args.rss_mb:
            write_corpus(corpus, mb, args.seed)
            rows.append(summarize("ours", [spawn("ours", corpus, tokenizer, work)], {**common, "mb": mb}))
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def add_parser(sub) -> None:
    p = sub.add_parser("prepare", help="corpus preparation tokens/s vs tokenizers' encode_batch, and peak memory")
    p.add_argument("--mb", type=float, default=500, help="MB of generated text (default: %(default)s)")
    p.add_argument("--rss-mb", type=float, nargs="*", default=[], help="extra sizes: one run of ours each, for memory")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds A B A B (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8192, help="(default: %(default)s)")
    p.add_argument("--dir", default=None, help="where the corpus is written (default: the system's temp folder)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.set_defaults(func=bench_prepare)


if __name__ == "__main__":
    worker(sys.argv[1:])
