"""``python -m <package>.finetune``: its config, its data section, and the training defaults of a LoRA fine-tune."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base import LoraSettings, OptimConfig, RunConfig, SampleConfig, TrainConfig, require


@dataclass
class FinetuneDataConfig:
    """Fine-tuning examples: SFT JSONL (prompt/response or messages) or classification CSV/JSONL (text/label)."""

    path: str | None = None  # None = the embedded demo set of the task
    val_path: str | None = None  # None = hold out `val_fraction` of `path`
    val_fraction: float = 0.1
    max_seq_len: int = 256
    text_key: str = "text"
    label_key: str = "label"
    packing: bool = False  # SFT only: concatenate short examples into full windows
    # DataLoader processes that collate training batches ahead of the step (tokenization is done up front, so 0 is
    # usually enough); forced to 0 when a debugger is attached, as breakpoints would not stop in the workers.
    num_workers: int = 0

    def __post_init__(self) -> None:
        require(self.max_seq_len >= 2, "data.max_seq_len", self.max_seq_len, ">= 2")
        require(0.0 <= self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "in [0, 1)")


@dataclass
class FinetuneOptim(OptimConfig):
    """Adapters on a trained model: a lower peak rate than from scratch, a short warmup, no weight decay."""

    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0


@dataclass
class FinetuneTrain(TrainConfig):
    """A fine-tune is short: fewer, smaller steps, evaluated and saved more often."""

    max_steps: int = 150
    batch_size: int = 8
    eval_every: int = 50
    eval_batches: int = 10
    save_every: int = 50
    keep_checkpoints: int = 2


@dataclass
class FinetuneSample(SampleConfig):
    """SFT only: the prompts are rendered with the chat / plain template, as in training."""

    prompts: list[str] = field(
        default_factory=lambda: [
            "Who speaks these lines?\n\nIs this a dagger which I see before me,\nThe handle toward my hand?"
        ]
    )
    max_new_tokens: int = 32


@dataclass
class FinetuneConfig(RunConfig):
    """``python -m <package>.finetune``: LoRA fine-tuning of a local or hub model, SFT or classification."""

    debug_section = "finetune"
    shardable = True
    name: str | None = None  # run name; None = finetune-<task>
    task: Literal["sft", "classify"] = "sft"
    # a transformers model directory or hub id; None = what `pretrain` exported (its --debug run's under --debug)
    base_model: str | None = None
    trust_remote_code: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    train: FinetuneTrain = field(default_factory=FinetuneTrain)
    sample: FinetuneSample = field(default_factory=FinetuneSample)
    class_weights: bool = False  # classify: weight the loss by inverse class frequency (for unbalanced labels)
    merge: bool = False  # also write run_dir/hf: the base model with the adapter merged in (a standalone model)

    def __post_init__(self) -> None:
        if self.name is None:
            self.name = f"finetune-{self.task}"
        super().__post_init__()
