"""A text classifier of ``finetune --task classify``: its merged model (``hf/``, with ``--merge true``) or its LoRA
adapter (``adapter/``, with the tokenizer) on the base model the adapter names. A text is one file (its final line
break dropped) or one line of standard input, tokenized and cut to the training length as in training."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import load_config
from ..config.finetune import FinetuneConfig
from ..data import classify as cls_data
from ..data.tokenizer import load_tokenizer
from ..lora import ADAPTER_DIR, MERGED_DIR, adapter_config, load_adapter, load_model, max_input_len
from . import Classifier


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No loading progress bars or reports from transformers: the base model's "score.weight newly initialized"
    is expected (the adapter holds the trained head), and predict's stderr is for its one-line errors."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_text_classifier(run_dir: Path, labels: list[str], trust_remote_code: bool) -> tuple[Any, Any]:
    """(model, tokenizer): the merged export when the run wrote one, else the adapter on its base model."""
    merged, adapter = run_dir / MERGED_DIR, run_dir / ADAPTER_DIR
    with quiet_transformers():
        if (merged / "config.json").is_file():
            return load_model(merged, "classify", labels=labels, trust_remote_code=trust_remote_code)
        base = adapter_config(adapter)["base_model_name_or_path"]
        model, _ = load_model(base, "classify", labels=labels, trust_remote_code=trust_remote_code)
        return load_adapter(model, adapter), load_tokenizer(adapter, trust_remote_code=trust_remote_code)


def load(run_dir: Path) -> Classifier:
    cfg = load_config(FinetuneConfig, run_dir / "config.yaml")
    labels = cls_data.LabelMap.load(run_dir).labels
    model, tokenizer = load_text_classifier(run_dir, labels, cfg.trust_remote_code)
    max_len = max_input_len(model, cfg.data.max_seq_len)  # as finetune cut the training texts
    encode = functools.partial(cls_data.encode_text, tokenizer=tokenizer, max_len=max_len)
    return Classifier(
        labels=labels,
        model=model,
        read_file=lambda path: encode(cls_data.read_text_file(path)),
        collate=cls_data.classify_collate(tokenizer.pad_token_id),
        suffixes=cls_data.TEXT_SUFFIXES,
        read_line=encode,
    )
