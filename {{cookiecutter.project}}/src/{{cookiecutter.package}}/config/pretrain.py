"""``python -m <package>.pretrain``: its config and the data section only it has."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base import ModelConfig, OptimConfig, RunConfig, SampleConfig, TrainConfig, require


@dataclass
class DataConfig:
    """Where the pre-training text comes from and how it is cut into training windows."""

    # None = the built-in corpus; a text/JSONL/parquet/Arrow file, a folder or glob of them, a save_to_disk folder,
    # or a hub dataset id (e.g. HuggingFaceFW/fineweb-edu with subset sample-10BT): see docs/data.md
    source: str | None = None
    text_key: str = "text"  # the JSONL field / parquet, Arrow or datasets column holding the document text
    subset: str | None = None  # hub dataset: its configuration (load_dataset's `name`), e.g. "sample-10BT"
    split: str = "train"  # hub dataset or saved DatasetDict: the split to read
    streaming: bool = False  # hub dataset: stream it (nothing downloaded up front; memory stays flat either way)
    revision: str | None = None  # hub dataset: a branch, tag or commit to pin (part of the cache key)
    tokenizer: str | None = None  # directory with tokenizer.json to reuse; None = train a BPE tokenizer on the corpus
    vocab_size: int | None = None  # size of a newly trained tokenizer; None = model.vocab_size
    train_sample_bytes: int = 100_000_000  # a newly trained tokenizer sees at most this much text (the first bytes)
    seq_len: int = 128  # tokens per training window (must be <= model.max_seq_len)
    sampling: Literal["random", "sequential"] = "random"  # random windows, or consecutive ones (epoch-like passes)
    val_fraction: float = 0.05  # share of the token stream held out for evaluation (chunks spread evenly)
    cache_dir: str = ".cache/data"  # packed token arrays, keyed by the source's fingerprint + tokenizer + split
    # Tokenize into cache_dir and exit: prepare a large corpus in one process before `torchrun` (whose other ranks
    # would otherwise wait at a barrier, with its timeout, for the whole preparation).
    prepare_only: bool = False
    # No num_workers here: training windows are slices of a memory-mapped token array, read in the training process
    # (microseconds per batch), so there is no DataLoader and nothing a debugger could miss in a worker process.

    def __post_init__(self) -> None:
        require(self.seq_len >= 2, "data.seq_len", self.seq_len, ">= 2")
        require(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "in (0, 1)")
        require(self.train_sample_bytes > 0, "data.train_sample_bytes", self.train_sample_bytes, "> 0")


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
