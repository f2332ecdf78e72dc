"""``python -m <package>.pretrain``: its config and the data section only it has."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base import ModelConfig, OptimConfig, RunConfig, SampleConfig, TrainConfig, require


@dataclass
class DataConfig:
    """Where the pre-training text comes from and how it is cut into training windows."""

    path: str | None = None  # a .txt/.md file, a directory of them, or JSONL with `text_key`; None = embedded corpus
    text_key: str = "text"  # JSONL field holding the document text
    tokenizer: str | None = None  # directory with tokenizer.json to reuse; None = train a BPE tokenizer on the corpus
    vocab_size: int | None = None  # size of a newly trained tokenizer; None = model.vocab_size
    seq_len: int = 128  # tokens per training window (must be <= model.max_seq_len)
    sampling: Literal["random", "sequential"] = "random"  # random windows, or consecutive ones (epoch-like passes)
    val_fraction: float = 0.05  # share of the token stream held out for evaluation (chunks spread evenly)
    cache_dir: str = ".cache/data"  # packed token shards, keyed by a hash of text + tokenizer
    # No num_workers here: training windows are slices of a memory-mapped token array, read in the training process
    # (microseconds per batch), so there is no DataLoader and nothing a debugger could miss in a worker process.

    def __post_init__(self) -> None:
        require(self.seq_len >= 2, "data.seq_len", self.seq_len, ">= 2")
        require(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "in (0, 1)")


@dataclass
class PretrainConfig(RunConfig):
    """``python -m <package>.pretrain``: train LlamaLM from scratch into ``out_dir/name``."""

    debug_section = "pretrain"
    shardable = True
    name: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    export_hf: bool = True  # write run_dir/hf (transformers LlamaForCausalLM + tokenizer) at the end

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}: "
                "lower data.seq_len or raise model.max_seq_len"
            )
