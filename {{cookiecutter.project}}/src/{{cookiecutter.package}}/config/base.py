"""The dataclasses every program shares (model, optimizer, training loop, sampling, LoRA, debug flags) and the one
error type for bad input.

A program that wants other defaults for a shared section subclasses it and redeclares only the fields it changes
(``config/finetune.py``: ``FinetuneOptim(OptimConfig)`` with a lower ``lr``): each default has one home, visible to
``--help`` and to the tests, never a lambda that builds an ``OptimConfig(lr=...)``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NoReturn

SEED = 1337  # training and generation draw from the same seed unless told otherwise
DEMO_PROMPT = "MACBETH.\n"  # a speaker heading of the embedded corpus: the model goes on with a speech

# A choice the program can make by itself: "auto" decides (and says why), "always" / "never" force it.
Auto = Literal["auto", "always", "never"]


class ConfigError(ValueError):
    """Bad user input found after parsing (e.g. a data path that does not exist); entry points exit with code 2."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` as one line to stderr and exit (code 2 = bad input)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def require(ok: bool, name: str, value: Any, expected: str) -> None:
    """The validation of every ``__post_init__``: a ValueError naming the option, its value and what it takes."""
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


@dataclass
class RunConfig:
    """What every training program has: a run name; everything the run writes goes to ``out_dir/name`` (config,
    checkpoints, tb, exports). ``debug_section`` names the program's section of ``config/profiles/debug.yaml``;
    ``shardable``: the program can train under ``--train.parallel fsdp`` (its exports gather a sharded model)."""

    debug_section: ClassVar[str]
    shardable: ClassVar[bool] = False
    name: str
    out_dir: str = "runs"

    def __post_init__(self) -> None:
        require(bool(self.name) and "/" not in self.name, "name", self.name, "a non-empty name without '/'")
        parallel = getattr(getattr(self, "train", None), "parallel", "ddp")
        require(parallel == "ddp" or self.shardable, "train.parallel", parallel, "ddp for this program's models")


@dataclass
class RopeScaling:
    """Llama 3.1's ``llama3`` RoPE scaling (transformers' rope_type "llama3"): rotations slower than the original
    context divided by ``factor``, fast ones kept, the band between blended (model/attention.py
    ``llama3_inv_freq``)."""

    rope_type: Literal["llama3"] = "llama3"
    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        require(self.factor >= 1, "model.rope_scaling.factor", self.factor, ">= 1")
        require(
            0 < self.low_freq_factor < self.high_freq_factor,
            "model.rope_scaling.low_freq_factor",
            self.low_freq_factor,
            "in (0, high_freq_factor)",
        )


@dataclass
class ModelConfig:
    """LlamaLM (model/lm.py): RMSNorm, rotary positions, grouped-query attention, SwiGLU."""

    # a named shape from model/presets.py (e.g. smollm2-135m, llama-3.2-1b; a wrong name lists them all): applied over
    # these defaults and under everything else (--config files, the --debug profile, flags)
    preset: str | None = None
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4  # GQA; == n_heads -> MHA
    hidden_dim: int | None = None  # SwiGLU inner width; None -> round_up(8/3*dim, multiple_of)
    multiple_of: int = 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # None = plain RoPE
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 slower
    # sdpa: torch's fused kernels; written_out: softmax(QK^T / sqrt(d)) V line by line (model/attention.py), to step
    # through in a debugger; the same weights and numbers, slower and with T x T scores in memory
    attention: Literal["sdpa", "written_out"] = "sdpa"

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # a preset or a Python caller gives a dict
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        require(self.vocab_size >= 2, "model.vocab_size", self.vocab_size, ">= 2")
        require(self.dim >= 1, "model.dim", self.dim, ">= 1")
        require(self.n_layers >= 1, "model.n_layers", self.n_layers, ">= 1")
        require(self.n_heads >= 1 and self.dim % self.n_heads == 0, "model.n_heads", self.n_heads, "a divisor of dim")
        require(
            self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
            "model.n_kv_heads",
            self.n_kv_heads,
            "a divisor of n_heads",
        )
        require(self.max_seq_len >= 1, "model.max_seq_len", self.max_seq_len, ">= 1")
        require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "in [0, 1)")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay to ``min_lr`` over ``train.max_steps``."""

    lr: float = 3e-4  # peak learning rate, reached after `warmup_steps`
    min_lr: float = 3e-5  # floor of the cosine decay
    warmup_steps: int = 100
    weight_decay: float = 0.1  # applied to matrices (>= 2-D) only: never to norms or biases
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    # the fused AdamW kernel: auto = where torch has one for the parameters (CUDA, CPU), else foreach with a notice;
    # always = fused or an error; never = foreach
    fused: Auto = "auto"

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives a list
        require(self.lr > 0, "optim.lr", self.lr, "> 0")
        require(0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, "in [0, optim.lr]")
        require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")


@dataclass
class EarlyStoppingConfig:
    """Early stopping on a validation metric (train/stopping.py). Off by default; when on, every evaluation covers the
    whole validation set (not ``eval_batches``), each new best is checkpointed and named by ``checkpoints/best``, and
    the run ends with the best checkpoint's weights: its final metrics and exports come from them."""

    enabled: bool = False
    metric: str = "loss"  # an evaluation key of the program: loss, perplexity; classifiers also accuracy, macro_f1, ...
    mode: Literal["min", "max"] | None = None  # None = min for loss and perplexity, max for the other metrics
    patience: int = 5  # evaluations without an improvement before the run stops
    min_delta: float = 0.0  # a change smaller than this is no improvement
    # warn (one line) when the metric has not improved for N evaluations while the training loss fell; 0 = never.
    # Works with early stopping off too.
    warn_after: int = 3

    def __post_init__(self) -> None:
        require(bool(self.metric), "train.early_stopping.metric", self.metric, "an evaluation key, e.g. loss")
        require(self.patience >= 1, "train.early_stopping.patience", self.patience, ">= 1")
        require(self.min_delta >= 0, "train.early_stopping.min_delta", self.min_delta, ">= 0")
        require(self.warn_after >= 0, "train.early_stopping.warn_after", self.warn_after, ">= 0")


@dataclass
class TrainConfig:
    """The training loop: steps, batch, evaluation, checkpoints, precision and reproducibility."""

    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # micro-batch size per process
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch_size * grad_accum * world size
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping (the norm is still reported)
    log_every: int = 10  # TensorBoard scalars + one log line every N steps (the progress bar updates every step)
    # per-module gradient/weight norms, update/weight ratios and vanishing/exploding warnings on every log step and at
    # the end. Costs nothing on the other steps and, on its steps, about one more optimizer step's worth of
    # elementwise work (no copy of the weights: the update comes from AdamW's state).
    grad_stats: bool = True
    eval_every: int = 100  # evaluate (loss, perplexity) and sample every N steps and at the end; 0 = only at the end
    eval_batches: int = 20  # batches per evaluation
    save_every: int = 500  # checkpoint every N steps and at the end; 0 = only at the end
    keep_checkpoints: int = 3  # newest N checkpoints are kept; 0 = keep all
    # auto = continue from this run's newest intact checkpoint (a fresh start while it has none); never = a fresh
    # start, which refuses to replace the run's checkpoints unless `overwrite`
    resume: Literal["never", "auto"] = "never"
    # continue from this checkpoint directory, or from the newest intact checkpoint of a run or checkpoints directory
    # (instead of `resume`)
    resume_from: str | None = None
    overwrite: bool = False  # a fresh run may replace this run's existing checkpoints (else it refuses to start)
    seed: int = SEED
    device: str = "auto"  # auto = cuda when available, else cpu; or cpu, cuda, cuda:1, mps
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 autocast where the device supports it natively
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs (fp32 runs only)
    # torch.compile the model: auto = on CUDA, unless --debug, --break-on-nonfinite or an attached debugger asks for
    # eager (see runtime.compile_decision); always / never force it. The first steps are reported as "compiling"
    compile: Auto = "auto"
    # how several ranks share the work (docs/distributed.md): ddp = every rank holds the whole model, gradients and
    # AdamW state; fsdp = FSDP2 shards them over the ranks (pretrain and finetune), with sharded checkpoints
    parallel: Literal["ddp", "fsdp"] = "ddp"
    deterministic: bool = False  # torch.use_deterministic_algorithms + fixed seeds (slower; for debugging)
    detect_anomaly: bool = False  # autograd anomaly detection: names the op that produced a NaN (very slow)
    peak_tflops: float | None = None  # device peak for MFU; None = look up the GPU / measure once
    # where metrics go besides metrics.jsonl: TensorBoard (run_dir/tb), Weights & Biases (pip install -e ".[wandb]";
    # WANDB_MODE=offline needs no account), both, or none
    logger: Literal["tensorboard", "wandb", "both", "none"] = "tensorboard"
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "eval_batches"):
            require(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), ">= 1")
        for name in ("eval_every", "save_every", "keep_checkpoints"):
            require(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), ">= 0")
        require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, ">= 0")
        require(
            self.resume_from is None or self.resume == "never",
            "train.resume_from",
            self.resume_from,
            "unset with train.resume auto (one place to resume from)",
        )


@dataclass
class Sampling:
    """How each next token is drawn: softmax at ``temperature`` (0 = greedy) over the ``top_k`` likeliest tokens
    (None = all of them)."""

    temperature: float = 0.8
    top_k: int | None = 50


@dataclass
class SampleConfig(Sampling):
    """Text generated from the model at every evaluation (a quick look at what it has learned)."""

    prompts: list[str] = field(default_factory=lambda: [DEMO_PROMPT])
    max_new_tokens: int = 64


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft.LoraConfig); QLoRA loads the base model in 4 bit (CUDA + bitsandbytes)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # None = the architecture's usual pair (Llama/LlamaLM: q_proj, v_proj; BERT: query, value); [all-linear] = every
    # linear layer except the output head; or explicit names, e.g. [q_proj, k_proj, v_proj, o_proj].
    target_modules: list[str] | None = None
    qlora: bool = False  # 4-bit NF4 base model (QLoRA): needs CUDA and `pip install -e ".[qlora]"`

    def __post_init__(self) -> None:
        require(self.r >= 1, "lora.r", self.r, ">= 1")


@dataclass
class DebugConfig:
    """Flags shared by every entry point, top-level on the command line (``--debug``, ``--debugpy 5678``, ...)."""

    debug: bool = False  # apply the debug profile (config/profiles/debug.yaml) and name the run <name>-debug
    debugpy: str | None = None  # [HOST:]PORT, default host 127.0.0.1, port 0 = free port
    wait_for_client: bool = False
    debugpy_all_ranks: bool = True  # under torchrun: each rank listens on PORT + RANK; False = rank 0 only
    pycharm_debug: str | None = None  # HOST:PORT of PyCharm's Python Debug Server (pydevd-pycharm)
    break_on_nonfinite: bool = False
