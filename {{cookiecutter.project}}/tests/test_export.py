"""Exports behave elsewhere as they do here.

A fine-tune's merged model, loaded with transformers' AutoModelForCausalLM + AutoTokenizer alone, answers a prompt
rendered with ``apply_chat_template`` through transformers' own ``generate`` (greedy, no stop ids passed: only what the
export says) with exactly the tokens of ``<package>.generate --chat always``, and stops at the end of its turn. Our own
LlamaLM gives the same tokens from the same files; so does the adapter, loaded with peft's ``PeftModel.from_pretrained``
on the base and stopped by the generation config saved beside it, and ``generate --adapter``. Once for a base that our
pre-training exported (ChatML) and once for a hub-format base built with transformers' own classes in a local
directory (Llama 3's chat layout, a tokenizer that adds BOS and has no pad token).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from {{ cookiecutter.package }} import finetune, generate
from {{ cookiecutter.package }}.config import LoraSettings, OptimConfig, SampleConfig, TrainConfig
from {{ cookiecutter.package }}.config.finetune import FinetuneConfig, FinetuneDataConfig
from {{ cookiecutter.package }}.config.generate import GenerateConfig
from {{ cookiecutter.package }}.data.builtin import BUILTIN_CORPUS, BUILTIN_SFT
from {{ cookiecutter.package }}.data.tokenizer import _jinja_expression, _jinja_statement
from {{ cookiecutter.package }}.model.hf import import_hf

MAX_NEW = 24
COLOURS = [("Colour of the sky?", "blue"), ("Colour of grass?", "green"), ("Colour of snow?", "white"),
           ("Colour of blood?", "red")]  # fmt: skip
# Llama 3's special tokens and chat layout: a different end of turn than ChatML's, and an eos that is not it.
BOS, EOS, HEADER_START, HEADER_END, EOT = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
)  # fmt: skip


def finetune_merged(base: Path | str, out_dir: Path, data_path: Path | None, max_seq_len: int) -> Path:
    """The project's SFT on ``data_path`` (None: the shipped set) with ``--merge true``; returns the run directory."""
    train = TrainConfig(max_steps=40, batch_size=8, log_every=10, eval_every=0, save_every=0, keep_checkpoints=0,
                        seed=0, device="cpu", precision="fp32", logger="none")  # fmt: skip
    cfg = FinetuneConfig(
        task="sft",
        base_model=str(base),
        name="sft",
        out_dir=str(out_dir),
        merge=True,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["all-linear"]),
        data=FinetuneDataConfig(path=str(data_path) if data_path else None, val_fraction=0.0, max_seq_len=max_seq_len),
        optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0, weight_decay=0.0),
        train=train,
        sample=SampleConfig(prompts=[]),
    )
    finetune.run(cfg)
    return out_dir / "sft"


@torch.no_grad()
def answer_elsewhere(model_dir: Path, prompt: str) -> tuple[list[int], list[int]]:
    """(prompt ids, new ids) with nothing of ours: the chat template and the stop ids come from the files."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    chat = [{"role": "user", "content": prompt}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    n = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), out[0, n:].tolist()


def answer_here(model_dir: Path, prompt: str, adapter: Path | None = None) -> tuple[list[int], list[int]]:
    """What ``python -m <package>.generate --model DIR [--adapter A] --chat always --temperature 0`` answers."""
    cfg = GenerateConfig(model=str(model_dir), adapter=str(adapter) if adapter else None, prompt=prompt, chat="always",
                         temperature=0.0, max_new_tokens=MAX_NEW, device="cpu")  # fmt: skip
    model, tokenizer = generate.load_for_generation(cfg)
    return generate.complete(cfg, model, tokenizer, chat=True)


@torch.no_grad()
def answer_with_peft(base: Path, run_dir: Path, prompt_ids: list[int]) -> list[int]:
    """The adapter on the base through peft alone, stopping where the adapter's generation config says."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(run_dir / "adapter")).eval()
    ids = torch.tensor([prompt_ids])
    stop = GenerationConfig.from_pretrained(run_dir / "adapter")
    out = model.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False, generation_config=stop)
    return out[0, ids.shape[1] :].tolist()


def assert_answers_alike(base: Path, run_dir: Path, prompts: list[str], end_of_turn: int) -> list[list[int]]:
    merged = run_dir / "hf"
    eos = json.loads((merged / "config.json").read_text())["eos_token_id"]
    for saved in (merged, run_dir / "adapter"):
        assert json.loads((saved / "generation_config.json").read_text())["eos_token_id"] == sorted({eos, end_of_turn})
    ours_llama = import_hf(merged).eval()
    answers = []
    for prompt in prompts:
        prompt_ids, theirs = answer_elsewhere(merged, prompt)
        assert answer_here(merged, prompt) == (prompt_ids, theirs), prompt
        assert theirs[-1] == end_of_turn and end_of_turn not in theirs[:-1] and len(theirs) < MAX_NEW, theirs
        ids = torch.tensor([prompt_ids])
        scratch = ours_llama.generate(ids, MAX_NEW, temperature=0.0, eos_token_id=sorted({eos, end_of_turn}))
        assert scratch[0, ids.shape[1] :].tolist() == theirs, prompt
        assert answer_with_peft(base, run_dir, prompt_ids) == theirs, prompt
        assert answer_here(base, prompt, adapter=run_dir / "adapter") == (prompt_ids, theirs), prompt
        answers.append(theirs)
    return answers


def test_merged_export_of_our_base_answers_alike_elsewhere(tmp_path, ft_hf_dir, ft_tokenizer):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in COLOURS * 8))
    run_dir = finetune_merged(ft_hf_dir, tmp_path / "runs", data, max_seq_len=64)
    end_of_turn = ft_tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = assert_answers_alike(ft_hf_dir, run_dir, [p for p, _ in COLOURS], end_of_turn)
    replies = [ft_tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    assert replies == [r for _, r in COLOURS], replies  # learned, so stopping is the model's doing, not max_new_tokens


def llama3_chat_template() -> str:
    s, e = _jinja_statement, _jinja_expression
    return (
        e("bos_token")
        + s("for message in messages")
        + HEADER_START + e("message['role']") + HEADER_END + "\n\n" + e("message['content']") + EOT
        + s("endfor")
        + s("if add_generation_prompt") + HEADER_START + "assistant" + HEADER_END + "\n\n" + s("endif")
    )  # fmt: skip


def hub_format_base(directory: Path) -> Path:
    """A random LlamaForCausalLM and a byte-level BPE tokenizer, both saved by transformers as on the Hub: untied
    embeddings, BOS added by the tokenizer's post-processor, no pad token, Llama 3's chat template."""
    specials = [BOS, EOS, HEADER_START, HEADER_END, EOT]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator(BUILTIN_CORPUS.read_text(encoding="utf-8")[:40_000].split("\n\n"), trainer)
    bpe.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, chat_template=llama3_chat_template(),
        clean_up_tokenization_spaces=False,
    )  # fmt: skip
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    # initializer_range 0.2: LoRA leaves the random embeddings frozen (see conftest.ft_hf_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, initializer_range=0.2, bos_token_id=0, eos_token_id=1)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_merged_export_of_a_hub_format_base_answers_alike_elsewhere(tmp_path):
    base = hub_format_base(tmp_path / "base")
    saved = AutoTokenizer.from_pretrained(base)
    assert saved("Hi")["input_ids"][0] == saved.bos_token_id == 0 and saved.pad_token is None
    run_dir = finetune_merged(base, tmp_path / "runs", None, max_seq_len=256)  # the shipped SFT set
    prompts = [json.loads(line)["prompt"] for line in BUILTIN_SFT.read_text(encoding="utf-8").splitlines()[:3]]
    assert_answers_alike(base, run_dir, prompts, end_of_turn=4)
