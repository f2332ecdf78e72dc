"""evaluate: the offline benchmark's documents (held out from fine-tuning, the SFT questions), the harness's perplexity
against a direct computation, an SFT run's adapter and its merged export scoring alike, results in benchmark.json and
TensorBoard, and bad input (lm_eval missing, a run that holds no causal LM, an unknown task) in one line with exit 2."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from {{ cookiecutter.package }} import evaluate, finetune
from {{ cookiecutter.package }}.config import LoraSettings, OptimConfig, TrainConfig
from {{ cookiecutter.package }}.config.finetune import FinetuneConfig, FinetuneDataConfig
from {{ cookiecutter.package }}.data import benchmark
from {{ cookiecutter.package }}.data.builtin import BUILTIN_CLASSIFY, BUILTIN_SFT, PLAYS, read_jsonl_records

EVAL_EXTRA = 'lm-evaluation-harness is optional: pip install -e ".[eval]"'  # the skip reason CI allows in the container

PARAGRAPHS = [
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;",
    "O, pardon me, thou bleeding piece of earth,\nThat I am meek and gentle with these butchers!",
    "Friends, Romans, countrymen, lend me your ears;",
]


def run_evaluate(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        evaluate.main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_offline_documents_are_held_out_and_ask_the_sft_questions():
    pytest.importorskip("datasets", reason=EVAL_EXTRA)  # the tasks' documents are `datasets` splits
    passages = benchmark.heldout_passages()
    val = [r for r in read_jsonl_records(BUILTIN_CLASSIFY) if r["split"] == "val"]
    sft = [r for r in read_jsonl_records(BUILTIN_SFT) if "prompt" in r]
    assert 250 <= len(passages) < len(val)  # some validation passages are SFT passages too: those are left out
    assert not any(p["text"] in r["prompt"] for p in passages for r in sft)
    answers: dict[str, set[str]] = {}  # each SFT question -> the answers SFT teaches
    for r in sft:
        answers.setdefault(r["prompt"].split("\n\n")[0], set()).add(r["response"])
    plays, genres = benchmark.play_docs()["test"], benchmark.genre_docs()["test"]
    assert len(plays) == len(genres) == len(passages)
    for passage, play, genre in zip(passages, plays, genres, strict=True):
        for doc in (play, genre):  # an SFT question about the passage, the SFT answers as the choices
            question, text = doc["prompt"].split("\n\n", 1)
            assert text == passage["text"] and set(doc["choices"]) == answers[question]
        assert play["choices"][play["gold"]] == passage["play"]
        assert passage["genre"] in genre["choices"][genre["gold"]]  # "It is from a history play."
    assert plays[0]["choices"] == [play.title for play in PLAYS]


def test_scores_keep_the_numbers_of_each_metric_and_filter():
    metrics = {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict-match": 1.0, "n": 3}
    expected = {"acc": 0.5, "acc_stderr": 0.1, "exact_match_strict-match": 1.0}
    assert evaluate.scores({"t": metrics}) == {"t": expected}


@torch.no_grad()
def direct_log_likelihood(model_dir, texts: list[str]) -> float:
    """Sum over the texts of log p(token | the tokens before it), each text after the tokenizer's bos (else eos)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    total = 0.0
    for text in texts:
        ids = torch.tensor([[prefix, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
        logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        total += float(logprobs.gather(1, ids[0, 1:, None]).sum())
    return total


def test_file_perplexity_equals_a_direct_computation(tmp_path, ft_hf_dir, capsys):
    pytest.importorskip("lm_eval", reason=EVAL_EXTRA)
    model_dir = shutil.copytree(ft_hf_dir, tmp_path / "model")  # evaluate writes its results beside the model
    (tmp_path / "held_out.txt").write_text("\n\n".join(PARAGRAPHS) + "\n")
    code, out, err = run_evaluate(capsys, model_dir, "--tasks", "", "--perplexity_file", tmp_path / "held_out.txt",
                                  "--device", "cpu")  # fmt: skip
    assert code == 0, err
    result = json.loads((model_dir / "benchmark.json").read_text())["results"]["file_ppl"]
    ll = direct_log_likelihood(model_dir, PARAGRAPHS)
    words = sum(len(re.split(r"\s+", p)) for p in PARAGRAPHS)
    size = sum(len(p.encode("utf-8")) for p in PARAGRAPHS)
    assert result["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-4)
    assert result["byte_perplexity"] == pytest.approx(math.exp(-ll / size), rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(-ll / size / math.log(2), rel=1e-4)
    assert "file_ppl: word_perplexity" in out


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, ft_hf_dir):
    """An SFT fine-tune of the tiny base with --merge: adapter/ and hf/."""
    root = tmp_path_factory.mktemp("evaluate-sft")
    cfg = FinetuneConfig(
        task="sft", base_model=str(ft_hf_dir), name="sft", out_dir=str(root), merge=True,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["all-linear"]),
        data=FinetuneDataConfig(max_seq_len=128),
        optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0, weight_decay=0.0),
        train=TrainConfig(max_steps=6, batch_size=8, eval_every=0, save_every=0, seed=0, device="cpu",
                          precision="fp32", logger="none"),
    )  # fmt: skip
    finetune.run(cfg)
    return root / "sft"


@pytest.mark.slow
def test_an_sft_run_scores_alike_through_its_adapter_and_its_merged_export(sft_run, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason=EVAL_EXTRA)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    adapter_only = shutil.copytree(sft_run, tmp_path / "adapter-only", ignore=shutil.ignore_patterns("hf", "tb"))
    runs = {}
    for run_dir in (sft_run, adapter_only):
        code, _, err = run_evaluate(capsys, run_dir, "--limit", "12", "--device", "cpu")
        assert code == 0, err
        runs[run_dir] = json.loads((run_dir / "benchmark.json").read_text())
    merged, adapted = runs[sft_run], runs[adapter_only]
    assert merged["model"] == {"pretrained": str(sft_run / "hf")} and adapted["model"]["peft"].endswith("adapter")
    assert merged["chat_template"] is True and merged["step"] == 6  # an SFT run is asked through its chat template
    assert set(merged["results"]) == {"shakespeare_play", "shakespeare_genre", "shakespeare_ppl"}
    for task, metrics in merged["results"].items():
        for metric, value in metrics.items():
            assert value == pytest.approx(adapted["results"][task][metric], rel=1e-3), (task, metric)
    assert 0 <= merged["results"]["shakespeare_play"]["acc"] <= 1
    events = EventAccumulator(str(sft_run / "tb"))
    events.Reload()
    (scalar,) = events.Scalars("benchmark/shakespeare_genre/acc")
    assert scalar.step == 6 and scalar.value == pytest.approx(merged["results"]["shakespeare_genre"]["acc"])
    code, _, err = run_evaluate(capsys, sft_run, "--tasks", "no_such_task_anywhere", "--limit", "1")
    assert code == 2 and "no_such_task_anywhere" in err and len(err.splitlines()) == 1, err


def test_bad_input_exits_2_with_one_line(tmp_path, capsys, ft_hf_dir):
    pytest.importorskip("lm_eval", reason=EVAL_EXTRA)
    (tmp_path / "classifier").mkdir()
    (tmp_path / "classifier" / "metrics.json").write_text(json.dumps({"task": "vision"}))
    cases = [
        ((tmp_path / "classifier",), "no causal language model here (a vision run)"),
        ((tmp_path / "empty",), "no causal language model here (not a run directory)"),
        ((ft_hf_dir, "--perplexity_file", tmp_path / "none.txt"), "none.txt: no such file"),
        ((ft_hf_dir, "--tasks", ""), "no tasks"),
    ]
    for argv, message in cases:
        code, out, err = run_evaluate(capsys, *argv)
        assert code == 2 and message in err and len(err.splitlines()) == 1 and not out, (argv, err)
    assert not (ft_hf_dir / "benchmark.json").exists()


def test_without_lm_eval_one_line_names_the_extra(capsys, monkeypatch, ft_hf_dir):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    code, out, err = run_evaluate(capsys, ft_hf_dir)
    assert code == 2 and not out and err == f"error: {evaluate.MISSING}"
    assert ".[eval]" in err
