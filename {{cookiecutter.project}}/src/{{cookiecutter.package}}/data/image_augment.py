"""On-the-fly geometric augmentation of training image batches, one vectorised resampling per batch.

Each image gets its own random affine map (shift, rotation, zoom, shear) and optionally a smooth random displacement
field (elastic distortion, Simard et al. 2003, the classic for handwritten digits). All of them are folded into one
sampling grid, so the image is interpolated once: ``F.affine_grid`` turns the [B, 2, 3] matrices into a grid of
source coordinates, the elastic field is added to it, and ``F.grid_sample`` reads the pixels (bilinear, zeros
outside, which is the digits' background: the data is in [0, 1], normalised later by the model).

:func:`make_augment` returns the ``augment(batch, generator)`` hook that ``ExampleBatches`` applies to training
batches only, with a generator seeded from (seed, epoch, position), so a run and its resume see the same images.
Evaluation never goes through it. Labels pass through untouched: these transforms keep a digit's class (no flips:
a mirrored 2 is no longer a 2; rotations stay small: a 6 turned over is a 9).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config.vision import ImageAugmentConfig
from .batches import Augment


def _uniform(n: int, bound: float, generator: torch.Generator) -> Tensor:
    """n draws from U(-bound, bound)."""
    return (torch.rand(n, generator=generator) * 2 - 1) * bound


def random_affine(n: int, cfg: ImageAugmentConfig, generator: torch.Generator) -> Tensor:
    """[n, 2, 3] matrices mapping output to input coordinates in affine_grid's [-1, 1] square.

    The draws happen whether or not a knob is on (a 0 bound gives 0), so switching one knob off does not change
    the random numbers the others get.
    """
    angle = torch.deg2rad(_uniform(n, cfg.rotate, generator))
    shear = torch.deg2rad(_uniform(n, cfg.shear, generator))
    zoom = 1.0 + _uniform(n, cfg.scale, generator)
    shift = _uniform(2 * n, 2.0 * cfg.shift, generator).view(n, 2)  # the [-1, 1] square is 2 units wide
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Rotation @ shear, divided by the zoom: sampling a smaller input region enlarges the digit.
    a = torch.stack([cos, -sin + cos * torch.tan(shear)], dim=-1)
    b = torch.stack([sin, cos + sin * torch.tan(shear)], dim=-1)
    linear = torch.stack([a, b], dim=1) / zoom[:, None, None]  # [n, 2, 2]
    return torch.cat([linear, shift[:, :, None]], dim=2)


def elastic_field(n: int, size: tuple[int, int], cfg: ImageAugmentConfig, generator: torch.Generator) -> Tensor:
    """[n, H, W, 2] smooth random displacements (grid units), up to about ``cfg.elastic`` of the image size.

    Random offsets on a coarse ``elastic_grid`` x ``elastic_grid`` lattice, upsampled bicubically: smooth by
    construction, with no Gaussian filter to tune.
    """
    g = cfg.elastic_grid
    coarse = (torch.rand(n, 2, g, g, generator=generator) * 2 - 1) * (2.0 * cfg.elastic)
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def augment_images(images: Tensor, cfg: ImageAugmentConfig, generator: torch.Generator) -> Tensor:
    """[B, C, H, W] -> the same shape, each image jittered independently (all bounds 0 = the identity)."""
    n, _, h, w = images.shape
    grid = F.affine_grid(random_affine(n, cfg, generator), list(images.shape), align_corners=False)
    if cfg.elastic > 0:
        grid = grid + elastic_field(n, (h, w), cfg, generator)
    out = F.grid_sample(
        images.float(), grid.to(images.device), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out.to(images.dtype)


def is_active(cfg: ImageAugmentConfig) -> bool:
    return cfg.enabled and any(getattr(cfg, k) > 0 for k in ("shift", "rotate", "scale", "shear", "elastic"))


def make_augment(cfg: ImageAugmentConfig) -> Augment | None:
    """The ``augment`` hook for ExampleBatches, or None when augmentation is off."""
    if not is_active(cfg):
        return None

    def augment(batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        return {**batch, "pixel_values": augment_images(batch["pixel_values"], cfg, generator)}

    return augment


def describe(cfg: ImageAugmentConfig) -> str:
    """One line for the log: which transforms are on."""
    if not is_active(cfg):
        return "augmentation: off"
    parts = [
        f"shift {cfg.shift:g}" * (cfg.shift > 0),
        f"rotate {cfg.rotate:g} deg" * (cfg.rotate > 0),
        f"scale {cfg.scale:g}" * (cfg.scale > 0),
        f"shear {cfg.shear:g} deg" * (cfg.shear > 0),
        f"elastic {cfg.elastic:g}" * (cfg.elastic > 0),
    ]
    return "augmentation: " + ", ".join(p for p in parts if p) + " (training batches only)"
