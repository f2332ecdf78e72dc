"""Fine-tuning a pretrained ResNet backbone (transformers' ``ResNetForImageClassification``) on small digit images.

Input adaptation, done inside the model so that training, evaluation and a saved checkpoint all agree:

- grayscale -> 3 channels: the one channel is repeated (the backbone's first conv expects RGB);
- small digits -> ``input_size``: bilinear upsampling of the whole image (8x8 or 28x28 -> 64x64 by default; a
  ResNet halves the resolution 5 times, so a 224-pixel ImageNet model still sees a 2x2 map at 64 pixels);
- ImageNet mean / std normalisation, which is what the microsoft/resnet-* checkpoints were trained with.

The classification head is replaced by one with ``num_labels`` outputs (``ignore_mismatched_sizes``). ``tune``
chooses what trains: every weight, LoRA adapters on every convolution plus the head (peft supports Conv2d), or the
head only. torchvision's ResNets are not supported: they cannot be installed next to every torch build this project
targets, so their loader could not be tested here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, LoraSettings
from .transformer import ClassifierOutput

ALIASES = {f"resnet{n}": f"microsoft/resnet-{n}" for n in (18, 26, 34, 50, 101, 152)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD = "classifier"  # ResNetForImageClassification's head: Sequential(Flatten, Linear)


class PretrainedImageClassifier(nn.Module):
    """Adapts [B, 1 or 3, H, W] images in [0, 1] to the backbone and computes the loss; ``self.model`` is the
    transformers model (peft-wrapped under LoRA)."""

    def __init__(self, model: nn.Module, input_size: int, frozen_norm: bool = False):
        super().__init__()
        self.model, self.input_size, self.frozen_norm = model, input_size, frozen_norm
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> PretrainedImageClassifier:
        """With a frozen backbone (``tune`` lora / head) its batch norms stay in eval mode: they keep the pretrained
        statistics instead of drifting on small batches, and a checkpoint (trainable weights only) stays exact."""
        super().train(mode)
        if self.frozen_norm:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def adapt(self, pixel_values: Tensor) -> Tensor:
        x = pixel_values.expand(-1, 3, -1, -1) if pixel_values.shape[1] == 1 else pixel_values
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return (x - self.pixel_mean) / self.pixel_std

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> ClassifierOutput:
        logits = self.model(pixel_values=self.adapt(pixel_values)).logits  # [B, num_labels]
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ClassifierOutput(logits=logits, loss=loss)


def load_backbone(name: str, labels: list[str]) -> nn.Module:
    """``ResNetForImageClassification`` with a fresh ``len(labels)``-way head, from a directory or a hub id
    (``resnet18`` = ``microsoft/resnet-18``). Offline, a hub id that is not cached fails with one line saying what
    to download."""
    from transformers import ResNetForImageClassification

    from ..lora import resolve_model_path

    hub_id = ALIASES.get(name, name)
    path = resolve_model_path(hub_id)
    try:
        return ResNetForImageClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            ignore_mismatched_sizes=True,  # the ImageNet head (1000 classes) is replaced
        )
    except (OSError, ValueError) as err:
        first = " ".join(str(err).split())[:200]
        if Path(path).is_dir():
            raise ConfigError(f"could not load {path} as a transformers ResNet: {first}") from err
        raise ConfigError(
            f"could not load {hub_id!r} (no network and not in the Hugging Face cache?): on a machine with a network "
            f"run `hf download {hub_id} --local-dir {hub_id.split('/')[-1]}` and pass --base_model that directory"
        ) from err


def prepare_tuning(model: nn.Module, tune: Literal["full", "lora", "head"], lora: LoraSettings) -> nn.Module:
    """Freeze / wrap ``model`` for ``tune``: all weights train, LoRA on the convolutions + head, or the head only."""
    if tune == "full":
        return model
    if tune == "head":
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith(HEAD + ".")
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules or ["convolution"],  # every Conv2d of the transformers ResNet
        modules_to_save=[HEAD],  # the new head trains in full
        bias="none",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(f"lora.target_modules {lora.target_modules}: {' '.join(str(err).split())[:200]}") from err
