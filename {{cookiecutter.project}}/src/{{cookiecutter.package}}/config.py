"""Typed configuration dataclasses shared by every entry point, and the one parser that fills them.

Every entry point does the same two things::

    cfg, dbg = parse_config(PretrainConfig, argv)   # the four layers below, validated
    save_config(cfg, run_dir / "config.yaml")       # the resolved config travels with the run

Precedence, lowest to highest, whatever the order of the arguments:

1. the dataclass defaults below;
2. ``--config FILE`` (YAML; several files apply in the order given);
3. the ``--debug`` profile: the entry point's section of ``profiles/debug.yaml`` (tiny, fast, deterministic);
4. explicit command-line flags (``--debug --train.max_steps 30`` trains 30 steps).

``--debug`` also appends ``-debug`` to the run name after all four layers, so that a debug run never writes into a
real run's directory, whatever ``--name`` says. :func:`parse_config` is the only place that applies these layers.

One home per default: every default lives in its dataclass field below, nowhere else. A YAML file in ``configs/`` is a
recipe holding only what it changes (each of its keys changes the parsed config; tests/test_config.py enforces it):
the recipes tune the shipped demo, e.g. its small model trains well with a higher learning rate than the defaults,
which suit your own models. "Work it out from the rest" is ``None``, resolved by a named function where it is used
(``finetune.resolve_base_model``, ``generate.resolve_model``), never a sentinel string.

The schema *is* the dataclasses below: nested fields become dotted options (``--train.max_steps 20``), ``--help``
lists every option with its type and default, and a YAML file written by :func:`save_config` can be passed back with
``--config``. The debug flags (:class:`DebugConfig`) are top-level on every entry point (``--debug``, ``--debugpy``,
...). Parsing is done by jsonargparse; this module only adds the layering and the one-line error report (exit code 2,
no traceback).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

import yaml

# --------------------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4  # GQA; == n_heads -> MHA
    hidden_dim: int | None = None  # SwiGLU inner width; None -> round_up(8/3*dim, multiple_of)
    multiple_of: int = 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 slower
    # sdpa: torch's fused kernels; written_out: softmax(QK^T / sqrt(d)) V line by line (model/attention.py), to step
    # through in a debugger; the same weights and numbers, slower and with T x T scores in memory
    attention: Literal["sdpa", "written_out"] = "sdpa"

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 2, "model.vocab_size", self.vocab_size, ">= 2")
        _require(self.dim >= 1, "model.dim", self.dim, ">= 1")
        _require(self.n_layers >= 1, "model.n_layers", self.n_layers, ">= 1")
        _require(self.n_heads >= 1 and self.dim % self.n_heads == 0, "model.n_heads", self.n_heads, "a divisor of dim")
        _require(
            self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
            "model.n_kv_heads",
            self.n_kv_heads,
            "a divisor of n_heads",
        )
        _require(self.max_seq_len >= 1, "model.max_seq_len", self.max_seq_len, ">= 1")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "in [0, 1)")


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
        _require(self.seq_len >= 2, "data.seq_len", self.seq_len, ">= 2")
        _require(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "in (0, 1)")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay to ``min_lr`` over ``train.max_steps``."""

    lr: float = 3e-4  # peak learning rate, reached after `warmup_steps`
    min_lr: float = 3e-5  # floor of the cosine decay
    warmup_steps: int = 100
    weight_decay: float = 0.1  # applied to matrices (>= 2-D) only: never to norms or biases
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    fused: bool | None = None  # None = fused kernel where torch has one (CUDA, CPU), foreach otherwise; True = must

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives a list
        _require(self.lr > 0, "optim.lr", self.lr, "> 0")
        _require(0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, "in [0, optim.lr]")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")


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
        _require(bool(self.metric), "train.early_stopping.metric", self.metric, "an evaluation key, e.g. loss")
        _require(self.patience >= 1, "train.early_stopping.patience", self.patience, ">= 1")
        _require(self.min_delta >= 0, "train.early_stopping.min_delta", self.min_delta, ">= 0")
        _require(self.warn_after >= 0, "train.early_stopping.warn_after", self.warn_after, ">= 0")


@dataclass
class TrainConfig:
    """The training loop: steps, batch, evaluation, checkpoints, precision and reproducibility."""

    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # micro-batch size per process
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch_size * grad_accum * world size
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping (the norm is still reported)
    log_every: int = 10  # TensorBoard scalars + one log line every N steps (the progress bar updates every step)
    # per-module gradient/weight norms, update/weight ratios and vanishing/exploding warnings every N steps (and at
    # the end); None = every log_every steps, 0 = off. Costs nothing on the other steps; on its steps it holds a copy
    # of the trainable weights for the update ratio (set 0 or a large N for a model near the memory limit).
    grad_stats_every: int | None = None
    eval_every: int = 100  # evaluate (loss, perplexity) and sample every N steps and at the end; 0 = only at the end
    eval_batches: int = 20  # batches per evaluation
    save_every: int = 500  # checkpoint every N steps and at the end; 0 = only at the end
    keep_checkpoints: int = 3  # newest N checkpoints are kept; 0 = keep all
    resume: str | None = None  # None = fresh run; "auto" = latest checkpoint of this run; or a checkpoint directory
    overwrite: bool = False  # a fresh run may replace this run's existing checkpoints (else it refuses to start)
    seed: int = 1337
    device: str = "auto"  # auto = cuda when available, else cpu; or cpu, cuda, cuda:1, mps
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 autocast where the device supports it natively
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs (fp32 runs only)
    # torch.compile the model: auto = on CUDA, unless --debug, --break-on-nonfinite or an attached debugger asks for
    # eager (see runtime.compile_decision); the first steps are reported as "compiling"
    compile: bool | Literal["auto"] = "auto"
    deterministic: bool = False  # torch.use_deterministic_algorithms + fixed seeds (slower; for debugging)
    detect_anomaly: bool = False  # autograd anomaly detection: names the op that produced a NaN (very slow)
    peak_tflops: float | None = None  # device peak for MFU; None = look up the GPU / measure once
    # where metrics go besides metrics.jsonl: TensorBoard (run_dir/tb), Weights & Biases (pip install -e ".[wandb]";
    # WANDB_MODE=offline needs no account), both, or none
    logger: Literal["tensorboard", "wandb", "both", "none"] = "tensorboard"
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "eval_batches"):
            _require(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), ">= 1")
        for name in ("eval_every", "save_every", "keep_checkpoints"):
            _require(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), ">= 0")
        every = self.grad_stats_every
        _require(every is None or every >= 0, "train.grad_stats_every", every, "None or >= 0")
        _require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, ">= 0")


@dataclass
class SampleConfig:
    """Text generated from the model at every evaluation (a quick look at what it has learned)."""

    prompts: list[str] = field(default_factory=lambda: ["MACBETH.\n"])  # a speaker heading of the embedded corpus
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = 50


@dataclass
class PretrainConfig:
    """``python -m <package>.pretrain``: train LlamaLM from scratch into ``out_dir/name``."""

    name: str = "pretrain"  # run name: everything goes to out_dir/name (config, checkpoints, tb, hf export)
    out_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    export_hf: bool = True  # write run_dir/hf (transformers LlamaForCausalLM + tokenizer) at the end

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, "name", self.name, "a non-empty name without '/'")
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}: "
                "lower data.seq_len or raise model.max_seq_len"
            )


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
        _require(self.r >= 1, "lora.r", self.r, ">= 1")


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
        _require(self.max_seq_len >= 2, "data.max_seq_len", self.max_seq_len, ">= 2")
        _require(0.0 <= self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "in [0, 1)")


@dataclass
class FinetuneConfig:
    """``python -m <package>.finetune``: LoRA fine-tuning of a local or hub model, SFT or classification."""

    task: Literal["sft", "classify"] = "sft"
    # a transformers model directory or hub id; None = what `pretrain` exported (its --debug run's under --debug)
    base_model: str | None = None
    trust_remote_code: bool = False
    name: str | None = None  # run name; None = finetune-<task>
    out_dir: str = "runs"
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-4, min_lr=2e-5, warmup_steps=10, weight_decay=0.0)
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            max_steps=150, batch_size=8, eval_every=50, eval_batches=10, save_every=50, keep_checkpoints=2
        )
    )
    sample: SampleConfig = field(
        default_factory=lambda: SampleConfig(
            prompts=["Who speaks these lines?\n\nIs this a dagger which I see before me,\nThe handle toward my hand?"],
            max_new_tokens=32,
        )
    )  # SFT only: prompts are formatted with the chat / plain template, as in training
    class_weights: bool = False  # classify: weight the loss by inverse class frequency (for unbalanced labels)
    merge: bool = False  # also write run_dir/hf: the base model with the adapter merged in (a standalone model)

    def __post_init__(self) -> None:
        if self.name is None:
            self.name = f"finetune-{self.task}"
        _require(bool(self.name) and "/" not in self.name, "name", self.name, "a non-empty name without '/'")


{% if cookiecutter.extra_projects in ["vision", "both"] %}@dataclass
class ResNetConfig:
    """The from-scratch ResNet (model/resnet.py): stages of basic residual blocks; every stage after the first
    halves the resolution (8x8 digits: 8 -> 4 -> 2; MNIST: 28 -> 14 -> 7)."""

    widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # channels of each stage
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1])  # residual blocks per stage
    dropout: float = 0.0  # before the output layer
    zero_init_residual: bool = True  # every block starts as the identity (its last batch-norm scale = 0)

    def __post_init__(self) -> None:
        _require(len(self.widths) >= 1, "model.widths", self.widths, "at least one stage")
        _require(len(self.blocks) == len(self.widths), "model.blocks", self.blocks, "one count per model.widths")
        _require(all(w >= 1 for w in self.widths), "model.widths", self.widths, "positive widths")
        _require(all(b >= 1 for b in self.blocks), "model.blocks", self.blocks, "counts >= 1")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "in [0, 1)")


@dataclass
class VisionDataConfig:
    """Labelled images: scikit-learn's 8x8 digits (offline), MNIST IDX files, or a folder per class."""

    # None = scikit-learn's load_digits (1,797 8x8 digits); a directory with MNIST IDX files
    # (train-images-idx3-ubyte[.gz], ...); or a directory with one sub-folder of images per class (PNG, JPEG, ...)
    path: str | None = None
    image_size: int | None = None  # load images at this square size (bilinear); None = as stored (must all agree)
    color: bool = False  # image folders: keep RGB (3 channels); False = grayscale, like the digits
    val_fraction: float = 0.15  # stratified, seeded by train.seed
    test_fraction: float = 0.15  # MNIST's own t10k files are the test set when present
    max_examples: int | None = None  # a stratified subset of the training pool (MNIST's 60,000 on a laptop CPU)
    dedupe: bool = True  # drop exact duplicate images before splitting (a copy in train and test inflates the score)
    num_workers: int = 0  # batches are slices of tensors in memory: workers rarely pay off here

    def __post_init__(self) -> None:
        _require(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "in (0, 1)")
        _require(0.0 < self.test_fraction < 1.0, "data.test_fraction", self.test_fraction, "in (0, 1)")
        _require(
            self.val_fraction + self.test_fraction < 1.0,
            "data.test_fraction",
            self.test_fraction,
            "val_fraction + test_fraction < 1",
        )
        _require(self.image_size is None or self.image_size >= 4, "data.image_size", self.image_size, ">= 4")
        _require(self.max_examples is None or self.max_examples >= 10, "data.max_examples", self.max_examples, ">= 10")


@dataclass
class ImageAugmentConfig:
    """Random geometric jitter of training batches (data/image_augment.py); validation and test images never.
    Each knob is a flag: 0 turns it off; ``enabled: false`` turns them all off."""

    enabled: bool = True
    shift: float = 0.1  # random translation, up to this fraction of the image size in x and y
    rotate: float = 10.0  # random rotation, up to this many degrees either way
    scale: float = 0.1  # random zoom in or out by up to this fraction (zooming in = a random crop, resized)
    shear: float = 0.0  # random shear, up to this many degrees
    elastic: float = 0.0  # elastic distortion: displacement up to about this fraction of the image size
    elastic_grid: int = 3  # elastic: control points per side of the random displacement field (smooth = few)

    def __post_init__(self) -> None:
        for name in ("shift", "rotate", "scale", "shear", "elastic"):
            _require(getattr(self, name) >= 0, f"augment.{name}", getattr(self, name), ">= 0")
        _require(self.scale < 1.0, "augment.scale", self.scale, "< 1")
        _require(self.elastic_grid >= 2, "augment.elastic_grid", self.elastic_grid, ">= 2")


@dataclass
class VisionConfig:
    """``python -m <package>.vision``: image classification, a ResNet from scratch or a pretrained backbone."""

    name: str = "vision"
    out_dir: str = "runs"
    # None = the ResNet of `model`, trained from scratch; else a transformers ResNet to fine-tune: a directory saved
    # with save_pretrained, a hub id (microsoft/resnet-18), or resnet18 / resnet50 (aliases of microsoft/resnet-*)
    base_model: str | None = None
    base_input_size: int = 64  # a pretrained backbone sees images resized to this size, repeated to 3 channels
    tune: Literal["full", "lora", "head"] = "full"  # base_model: train every weight, LoRA adapters + head, or the head
    model: ResNetConfig = field(default_factory=ResNetConfig)
    data: VisionDataConfig = field(default_factory=VisionDataConfig)
    augment: ImageAugmentConfig = field(default_factory=ImageAugmentConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)  # tune: lora (target_modules None = every conv)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, min_lr=3e-5, warmup_steps=50))
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            max_steps=1000, batch_size=64, eval_every=200, eval_batches=50, save_every=500, keep_checkpoints=2
        )
    )

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, "name", self.name, "a non-empty name without '/'")
        _require(self.base_input_size >= 32, "base_input_size", self.base_input_size, ">= 32")
        _require(not self.lora.qlora, "lora.qlora", self.lora.qlora, "false (QLoRA is for language models)")
        _require(self.base_model is not None or self.tune == "full", "tune", self.tune, "full without base_model")


{% endif %}@dataclass
class GenerateConfig:
    """``python -m <package>.generate``: sample text from a trained model."""

    # a transformers causal LM directory or hub id, or a run directory holding hf/; None = what `pretrain` exported
    # (its --debug run's under --debug)
    model: str | None = None
    adapter: str | None = None  # optional LoRA adapter directory (finetune's run_dir/adapter) applied on `model`
    chat: bool | None = None  # format the prompt as in SFT (chat template / plain template); None = when an adapter
    # trained by SFT is given
    prompt: str = "MACBETH.\n"
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    seed: int = 1337
    device: str = "auto"
    trust_remote_code: bool = False


{% if cookiecutter.extra_projects in ["speech", "both"] %}# The ten commands of the builtin set (and the usual 10-word task of Speech Commands v2).
SPEECH_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


@dataclass
class SpeechDataConfig:
    """Spoken commands: the builtin espeak-ng set, or Google Speech Commands v2 at ``path``."""

    path: str | None = None  # a Speech Commands v2 directory (<word>/*.wav, *_list.txt); None = the builtin set
    words: list[str] = field(default_factory=lambda: list(SPEECH_WORDS))  # the labels, in this order
    sample_rate: int = 8000  # Hz; files at a higher rate are resampled, lower ones refused (the builtin set is 8 kHz)
    clip_seconds: float = 1.0  # every clip is padded (centred) to this length
    num_workers: int = 0  # DataLoader processes collating training batches; forced to 0 under a debugger

    def __post_init__(self) -> None:
        _require(self.sample_rate >= 1000, "data.sample_rate", self.sample_rate, ">= 1000")
        _require(self.clip_seconds > 0, "data.clip_seconds", self.clip_seconds, "> 0")
        _require(len(self.words) >= 2, "data.words", self.words, "at least two words")

    @property
    def clip_samples(self) -> int:
        return round(self.sample_rate * self.clip_seconds)


@dataclass
class AudioFeatureConfig:
    """Log-mel front end (data/audio_features.py): STFT frames every ``hop_ms``, ``n_mels`` HTK mel bands."""

    n_mels: int = 40
    window_ms: float = 32.0  # STFT window; n_fft = the nearest power of two in samples
    hop_ms: float = 10.0
    f_min: float = 20.0
    f_max: float | None = None  # None = Nyquist (sample_rate / 2)

    def __post_init__(self) -> None:
        _require(self.n_mels >= 4, "features.n_mels", self.n_mels, ">= 4")
        _require(self.hop_ms > 0 and self.window_ms >= self.hop_ms, "features.hop_ms", self.hop_ms, "in (0, window]")


@dataclass
class ConformerConfig:
    """The Conformer classifier (model/conformer.py)."""

    dim: int = 144
    n_layers: int = 4
    n_heads: int = 4
    ff_mult: int = 4  # feed-forward inner width = ff_mult * dim
    conv_kernel: int = 15  # depthwise convolution over time, in subsampled frames (40 ms each)
    subsample_channels: int = 64  # channels of the two stride-2 Conv2d layers of the front end
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _require(self.dim >= 8 and self.dim % self.n_heads == 0, "model.dim", self.dim, "a multiple of n_heads, >= 8")
        _require((self.dim // self.n_heads) % 2 == 0, "model.n_heads", self.n_heads, "giving an even head size")
        _require(self.n_layers >= 1, "model.n_layers", self.n_layers, ">= 1")
        _require(self.conv_kernel % 2 == 1, "model.conv_kernel", self.conv_kernel, "odd")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "in [0, 1)")


@dataclass
class SpeechAugmentConfig:
    """Training-time augmentation (data/audio_augment.py), each part its own switch; never on validation/test."""

    enabled: bool = True  # false = no augmentation at all (the on/off comparison)
    shift_ms: float = 100.0  # random time shift up to +-shift_ms (zero filled); 0 = off
    noise_prob: float = 0.8  # share of clips mixed with background noise; 0 = off
    snr_db: tuple[float, float] = (5.0, 25.0)  # signal-to-noise ratio drawn uniformly in this range
    speed: tuple[float, float] = (0.9, 1.1)  # resampling factor (tempo and pitch together); (1, 1) = off
    time_masks: int = 2  # SpecAugment: masks over time per clip; 0 = off
    time_mask_frames: int = 10  # longest time mask, in feature frames
    freq_masks: int = 2  # SpecAugment: masks over mel bands per clip; 0 = off
    freq_mask_bins: int = 6  # widest frequency mask, in mel bands

    def __post_init__(self) -> None:
        self.snr_db, self.speed = tuple(self.snr_db), tuple(self.speed)  # YAML gives lists
        _require(0.0 <= self.noise_prob <= 1.0, "augment.noise_prob", self.noise_prob, "in [0, 1]")
        _require(0 < self.speed[0] <= self.speed[1], "augment.speed", self.speed, "0 < low <= high")
        _require(self.snr_db[0] <= self.snr_db[1], "augment.snr_db", self.snr_db, "low <= high")
        _require(self.shift_ms >= 0, "augment.shift_ms", self.shift_ms, ">= 0")


@dataclass
class SpeechConfig:
    """``python -m <package>.speech``: train a Conformer to recognise spoken commands from log-mel features."""

    name: str = "speech"
    out_dir: str = "runs"
    data: SpeechDataConfig = field(default_factory=SpeechDataConfig)
    features: AudioFeatureConfig = field(default_factory=AudioFeatureConfig)
    model: ConformerConfig = field(default_factory=ConformerConfig)
    augment: SpeechAugmentConfig = field(default_factory=SpeechAugmentConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=50, weight_decay=0.01)
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            max_steps=3000, batch_size=32, eval_every=500, eval_batches=10, save_every=500, keep_checkpoints=2
        )
    )

    # also score the test voices mixed with coloured noise at this SNR (dB), the same noise every run: what the noise
    # augmentation buys; None = off
    noisy_test_snr_db: float | None = 10.0

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, "name", self.name, "a non-empty name without '/'")


{% endif %}@dataclass
class DebugConfig:
    """Flags shared by every entry point, top-level on the command line (``--debug``, ``--debugpy 5678``, ...)."""

    debug: bool = False  # apply the debug profile (profiles/debug.yaml) and name the run <name>-debug
    debugpy: str | None = None  # [HOST:]PORT, default host 127.0.0.1, port 0 = free port
    wait_for_client: bool = False
    debugpy_all_ranks: bool = True  # under torchrun: each rank listens on PORT + RANK; False = rank 0 only
    pycharm_debug: str | None = None  # HOST:PORT of PyCharm's Python Debug Server (pydevd-pycharm)
    break_on_nonfinite: bool = False


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


# --------------------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------------------

C = TypeVar("C")

# Help text for the top-level debug flags; behaviour lives in debug.py.
_DEBUG_HELP = {
    "debug": "apply the debug profile over --config (tiny model, few steps, num_workers=0, deterministic, no compile, "
    "fp32, anomaly detection, eval every step; explicit flags still win) and name the run <name>-debug",
    "debugpy": "start a debugpy server on [HOST:]PORT (default host 127.0.0.1; port 0 = a free port, printed). "
    "Editor port forwarding reaches 127.0.0.1 in a dev container; 0.0.0.0 lets anyone who reaches the port run "
    "code: use it only in a container whose port is published on the host's 127.0.0.1 (docker run -p)",
    "wait_for_client": "with --debugpy: block until the IDE attaches",
    "debugpy_all_ranks": "under torchrun every rank listens on PORT + RANK (--no-debugpy-all-ranks: rank 0 only)",
    "pycharm_debug": "connect to PyCharm's Python Debug Server at HOST:PORT (pip install pydevd-pycharm)",
    "break_on_nonfinite": "stop at the first NaN/Inf activation, loss or gradient (module name, step, stats)",
}


class ConfigError(ValueError):
    """Bad user input found after parsing (e.g. a data path that does not exist); entry points exit with code 2."""


def build_parser(cls: type, *, prog: str | None = None):
    """The jsonargparse parser for ``cls`` plus ``--config`` and the top-level debug flags (exposed for tests)."""
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    parser = ArgumentParser(
        prog=prog,
        description=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None,
        exit_on_error=False,  # we report errors ourselves: one line, exit code 2
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_class_arguments(cls, fail_untyped=True, sub_configs=True)
    for f in dataclasses.fields(DebugConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=ActionYesNo(no_prefix="no-"), default=f.default, help=_DEBUG_HELP[f.name])
        else:
            parser.add_argument(flag, type=str | None, default=f.default, help=_DEBUG_HELP[f.name])
    return parser


def parse_config(cls: type[C], argv: list[str] | None = None, *, prog: str | None = None) -> tuple[C, DebugConfig]:
    """Parse the layers of the module docstring into ``cls`` and the top-level :class:`DebugConfig`.

    Any error (unknown key, wrong type, failed validation, missing file) prints one line to stderr and exits with
    code 2; ``--help`` prints every option with its default and exits 0.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(cls, prog=prog)
    files, flags = _split_config_files(argv)
    try:
        ns = parser.parse_args([*files, *flags])
        profile = debug_profile(cls) if ns["debug"] else None
        if profile:  # jsonargparse applies arguments in order: the profile goes between the files and the flags
            ns = parser.parse_args([*files, "--config", json.dumps(profile), *flags])
        debug_names = [f.name for f in dataclasses.fields(DebugConfig)]
        dbg = DebugConfig(**{name: ns[name] for name in debug_names})
        for name in [*debug_names, "config"]:
            del ns[name]
        cfg = parser.instantiate(ns)
        cfg = cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})  # Namespace -> the dataclass itself
        if profile and not cfg.name.endswith("-debug"):
            cfg = dataclasses.replace(cfg, name=f"{cfg.name}-debug")
    except SystemExit:  # --help / --print_config exit through argparse
        raise
    except Exception as exc:  # jsonargparse raises ArgumentError / TypeError; __post_init__ raises ValueError
        fail(_one_line(exc))
    return cfg, dbg


def _split_config_files(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the ``--config FILE`` arguments in their order, every other argument in its order)."""
    files: list[str] = []
    flags: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            files += argv[i : i + 2]
            i += 2
            continue
        (files if argv[i].startswith("--config=") else flags).append(argv[i])
        i += 1
    return files, flags


DEBUG_PROFILE = Path(__file__).with_name("profiles") / "debug.yaml"


def debug_profile(cls: type) -> dict[str, Any] | None:
    """The ``--debug`` overlay for ``cls``: its section of :data:`DEBUG_PROFILE`, named after the class
    (``PretrainConfig`` -> ``pretrain``); None when it has none (``generate``)."""
    sections = yaml.safe_load(DEBUG_PROFILE.read_text(encoding="utf-8"))
    return sections.get(cls.__name__.removesuffix("Config").lower())


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` as one line to stderr and exit (code 2 = bad input)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# --------------------------------------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dicts, lists and scalars (tuples become lists): what YAML, JSON and ``torch.load(weights_only=True)``
    all accept."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML; ``--config path`` reproduces the run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config_to_yaml(cfg), encoding="utf-8")
    tmp.replace(path)
    return path


def load_config(cls: type[C], path: str | Path) -> C:
    """Read a YAML written by :func:`save_config` (or any partial one) back into ``cls`` with the same validation."""
    cfg, _ = parse_config(cls, ["--config", str(path)])
    return cfg
