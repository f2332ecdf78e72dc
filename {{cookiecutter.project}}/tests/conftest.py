"""Shared fixtures: tiny configs and models, a learnable token stream, a small corpus, subprocess helpers.

Everything is sized to run in well under a second per use on one CPU core. Append new fixtures at the end.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import {{ cookiecutter.package }} as package
from {{ cookiecutter.package }}.config import ModelConfig, TrainConfig
from {{ cookiecutter.package }}.data.builtin import BUILTIN_CORPUS
from {{ cookiecutter.package }}.model.lm import LlamaLM

PACKAGE = package.__name__
SRC_DIR = Path(package.__file__).resolve().parents[1]

# Tiny shapes run fastest on one thread, and on a shared machine extra OpenMP threads mostly spin-wait for cores that
# other processes hold (measured: 3x slower with 2 threads under load). Subprocesses get OMP_NUM_THREADS=1 to match.
torch.set_num_threads(1)


@pytest.fixture
def tiny_model_config() -> ModelConfig:
    return ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=32)


@pytest.fixture
def tiny_model(tiny_model_config: ModelConfig) -> LlamaLM:
    torch.manual_seed(0)
    return LlamaLM(tiny_model_config)


@pytest.fixture
def tiny_train_config() -> TrainConfig:
    """fp32, no TensorBoard, no periodic eval/save: tests switch on what they check."""
    return TrainConfig(
        max_steps=6,
        batch_size=4,
        grad_accum=1,
        log_every=1,
        eval_every=0,
        eval_batches=2,
        save_every=0,
        seed=0,
        device="cpu",
        precision="fp32",
        logger="none",
    )


@pytest.fixture
def pattern_tokens() -> np.ndarray:
    """A token stream a tiny model learns in a few steps: a fixed random sequence of 24 ids repeated."""
    rng = np.random.default_rng(0)
    period = rng.integers(4, 96, size=24)
    return np.tile(period, 400).astype(np.uint16)  # [9600]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first ~40 KB of the embedded corpus as a text file: tokenizer training and packing take ~0.2 s."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    text = BUILTIN_CORPUS.read_text(encoding="utf-8")[:40_000]
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def data_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One token/tokenizer cache for the whole session, so each tiny corpus is tokenized once."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture
def pretrain_args(small_corpus: Path, data_cache_dir: Path, tmp_path: Path) -> list[str]:
    """Command-line options for a tiny pre-training run (~1 s) on the small corpus, writing under tmp_path/runs."""
    return [
        "--name", "tiny",
        "--out_dir", str(tmp_path / "runs"),
        "--data.source", str(small_corpus),
        "--data.cache_dir", str(data_cache_dir),
        "--data.seq_len", "32",
        "--model.vocab_size", "320",
        "--model.dim", "32",
        "--model.n_layers", "2",
        "--model.n_heads", "4",
        "--model.n_kv_heads", "2",
        "--model.multiple_of", "16",
        "--model.max_seq_len", "32",
        "--optim.lr", "3e-3",
        "--optim.warmup_steps", "2",
        "--train.max_steps", "8",
        "--train.batch_size", "4",
        "--train.log_every", "1",
        "--train.eval_every", "4",
        "--train.eval_batches", "2",
        "--train.save_every", "4",
        "--train.device", "cpu",
        "--train.precision", "fp32",
        "--train.logger", "none",
        "--sample.max_new_tokens", "8",
        "--export_hf", "false",
    ]  # fmt: skip


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for `python -m <package>...` children: the package importable, one thread, no colour/bar noise."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC_DIR), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONBREAKPOINT", None)
    return env


@pytest.fixture
def package_name() -> str:
    """The import name of the generated package (for `python -m <package>.pretrain` in subprocesses)."""
    return PACKAGE


# ---- fine-tuning (test_sft, test_classify, test_lora, test_finetune, test_generate) ----------------------------------


@pytest.fixture(scope="session")
def ft_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """Our byte-level BPE with the ChatML template, 320 tokens, trained on ~40 KB of the corpus (~0.2 s)."""
    from {{ cookiecutter.package }}.data.tokenizer import train_tokenizer

    texts = BUILTIN_CORPUS.read_text(encoding="utf-8")[:40_000].split("\n\n")
    return train_tokenizer(texts, vocab_size=320, out_dir=tmp_path_factory.mktemp("ft-tokenizer"))


@pytest.fixture(scope="session")
def ft_hf_dir(tmp_path_factory: pytest.TempPathFactory, ft_tokenizer) -> Path:
    """A tiny random LlamaLM exported as a transformers LlamaForCausalLM directory (+ tokenizer): the stand-in for
    runs/pretrain/hf."""
    from {{ cookiecutter.package }}.model.hf import export_hf

    torch.manual_seed(0)
    # init_std 0.2, not 0.02: LoRA leaves the embeddings and the final norm frozen, so with a tiny random embedding
    # the logits stay within about +-0.6 and no adapter could make a confident prediction (a trained model's can).
    cfg = ModelConfig(
        vocab_size=len(ft_tokenizer), dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=128,
        init_std=0.2,
    )  # fmt: skip
    return export_hf(LlamaLM(cfg), tmp_path_factory.mktemp("ft-base") / "hf", ft_tokenizer)


# ---- damaged checkpoints (test_checkpoint, test_resume) ----------------------------------------------------------


@pytest.fixture(params=["truncated", "zero-length", "bit-flipped"])
def damage(request: pytest.FixtureRequest):
    """``damage(file)`` truncates, empties or flips one bit in the middle of ``file`` (one kind per test case) and
    returns a regular expression for what the checkpoint check must say about it."""

    def apply(file: Path) -> str:
        data = file.read_bytes()
        name = re.escape(file.name)
        if request.param == "bit-flipped":
            flipped = bytearray(data)
            flipped[len(data) // 2] ^= 0x10
            file.write_bytes(bytes(flipped))
            digest = r"[0-9a-f]{12}\.\.\."  # (not an f-string: its doubled braces would be template syntax)
            return rf"{name} has sha256 {digest}, manifest says {digest}: its bytes changed"
        kept = data[: len(data) // 2] if request.param == "truncated" else b""
        file.write_bytes(kept)
        return rf"{name} is {len(kept)} bytes, manifest says {len(data)}"

    return apply


# ---- loss weighting (test_step, test_distributed) -----------------------------------------------------------------


@pytest.fixture
def uneven_batch() -> dict[str, torch.Tensor]:
    """Two rows of 16 tokens as SFT masking leaves them: after the causal shift the first row has 1 target (its last
    token), the second 15. The step's mean is over all 16 targets; the mean of the two rows' means weighs the first
    row's single target as much as the second row's fifteen."""
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :-1] = -100
    return {"input_ids": ids, "labels": labels}


# ---- predict (test_predict, test_predict_vision, test_predict_speech) ------------------------------------------------


@pytest.fixture
def predict_cli(capsys):
    """``predict_cli(*argv, stdin=None)`` -> (exit code, stdout lines, stderr) of ``python -m <package>.predict``,
    run in this process."""
    import io
    import sys

    from {{ cookiecutter.package }} import predict

    def call(*argv: str, stdin: str | None = None) -> tuple[int, list[str], str]:
        capsys.readouterr()  # what the test printed before (a training run) is not predict's
        saved = sys.stdin
        sys.stdin = io.StringIO(stdin or "")
        try:
            predict.main([str(a) for a in argv])
            code = 0
        except SystemExit as exc:
            code = exc.code
        finally:
            sys.stdin = saved
        captured = capsys.readouterr()
        return code, captured.out.splitlines(), captured.err.strip()

    return call


@pytest.fixture
def predict_json(predict_cli):
    """``predict_json(*argv)`` -> {file: its --json line + "gold", the folder it is in (how samples are written)};
    fails unless predict exits 0."""
    import json

    def call(*argv: str) -> dict[str, dict]:
        code, lines, err = predict_cli(*argv, "--json")
        assert code == 0, err
        rows = [json.loads(line) for line in lines]
        return {row["file"]: {**row, "gold": Path(row["file"]).parent.name} for row in rows}

    return call
