"""An image classifier of the vision project: the from-scratch ResNet (``model.safetensors``, its input normalisation
included) or a fine-tuned transformers ResNet (``hf/``, LoRA merged in, behind the input adaptation of
model/pretrained_resnet.py), and ``input_shape.json``: the [C, H, W] the model was trained on.

A new image is read as a class folder's images are (data/images.py ``read_image``: grey or RGB as ``data.color``,
resized to ``data.image_size`` when that is set), then resized to the trained shape when it still differs (an 8x8
digits model shown a 28x28 drawing).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import ConfigError, load_config
from ..config.vision import VisionConfig
from ..data import images
from ..data.classify import LabelMap
from ..train.checkpoint import MODEL_FILE  # a from-scratch model's final weights: a checkpoint's file name
from ..train.state import save_model_weights
from . import Classifier, load_weights

MERGED_DIR = "hf"
INPUT_FILE = "input_shape.json"


def save_model(model: nn.Module, run_dir: Path, input_shape: tuple[int, int, int]) -> Path:
    """The trained weights and the input shape in the run directory: see the module docstring."""
    (run_dir / INPUT_FILE).write_text(json.dumps({"shape": list(input_shape)}) + "\n", encoding="utf-8")
    if hasattr(model, "input_size"):  # PretrainedImageClassifier
        inner = model.model
        merged = inner.merge_and_unload() if hasattr(inner, "peft_config") else inner  # last use: merging mutates
        merged.save_pretrained(str(run_dir / MERGED_DIR))
        return run_dir / MERGED_DIR
    return save_model_weights(model, run_dir / MODEL_FILE, trainable_only=False)


def load_model(run_dir: Path, cfg: VisionConfig, labels: list[str], channels: int) -> nn.Module:
    if cfg.base_model is None:
        from ..model.resnet import ResNet

        return load_weights(ResNet(cfg.model, len(labels), in_channels=channels), run_dir / MODEL_FILE)
    from transformers import ResNetForImageClassification

    from ..model.pretrained_resnet import PretrainedImageClassifier

    if not (run_dir / MERGED_DIR / "config.json").is_file():
        raise ConfigError(f"{run_dir}: no {MERGED_DIR}/: the run did not finish")
    backbone = ResNetForImageClassification.from_pretrained(str(run_dir / MERGED_DIR))
    return PretrainedImageClassifier(backbone, cfg.base_input_size)


def load(run_dir: Path) -> Classifier:
    cfg = load_config(VisionConfig, run_dir / "config.yaml")
    labels = LabelMap.load(run_dir).labels
    if not (run_dir / INPUT_FILE).is_file():
        raise ConfigError(f"{run_dir}: no {INPUT_FILE}: the run did not finish")
    channels, *size = json.loads((run_dir / INPUT_FILE).read_text(encoding="utf-8"))["shape"]

    def read_file(path: Path) -> Tensor:
        image = images.read_image(path, cfg.data.color, cfg.data.image_size)
        return images.resize_images(image[None], tuple(size))[0]

    return Classifier(
        labels=labels,
        model=load_model(run_dir, cfg, labels, channels),
        read_file=read_file,
        collate=lambda batch: {"pixel_values": torch.stack(batch)},
        suffixes=tuple(sorted(images.IMAGE_SUFFIXES)),
    )
