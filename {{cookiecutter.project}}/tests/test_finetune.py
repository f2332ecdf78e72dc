"""finetune: both tasks end to end on a tiny model (loss falls, outputs, metrics), resume, merge, and bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from sklearn import metrics as skm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from {{ cookiecutter.package }} import finetune
from {{ cookiecutter.package }}.config import (
    EarlyStoppingConfig,
    LoraSettings,
    OptimConfig,
    SampleConfig,
    TrainConfig,
    parse_config,
)
from {{ cookiecutter.package }}.config.finetune import FinetuneConfig, FinetuneDataConfig
from {{ cookiecutter.package }}.config.generate import GenerateConfig
from {{ cookiecutter.package }}.data import sft as sft_data
from {{ cookiecutter.package }}.lora import load_adapter

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SFT_PAIRS = [("Colour of the sky?", "blue"), ("Colour of grass?", "green"), ("Colour of snow?", "white"),
             ("Colour of blood?", "red")]  # fmt: skip


@pytest.fixture
def sft_file(tmp_path):
    path = tmp_path / "sft.jsonl"
    lines = [json.dumps({"prompt": p, "response": r}) for p, r in SFT_PAIRS * 8]
    lines.append(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "red"}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def sft_val_file(tmp_path):
    # 12 examples of different lengths: two evaluation batches (8 + 4) whose mean losses differ, so a mean of batch
    # means would not equal the token-weighted mean.
    pairs = [*SFT_PAIRS, ("Colour of the sea in a storm?", "dark grey"), ("Colour of coal?", "black as night")] * 2
    path = tmp_path / "sft-val.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return path


ENDINGS = (("love", "comedy"), ("war", "history"), ("death", "tragedy"))


@pytest.fixture
def classify_file(tmp_path):
    # The label is decided by the last word, which the classifier pools (the last non-padding token).
    path = tmp_path / "cls.csv"
    rows = [(f"the {w} story ends in {end}", label) for w in ("old", "new", "sad", "odd", "long", "short")
            for end, label in ENDINGS]  # fmt: skip
    path.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows * 2))
    return path


@pytest.fixture
def classify_val_file(tmp_path):
    # 9 rows labelled as in training plus 3 mislabelled ones, all below the diagonal: a model that learned the rule
    # gets an asymmetric confusion matrix, so swapping gold and predicted labels changes precision, recall and the
    # matrix (with a perfect score, the diagonal matrix would hide the swap).
    rows = [(f"the {w} story ends in {end}", label) for w in ("old", "new", "sad") for end, label in ENDINGS]
    rows += [("the odd story ends in love", "history"), ("the long story ends in war", "tragedy"),
             ("the short story ends in love", "tragedy")]  # fmt: skip
    path = tmp_path / "cls-val.csv"
    path.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    return path


def _cfg(task, base, data_path, out_dir, **overrides) -> FinetuneConfig:
    train = dict(max_steps=12, batch_size=8, log_every=1, eval_every=0, save_every=0, keep_checkpoints=0, seed=0,
                 device="cpu", precision="fp32", logger="none")  # fmt: skip
    train.update(overrides.pop("train", {}))
    return FinetuneConfig(
        task=task,
        base_model=str(base),
        name=overrides.pop("name", task),
        out_dir=str(out_dir),
        lora=LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["all-linear"]),
        data=FinetuneDataConfig(path=str(data_path), val_fraction=0.2, max_seq_len=64, **overrides.pop("data", {})),
        optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0, weight_decay=0.0),
        train=TrainConfig(**train),
        sample=SampleConfig(prompts=["Colour of the sky?"], max_new_tokens=4),
        **overrides,
    )


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _saved_model(task, base, adapter_dir):
    """The run's saved adapter on a freshly loaded base, through transformers and peft only (not our loaders)."""
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if task == "sft":
        model = AutoModelForCausalLM.from_pretrained(base)
    else:
        labels = json.loads((adapter_dir / "label_map.json").read_text())["labels"]
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(labels))
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval(), tokenizer


@torch.no_grad()
def _reference_sft_eval(base, adapter_dir, val_path, max_len):
    """Token-weighted response loss, one unpadded example at a time: sum of per-token cross-entropies / tokens."""
    model, tokenizer = _saved_model("sft", base, adapter_dir)
    examples, _ = sft_data.encode_conversations(sft_data.load_conversations(val_path), tokenizer, max_len)
    loss_sum, tokens = 0.0, 0
    for e in examples:
        logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
        targets = torch.tensor(e["labels"][1:])
        loss_sum += float(F.cross_entropy(logits.float(), targets, ignore_index=sft_data.IGNORE_INDEX, reduction="sum"))
        tokens += int((targets != sft_data.IGNORE_INDEX).sum())
    return loss_sum / tokens, tokens


@torch.no_grad()
def _reference_classify_predictions(base, adapter_dir, rows):
    """(gold ids, predicted ids, per-example cross-entropies), one unpadded example at a time."""
    model, tokenizer = _saved_model("classify", base, adapter_dir)
    labels = json.loads((adapter_dir / "label_map.json").read_text())["labels"]
    gold, pred, losses = [], [], []
    for text, label in rows:
        logits = model(input_ids=torch.tensor([tokenizer(text)["input_ids"]])).logits.float()
        gold.append(labels.index(label))
        pred.append(int(logits.argmax(-1)))
        losses.append(float(F.cross_entropy(logits, torch.tensor([gold[-1]]))))
    return gold, pred, losses


@pytest.mark.parametrize("packing", [False, True])
def test_sft_loss_falls_and_outputs_are_written(tmp_path, ft_hf_dir, sft_file, sft_val_file, packing):
    data = {"packing": packing, "val_path": str(sft_val_file)}
    cfg = _cfg("sft", ft_hf_dir, sft_file, tmp_path / "runs", data=data)
    result = finetune.run(cfg)
    run_dir = tmp_path / "runs" / "sft"
    losses = _losses(run_dir)
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < losses[0] - 0.5
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (run_dir / "adapter" / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    assert metrics["eval"]["perplexity"] == pytest.approx(2.718281828 ** metrics["eval"]["loss"], rel=1e-6)
    loss, tokens = _reference_sft_eval(ft_hf_dir, run_dir / "adapter", sft_val_file, cfg.data.max_seq_len)
    assert metrics["eval"]["tokens"] == tokens
    assert metrics["eval"]["loss"] == pytest.approx(loss, rel=1e-4)
    assert metrics["trainable_params"] < metrics["total_params"] / 2
    assert (run_dir / "config.yaml").is_file()


def test_classify_loss_falls_with_label_map_and_metrics(tmp_path, ft_hf_dir, classify_file, classify_val_file):
    data = {"val_path": str(classify_val_file)}
    cfg = _cfg("classify", ft_hf_dir, classify_file, tmp_path / "runs", class_weights=True, data=data)
    finetune.run(cfg)
    run_dir = tmp_path / "runs" / "classify"
    losses = _losses(run_dir)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3
    assert json.loads((run_dir / "label_map.json").read_text()) == {"labels": ["comedy", "history", "tragedy"]}
    assert (run_dir / "adapter" / "label_map.json").is_file()
    ev = json.loads((run_dir / "metrics.json").read_text())["eval"]
    rows = [line.rsplit(",", 1) for line in classify_val_file.read_text().splitlines()[1:]]
    gold, pred, ce = _reference_classify_predictions(ft_hf_dir, run_dir / "adapter", rows)
    assert ev["num_examples"] == len(rows) == 12
    cm = skm.confusion_matrix(gold, pred, labels=[0, 1, 2])
    assert ev["confusion_matrix"] == cm.tolist()
    assert (cm != cm.T).any(), "the model did not learn the rule: the swapped-labels check below would be blind"
    p, r, f, support = skm.precision_recall_fscore_support(gold, pred, labels=[0, 1, 2], zero_division=0)
    assert ev["accuracy"] == pytest.approx(skm.accuracy_score(gold, pred))
    assert [ev["macro_precision"], ev["macro_recall"], ev["macro_f1"]] == pytest.approx([p.mean(), r.mean(), f.mean()])
    for i, label in enumerate(["comedy", "history", "tragedy"]):
        got = [ev["per_class"][label][k] for k in ("precision", "recall", "f1", "support")]
        assert got == pytest.approx([p[i], r[i], f[i], support[i]]), label
    # The training set is balanced, so the class weights are all 1 and the loss is the plain mean cross-entropy.
    assert ev["loss"] == pytest.approx(sum(ce) / len(ce), rel=1e-4, abs=1e-6)
    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["task_type"] == "SEQ_CLS" and "score" in adapter_cfg["modules_to_save"]


def test_final_evaluation_runs_under_the_training_autocast(tmp_path, ft_hf_dir, sft_file, sft_val_file, monkeypatch):
    """bf16: the final evaluation of the validation set gives the number the evaluation of the same set at the last
    step gave, on the same weights; an fp32 final evaluation differs from it in the third digit."""
    from {{ cookiecutter.package }} import runtime

    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)  # bf16 autocast runs on any CPU, if slowly
    train = {"max_steps": 2, "eval_every": 2, "precision": "bf16"}
    cfg = _cfg("sft", ft_hf_dir, sft_file, tmp_path / "runs", data={"val_path": str(sft_val_file)}, train=train)
    result = finetune.run(cfg)
    last = json.loads((tmp_path / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["eval"]["loss"] == pytest.approx(last["eval_loss"], rel=1e-6)


def test_resume_restores_adapter_and_optimizer_exactly(tmp_path, ft_hf_dir, sft_file):
    full = _cfg("sft", ft_hf_dir, sft_file, tmp_path / "runs", name="full", train={"max_steps": 4, "save_every": 2})
    finetune.run(full)
    # A copy of the run that was "killed" after step 2: only the step-2 checkpoint is left, and none of the final
    # outputs, so the adapter compared below must be the one the resumed run wrote.
    shutil.copytree(tmp_path / "runs" / "full", tmp_path / "runs" / "cut")
    ckpts = tmp_path / "runs" / "cut" / "checkpoints"
    shutil.rmtree(ckpts / "step-000004")
    (ckpts / "latest").write_text("step-000002\n")
    shutil.rmtree(tmp_path / "runs" / "cut" / "adapter")
    (tmp_path / "runs" / "cut" / "metrics.json").unlink()
    cut = _cfg("sft", ft_hf_dir, sft_file, tmp_path / "runs", name="cut", train={"max_steps": 4, "resume": "auto"})
    finetune.run(cut)

    assert _losses(tmp_path / "runs" / "cut") == pytest.approx(_losses(tmp_path / "runs" / "full"), abs=1e-6)
    a = load_file(tmp_path / "runs" / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "runs" / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    step2 = load_file(ckpts / "step-000002" / "adapter" / "adapter_model.safetensors")
    assert not all(torch.allclose(step2[k], b[k], atol=1e-6) for k in b)  # steps 3 and 4 reached the saved adapter
    # One set of adapters: wrapping twice would have produced nested base_model.model.base_model... names.
    assert all(k.count("base_model") == 1 for k in b)


def test_merge_writes_a_standalone_model_equal_to_base_plus_adapter(tmp_path, ft_hf_dir, sft_file):
    cfg = _cfg("sft", ft_hf_dir, sft_file, tmp_path / "runs", merge=True, train={"max_steps": 3})
    finetune.run(cfg)
    run_dir = tmp_path / "runs" / "sft"
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    adapted = load_adapter(AutoModelForCausalLM.from_pretrained(ft_hf_dir), run_dir / "adapter").eval()
    x = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapted(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def _expect_exit(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        finetune.main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert match in err, err


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, ft_hf_dir, monkeypatch):
    base = ["--base_model", str(ft_hf_dir), "--out_dir", str(tmp_path / "runs"), "--train.device", "cpu"]
    (tmp_path / "nolabel.csv").write_text("text,category\nhello,a\n")
    _expect_exit(capsys, [*base, "--task", "classify", "--data.path", str(tmp_path / "nolabel.csv")],
                 "missing column(s) ['label']")  # fmt: skip
    (tmp_path / "empty.jsonl").write_text("")
    _expect_exit(capsys, [*base, "--data.path", str(tmp_path / "empty.jsonl")], "no examples")
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\n")
    (tmp_path / "val.csv").write_text("text,label\nc,z\n")
    argv = ["--task", "classify", "--data.path", str(tmp_path / "train.csv")]
    _expect_exit(capsys, [*base, *argv, "--data.val_path", str(tmp_path / "val.csv")], "unknown label 'z'")
    _expect_exit(capsys, [*base, "--base_model", str(tmp_path / "no" / "model")], "model path does not exist")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _expect_exit(capsys, [*base, "--lora.qlora", "true"], "needs a CUDA GPU")
    assert not (tmp_path / "runs").exists()  # every refusal happened before anything was written


def test_missing_default_model_without_debug_says_run_pretrain(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _expect_exit(capsys, ["--train.device", "cpu"], "run pretrain first")


def test_base_model_resolution(tmp_path, monkeypatch):
    """None means "what pretrain exported" (the debug run's under --debug); an explicit path is taken as given, even
    when it names the real run's export under --debug."""
    monkeypatch.chdir(tmp_path)

    def resolve(argv):
        cfg, dbg = parse_config(FinetuneConfig, argv)
        return finetune.resolve_base_model(cfg, dbg.debug)

    assert resolve(["--debug"]) is None  # nothing pre-trained: build a tiny model
    for name in ("pretrain", "pretrain-debug"):
        (tmp_path / "runs" / name / "hf").mkdir(parents=True)
        (tmp_path / "runs" / name / "hf" / "config.json").write_text("{}")
    assert resolve([]) == str(Path("runs", "pretrain", "hf"))
    assert resolve(["--debug"]) == str(Path("runs", "pretrain-debug", "hf"))
    assert resolve(["--debug", "--base_model", "runs/pretrain/hf"]) == "runs/pretrain/hf"
    assert resolve(["--base_model", "some/hub-id"]) == "some/hub-id"


@pytest.mark.slow
def test_cli_debug_builds_a_tiny_model_then_generate_uses_the_adapter(tmp_path, subprocess_env, package_name):
    cmd = [sys.executable, "-m", f"{package_name}.finetune", "--debug", "--train.max_steps", "3"]
    done = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = next(p for p in (tmp_path / "runs").rglob("adapter_config.json") if "checkpoints" not in str(p)).parent
    assert "building a tiny random one" in done.stdout
    gen = [sys.executable, "-m", f"{package_name}.generate", "--model", str(run_dir.parent / "base")]
    gen += ["--adapter", str(run_dir), "--prompt", "Who speaks?", "--max_new_tokens", "5", "--device", "cpu"]
    out = subprocess.run(gen, cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("Who speaks?")


@pytest.mark.parametrize("task", ["sft", "classify"])
def test_shipped_finetune_configs_parse(task):
    cfg, dbg = parse_config(FinetuneConfig, ["--config", str(CONFIGS / f"finetune-{task}.yaml")])
    assert cfg.task == task and cfg.name == f"finetune-{task}" and not dbg.debug
    assert cfg.base_model is None and not cfg.lora.qlora  # None = what pretrain exported
    cli, _ = parse_config(FinetuneConfig, ["--task", task, "--lora.target_modules", "[all-linear]", "--lora.r", "4"])
    assert cli.name == f"finetune-{task}" and cli.lora.target_modules == ["all-linear"] and cli.lora.r == 4
    assert parse_config(FinetuneConfig, [])[0].lora.target_modules is None  # per-architecture default
    gen, _ = parse_config(GenerateConfig, ["--prompt", "Hi", "--chat", "always", "--temperature", "0"])
    assert gen.chat == "always" and gen.adapter is None


def test_attached_debugger_trains_without_workers(tmp_path, ft_hf_dir, sft_file, monkeypatch, capsys):
    from {{ cookiecutter.package }} import debug

    monkeypatch.setattr(debug, "debugger_attached", lambda: True)
    seen = []

    class Recording(finetune.batches.ExampleBatches):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs["num_workers"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(finetune.batches, "ExampleBatches", Recording)
    cfg = _cfg("sft", ft_hf_dir, sft_file, tmp_path / "runs", data={"num_workers": 2}, train={"max_steps": 1})
    finetune.run(cfg)
    assert seen == [0]
    assert "debugger attached: num_workers 2 -> 0" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["sft", "classify"])
def test_finetune_evaluates_and_saves_the_best_adapter(tmp_path, ft_hf_dir, sft_file, classify_file, task):
    stopping = EarlyStoppingConfig(enabled=True, patience=1, min_delta=1e9)
    train = {"max_steps": 6, "eval_every": 2, "eval_batches": 1, "early_stopping": stopping}
    cfg = _cfg(task, ft_hf_dir, sft_file if task == "sft" else classify_file, tmp_path / "runs", train=train)
    result = finetune.run(cfg)
    run_dir = tmp_path / "runs" / task
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]  # stopped at the second evaluation
    assert result["weights"] == "of the best checkpoint, step 2 (early stopping)"
    step2 = next(r for r in records if r["step"] == 2)
    assert result["eval"]["loss"] == pytest.approx(step2["eval_loss"], abs=1e-6)  # the whole set, both times
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    best = load_file(run_dir / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in saved)
