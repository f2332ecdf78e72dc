"""A small ResNet written out (He et al., 2015, "Deep Residual Learning"), for digit images of 8x8 to 28x28.

    stem:    3x3 conv -> batch norm -> ReLU                  (stride 1, no max-pool: an 8x8 digit has no pixel to spare)
    stages:  [BasicBlock] x blocks[i] at widths[i]          (the first block of every stage but the first halves H, W)
    head:    global average pool -> dropout -> linear       (any input size works: the pool removes H, W)

A BasicBlock computes ``relu(F(x) + shortcut(x))`` with ``F`` = conv-BN-ReLU-conv-BN: the block learns a correction
to its input, and the gradient reaches earlier layers through the ``+ shortcut(x)`` term even when ``F`` has tiny
gradients; that is what lets deep stacks train. The shortcut is the identity, or a 1x1 conv + BN where the block
changes the width or the resolution.

The model normalises its own input (``pixel_mean`` / ``pixel_std`` buffers, set from the training images), so data
stays in [0, 1], augmentation pads with true background (0), and a checkpoint carries its normalisation.
``forward(pixel_values, labels=None)`` returns ``ClassifierOutput(logits, loss)`` like transformers' image
classifiers, so ``train_step``'s ``model(**batch).loss`` works unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config.vision import ResNetConfig
from .transformer import ClassifierOutput


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm, plus the skip connection (ResNet-18/34's block)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        # No conv bias: the batch norm right after it has its own shift.
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:  # match the residual's shape: 1x1 conv (projection shortcut)
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        residual = F.relu(self.bn1(self.conv1(x)))
        residual = self.bn2(self.conv2(residual))
        return F.relu(residual + self.shortcut(x))  # the skip connection


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig, num_classes: int, in_channels: int = 1):
        super().__init__()
        self.config, self.num_classes = cfg, num_classes
        width = cfg.widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages = []
        for i, (out_ch, n_blocks) in enumerate(zip(cfg.widths, cfg.blocks, strict=True)):
            blocks = [
                BasicBlock(width if j == 0 else out_ch, out_ch, 2 if (i > 0 and j == 0) else 1) for j in range(n_blocks)
            ]
            stages.append(nn.Sequential(*blocks))
            width = out_ch
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(width, num_classes)
        # Identity normalisation until the data sets it (set_normalization); saved with the weights.
        self.register_buffer("pixel_mean", torch.zeros(in_channels))
        self.register_buffer("pixel_std", torch.ones(in_channels))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if self.config.zero_init_residual:
            # Each block starts as the identity (its last BN scales the residual by 0): the "Bag of Tricks" /
            # Goyal et al. trick that makes the first steps stable at higher learning rates.
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def set_normalization(self, mean: Tensor, std: Tensor) -> None:
        """Per-channel mean / std of the training images (data/images.py::channel_stats computes them)."""
        self.pixel_mean.copy_(mean)
        self.pixel_std.copy_(std.clamp_min(1e-6))

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> ClassifierOutput:
        x = (pixel_values - self.pixel_mean[:, None, None]) / self.pixel_std[:, None, None]  # [B, C, H, W]
        x = self.stages(self.stem(x))  # [B, widths[-1], H / 2^(stages-1), W / 2^(stages-1)]
        x = x.mean(dim=(2, 3))  # global average pool (a plain mean: deterministic on every device)
        logits = self.fc(self.dropout(x))  # [B, num_classes]
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ClassifierOutput(logits=logits, loss=loss)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_example(self, height: int, width: int) -> float:
        """Training FLOPs of one image (forward + backward = 3 x the forward's 2 x multiply-adds of the convs and
        the output layer; norms and activations are noise next to them), for fit()'s MFU."""
        macs = 0

        def count(module: nn.Module, _inputs, output: Tensor) -> None:
            nonlocal macs
            if isinstance(module, nn.Conv2d):  # each output value: in_channels / groups x kernel area
                k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
                macs += output[0].numel() * k
            elif isinstance(module, nn.Linear):
                macs += module.in_features * module.out_features

        hooks = [m.register_forward_hook(count) for m in self.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        try:
            with torch.no_grad():
                was_training = self.training
                self.eval()(torch.zeros(1, len(self.pixel_mean), height, width, device=self.pixel_mean.device))
                self.train(was_training)
        finally:
            for hook in hooks:
                hook.remove()
        return 3.0 * 2.0 * macs
