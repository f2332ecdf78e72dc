"""predict on a text classifier: held-out texts as files score what the run's own evaluation scored, every probability
equals an unbatched forward through transformers + peft alone (uneven batches, padding), the merged export and the
adapter agree, stdin lines, and bad inputs end in one line with exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from {{ cookiecutter.package }} import finetune
from {{ cookiecutter.package }}.config import LoraSettings, OptimConfig, TrainConfig
from {{ cookiecutter.package }}.config.finetune import FinetuneConfig, FinetuneDataConfig
from {{ cookiecutter.package }}.data.classify import read_text_file, write_texts

# The label is the last word, which the classifier pools; the openings vary the length (padding in every batch).
ENDINGS = (("love", "comedy"), ("war", "history"), ("death", "tragedy"))
OPENINGS = ("the story", "an old tale of kings", "once more the long and winding story", "it", "so this")


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory, ft_hf_dir):
    """A text classifier trained on the tiny base with --merge (so the run has adapter/ and hf/): (run dir, val
    rows). The val rows come in a split column, as in the builtin set."""
    root = tmp_path_factory.mktemp("predict-text")
    pairs = [(o, end, label) for o in OPENINGS for end, label in ENDINGS]
    rows = [{"text": f"{o} ends in {end}", "label": label, "split": "train"} for o, end, label in pairs]
    val = [{"text": f"{o}, and then, ends in {end}", "label": label, "split": "val"} for o, end, label in pairs]
    data = root / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 3 + val))
    cfg = FinetuneConfig(
        task="classify", base_model=str(ft_hf_dir), name="cls", out_dir=str(root / "runs"), merge=True,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["all-linear"]),
        data=FinetuneDataConfig(path=str(data), max_seq_len=64),
        optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0, weight_decay=0.0),
        train=TrainConfig(max_steps=20, batch_size=8, eval_every=0, save_every=0, seed=0, device="cpu",
                          precision="fp32", logger="none"),
    )  # fmt: skip
    finetune.run(cfg)
    return root / "runs" / "cls", val


@torch.no_grad()
def reference_probabilities(base, adapter_dir, texts: list[str]) -> list[list[float]]:
    """One text at a time, unpadded, through transformers + peft alone (not the project's loaders)."""
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    labels = json.loads((adapter_dir / "label_map.json").read_text())["labels"]
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(labels))
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    return [model(input_ids=torch.tensor([tokenizer(t)["input_ids"]])).logits.softmax(-1)[0].tolist() for t in texts]


def test_held_out_files_score_the_runs_evaluation_and_match_an_unbatched_reference(
    classify_run, tmp_path, ft_hf_dir, predict_json
):
    run_dir, val = classify_run
    write_texts(val, tmp_path / "val")
    rows = predict_json(run_dir, tmp_path / "val", "--batch_size", "4", "--device", "cpu")  # 15 = 4 + 4 + 4 + 3
    assert len(rows) == len(val)
    accuracy = sum(r["label"] == r["gold"] for r in rows.values()) / len(rows)
    assert accuracy == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["eval"]["accuracy"])
    assert accuracy >= 0.8  # the rule is learnable: the score means something
    files = sorted(rows)
    texts = [read_text_file(f) for f in files]
    expected = reference_probabilities(ft_hf_dir, run_dir / "adapter", texts)
    for file, probs in zip(files, expected, strict=True):
        got = rows[file]["probabilities"]
        assert list(got) == ["comedy", "history", "tragedy"]  # the label map's order
        assert list(got.values()) == pytest.approx(probs, abs=1e-5), file


def test_merged_export_and_adapter_predict_the_same(classify_run, tmp_path, predict_json):
    run_dir, val = classify_run
    write_texts(val, tmp_path / "val")
    merged = predict_json(run_dir, tmp_path / "val")  # hf/ is there: the merged model
    adapter_only = tmp_path / "adapter-only"
    shutil.copytree(run_dir, adapter_only, ignore=shutil.ignore_patterns("hf", "checkpoints"))
    adapted = predict_json(adapter_only, tmp_path / "val")
    assert [r["label"] for r in merged.values()] == [r["label"] for r in adapted.values()]
    for file in merged:
        assert list(merged[file]["probabilities"].values()) == pytest.approx(
            list(adapted[file]["probabilities"].values()), abs=1e-4
        )


def test_stdin_lines_and_text_output(classify_run, tmp_path, predict_cli):
    run_dir, val = classify_run
    texts = [row["text"] for row in val[:4]]
    write_texts(val[:4], tmp_path / "val")
    code, lines, err = predict_cli(run_dir, stdin="\n".join([texts[0], "", *texts[1:]]) + "\n")
    assert code == 0, err
    assert [line.split("\t")[2] for line in lines] == ["<stdin>:1", "<stdin>:3", "<stdin>:4", "<stdin>:5"]
    code, from_files, _ = predict_cli(run_dir, *sorted((tmp_path / "val").rglob("*.txt")))
    by_text = {read_text_file(line.split("\t")[2]): line for line in from_files}
    for text, line in zip(texts, lines, strict=True):
        label, scores, _ = line.split("\t")
        assert (label, scores) == tuple(by_text[text].split("\t")[:2])
        probs = {name: float(p) for name, p in (kv.split("=") for kv in scores.split())}
        assert label == max(probs, key=probs.get) and sum(probs.values()) == pytest.approx(1, abs=1e-3)


def test_bad_inputs_exit_2_with_one_line(classify_run, tmp_path, predict_cli):
    run_dir, _ = classify_run
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ends in love".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG")
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "metrics.json").write_text(json.dumps({"task": "sft"}))
    (tmp_path / "pretrain").mkdir()
    cases = [
        ((run_dir, tmp_path / "latin1.txt"), "latin1.txt: unreadable text file"),
        ((run_dir, tmp_path / "empty.txt"), "empty.txt: empty text file"),
        ((run_dir, tmp_path / "nowhere.txt"), "nowhere.txt: no such file or folder"),
        ((run_dir, tmp_path / "images"), "images: no .txt files in this folder"),
        ((tmp_path / "sft", "x.txt"), "is a sft run, not a classifier's"),
        ((tmp_path / "pretrain", "x.txt"), "not a finished run (no metrics.json)"),
        ((tmp_path / "missing", "x.txt"), "missing: no such run directory"),
        ((run_dir, "--batch_size", "0"), "--batch_size 0: expected >= 1"),
        ((run_dir, "--no-such-flag"), "unrecognized arguments: --no-such-flag"),
    ]
    for argv, message in cases:
        code, out, err = predict_cli(*argv)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
        assert err.startswith("error: ") and not out


@pytest.mark.slow
def test_the_command_line_in_a_subprocess(classify_run, tmp_path, subprocess_env, package_name):
    run_dir, val = classify_run
    write_texts(val[:3], tmp_path / "val")
    argv = [sys.executable, "-m", f"{package_name}.predict", str(run_dir), str(tmp_path / "val")]
    done = subprocess.run(argv, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 3
    bad = subprocess.run([*argv, str(tmp_path / "missing.txt")], env=subprocess_env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("missing.txt: no such file or folder")
