"""generate: one transformers path for base, adapter and merged models; template on for SFT adapters; errors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from {{ cookiecutter.package }} import generate
from {{ cookiecutter.package }}.config import LoraSettings
from {{ cookiecutter.package }}.config.generate import GenerateConfig
from {{ cookiecutter.package }}.data.sft import prompt_ids, stop_token_ids
from {{ cookiecutter.package }}.lora import apply_lora, load_model
from {{ cookiecutter.package }}.model.hf import import_hf


def _cfg(model, **kw) -> GenerateConfig:
    return GenerateConfig(model=str(model), device="cpu", max_new_tokens=8, temperature=0.0, **kw)


def test_greedy_output_matches_our_llamalm_generate(ft_hf_dir, ft_tokenizer, capsys):
    text = generate.run(_cfg(ft_hf_dir, prompt="MACBETH."))
    assert capsys.readouterr().out.strip() == text.strip()
    ours = import_hf(ft_hf_dir).eval()
    ids = torch.tensor([ft_tokenizer("MACBETH.")["input_ids"]])
    out = ours.generate(ids, max_new_tokens=8, temperature=0.0, eos_token_id=ft_tokenizer.eos_token_id)
    assert text == "MACBETH." + ft_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _adapter(tmp_path, ft_hf_dir, task="sft"):
    model, tok = load_model(ft_hf_dir, task, labels=["a", "b"] if task == "classify" else None)
    model = apply_lora(model, LoraSettings(r=4, dropout=0.0), task)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    model.save_pretrained(tmp_path / task)
    tok.save_pretrained(tmp_path / task)
    return model, tok


def test_sft_adapter_uses_the_training_template(tmp_path, ft_hf_dir, capsys):
    model, tok = _adapter(tmp_path, ft_hf_dir)
    text = generate.run(_cfg(ft_hf_dir, adapter=str(tmp_path / "sft"), prompt="Who speaks?"))
    ids = torch.tensor([prompt_ids("Who speaks?", tok)])  # <|im_start|>user ... <|im_start|>assistant\n
    assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n")
    expected = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                     do_sample=False, eos_token_id=[0, 3], pad_token_id=tok.pad_token_id)  # fmt: skip
    assert text == "Who speaks?\n" + tok.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
    plain = generate.run(_cfg(ft_hf_dir, adapter=str(tmp_path / "sft"), prompt="Who speaks?", chat="never"))
    assert plain != text


def test_chat_always_renders_the_template_without_an_adapter(ft_hf_dir):
    text = generate.run(_cfg(ft_hf_dir, prompt="Who speaks?", chat="always"))
    model, tok = load_model(ft_hf_dir, "sft")
    ids = torch.tensor([prompt_ids("Who speaks?", tok)])
    stop = stop_token_ids(tok)
    expected = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                     do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id)  # fmt: skip
    assert text == "Who speaks?\n" + tok.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
    assert text != generate.run(_cfg(ft_hf_dir, prompt="Who speaks?"))  # auto: no adapter, no template


def _expect_exit(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        generate.main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert match in err, err


def test_errors_are_one_line(tmp_path, ft_hf_dir, capsys, monkeypatch):
    _adapter(tmp_path, ft_hf_dir, task="classify")
    capsys.readouterr()  # drop the loading report of the line above
    _expect_exit(capsys, ["--model", str(ft_hf_dir), "--adapter", str(tmp_path / "classify")], "classification adapter")
    _expect_exit(capsys, ["--model", str(tmp_path / "missing" / "dir")], "model path does not exist")
    _expect_exit(capsys, ["--model", str(ft_hf_dir), "--adapter", str(tmp_path)], "no adapter_config.json")
    monkeypatch.chdir(tmp_path)
    _expect_exit(capsys, ["--debug"], "pretrain --debug")
    _expect_exit(capsys, [], "run pretrain first")


def test_no_entry_point_imports_another():
    """Jobs share code through the modules below them (generate and finetune: lora.generate_ids and
    lora.pretrain_export_dir), so running or reading one never loads another's set-up."""
    jobs = {"pretrain", "finetune", "generate", "vision", "speech", "bench"}
    package_dir = Path(generate.__file__).parent
    found = []
    for job in sorted(jobs):
        path = package_dir / f"{job}.py"
        if not path.is_file():
            continue  # vision / speech: only where the extra projects were chosen
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import ... / from . import x
                names = [node.module] if node.module else [alias.name for alias in node.names]
                found += [f"{job} -> {name}" for name in names if name.split(".")[0] in jobs]
    assert not found, found
