"""``python -m <package>.vision``: its config and the sections only it has (the ResNet, the images, augmentation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base import LoraSettings, OptimConfig, RunConfig, TrainConfig, require


@dataclass
class ResNetConfig:
    """The from-scratch ResNet (model/resnet.py): stages of basic residual blocks; every stage after the first
    halves the resolution (8x8 digits: 8 -> 4 -> 2; MNIST: 28 -> 14 -> 7)."""

    widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # channels of each stage
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1])  # residual blocks per stage
    dropout: float = 0.0  # before the output layer
    zero_init_residual: bool = True  # every block starts as the identity (its last batch-norm scale = 0)

    def __post_init__(self) -> None:
        require(len(self.widths) >= 1, "model.widths", self.widths, "at least one stage")
        require(len(self.blocks) == len(self.widths), "model.blocks", self.blocks, "one count per model.widths")
        require(all(w >= 1 for w in self.widths), "model.widths", self.widths, "positive widths")
        require(all(b >= 1 for b in self.blocks), "model.blocks", self.blocks, "counts >= 1")
        require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "in [0, 1)")


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
        require(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "in (0, 1)")
        require(0.0 < self.test_fraction < 1.0, "data.test_fraction", self.test_fraction, "in (0, 1)")
        require(
            self.val_fraction + self.test_fraction < 1.0,
            "data.test_fraction",
            self.test_fraction,
            "val_fraction + test_fraction < 1",
        )
        require(self.image_size is None or self.image_size >= 4, "data.image_size", self.image_size, ">= 4")
        require(self.max_examples is None or self.max_examples >= 10, "data.max_examples", self.max_examples, ">= 10")


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
            require(getattr(self, name) >= 0, f"augment.{name}", getattr(self, name), ">= 0")
        require(self.scale < 1.0, "augment.scale", self.scale, "< 1")
        require(self.elastic_grid >= 2, "augment.elastic_grid", self.elastic_grid, ">= 2")


@dataclass
class VisionOptim(OptimConfig):
    """A small ResNet from scratch on small images trains well at a high peak rate."""

    lr: float = 3e-3
    warmup_steps: int = 50


@dataclass
class VisionTrain(TrainConfig):
    """Larger batches of small images, evaluated on more batches."""

    batch_size: int = 64
    eval_every: int = 200
    eval_batches: int = 50
    keep_checkpoints: int = 2


@dataclass
class VisionConfig(RunConfig):
    """``python -m <package>.vision``: image classification, a ResNet from scratch or a pretrained backbone."""

    debug_section = "vision"
    name: str = "vision"
    # None = the ResNet of `model`, trained from scratch; else a transformers ResNet to fine-tune: a directory saved
    # with save_pretrained, a hub id (microsoft/resnet-18), or resnet18 / resnet50 (aliases of microsoft/resnet-*)
    base_model: str | None = None
    base_input_size: int = 64  # a pretrained backbone sees images resized to this size, repeated to 3 channels
    tune: Literal["full", "lora", "head"] = "full"  # base_model: train every weight, LoRA adapters + head, or the head
    model: ResNetConfig = field(default_factory=ResNetConfig)
    data: VisionDataConfig = field(default_factory=VisionDataConfig)
    augment: ImageAugmentConfig = field(default_factory=ImageAugmentConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)  # tune: lora (target_modules None = every conv)
    optim: VisionOptim = field(default_factory=VisionOptim)
    train: VisionTrain = field(default_factory=VisionTrain)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.base_input_size >= 32, "base_input_size", self.base_input_size, ">= 32")
        require(not self.lora.qlora, "lora.qlora", self.lora.qlora, "false (QLoRA is for language models)")
        require(self.base_model is not None or self.tune == "full", "tune", self.tune, "full without base_model")
