"""Labelled images for the vision project: load, clean, split, batch.

Three sources, chosen by ``data.path`` (:func:`load_images`):

- ``None``: scikit-learn's ``load_digits``: 1,797 real 8x8 handwritten digits (16 grey levels) that ship with
  scikit-learn, so the default run needs no download.
- a directory with MNIST IDX files: ``train-images-idx3-ubyte`` + ``train-labels-idx1-ubyte`` (``.gz`` or not), and
  ``t10k-*`` likewise, which then become the test set (Fashion-MNIST uses the same names and format).
- a directory with one sub-folder per class (``digits/3/img_001.png``): any image PIL reads; the folder name is the
  label.

Every image becomes float32 [C, H, W] in [0, 1]; normalisation (mean / std of the training images) is done by the
model, so augmentation can pad with real background (0). Cleaning: non-finite or out-of-range pixels are an error,
exact duplicate images are dropped with a notice (a copy in both train and test inflates the score). Bad input is
one line (a :class:`ConfigError` naming the file and what is wrong) and nothing is dropped silently.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
# The IDX header's third byte names the element type (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class ImageSet:
    images: Tensor  # [N, C, H, W] float32 in [0, 1]
    labels: Tensor  # [N] int64 class ids into `names`
    names: list[str]  # class id -> label name
    source: str  # where it came from, for messages

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray | Tensor) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], self.names, self.source)


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet


# --------------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------------
def load_sklearn_digits() -> ImageSet:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # 16 grey levels -> [0, 1]
    names = [str(n) for n in digits.target_names]
    return ImageSet(images, torch.from_numpy(digits.target).long(), names, "sklearn load_digits")


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST's format; gzip or plain) as a numpy array of its stored shape and type."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise ConfigError(f"{path}: unreadable ({' '.join(str(err).split())})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ConfigError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ConfigError(f"{path}: truncated IDX header ({ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ConfigError(f"{path}: shape {shape} needs {expected} data bytes, the file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):  # some mirrors write train-images.idx3-ubyte
        if (root / name).is_file():
            return root / name
    return None


def _load_idx_pair(root: Path, prefix: str) -> ImageSet | None:
    images_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    if images_path is None:
        return None
    if labels_path is None:
        raise ConfigError(f"{images_path}: missing labels file {prefix}-labels-idx1-ubyte[.gz] in {root}")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise ConfigError(
            f"{images_path}: expected [N, H, W] images and [N] labels, got {images.shape}, {labels.shape}"
        )
    if len(images) != len(labels):
        raise ConfigError(f"{images_path}: {len(images)} images but {labels_path.name} has {len(labels)} labels")
    pixels = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    scale = 255.0 if images.dtype == np.uint8 else max(float(pixels.max()), 1.0)
    ids = torch.from_numpy(labels.astype(np.int64))
    return ImageSet(pixels / scale, ids, [], str(images_path))


def load_mnist(root: str | Path) -> tuple[ImageSet, ImageSet | None]:
    """(training pool, the t10k test set or None) from a directory of MNIST IDX files."""
    root = Path(root)
    train = _load_idx_pair(root, "train")
    if train is None:
        raise ConfigError(f"{root}: no train-images-idx3-ubyte[.gz]")
    test = _load_idx_pair(root, "t10k")
    ids = torch.cat([train.labels, test.labels]) if test is not None else train.labels
    names = [str(int(i)) for i in torch.unique(ids)]  # MNIST labels are the digits themselves
    remap = {int(n): i for i, n in enumerate(names)}
    for part in (train, test):
        if part is not None:
            part.labels = torch.tensor([remap[int(i)] for i in part.labels], dtype=torch.long)
            part.names = names
    return train, test


def read_image(path: Path, color: bool, size: int | None) -> Tensor:
    """One image file as float32 [C, H, W] in [0, 1]: grey (C = 1) or RGB (``color``), resized to ``size`` x ``size``
    when given: how a class folder is read for training, and a new image for ``predict``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if color else "L")
            if size is not None:
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable image ({' '.join(str(err).split())})") from err
    return torch.from_numpy(array).permute(2, 0, 1) if color else torch.from_numpy(array)[None]


def load_folder(root: str | Path, image_size: int | None = None, color: bool = False) -> ImageSet:
    """One sub-folder per class; every image file in them, sorted (a stray file beside the folders is an error:
    its label would be missing)."""
    root = Path(root)
    strays = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if strays:
        raise ConfigError(f"{root / strays[0]}: missing label (images must be inside one sub-folder per class)")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [
        (f, i) for i, n in enumerate(names) for f in sorted((root / n).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if len(names) < 2 or not files:
        raise ConfigError(f"{root}: expected at least 2 class sub-folders of images, found {names}")
    tensors = [read_image(f, color, image_size) for f, _ in files]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ConfigError(f"{root}: images of different sizes {sorted(shapes)[:3]}: set --data.image_size")
    labels = torch.tensor([i for _, i in files], dtype=torch.long)
    return ImageSet(torch.stack(tensors), labels, names, str(root))


def load_images(
    path: str | None, image_size: int | None = None, color: bool = False
) -> tuple[ImageSet, ImageSet | None]:
    """(labelled pool, a test set the source defines or None), pixels checked; see the module docstring for
    ``path``. Duplicates are dropped by :func:`dedupe`, splits made by :func:`split`."""
    if path is None:
        pool, test = load_sklearn_digits(), None
    else:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.path {path}: not a directory (MNIST IDX files or one sub-folder per class)")
        is_idx = _find_idx(root, "train-images-idx3-ubyte") or _find_idx(root, "train-labels-idx1-ubyte")
        pool, test = load_mnist(root) if is_idx else (load_folder(root, image_size, color), None)
    if image_size is not None:
        pool, test = resize(pool, image_size), resize(test, image_size) if test is not None else None
    return check_pixels(pool), check_pixels(test) if test is not None else None


# --------------------------------------------------------------------------------------------------------------------
# Cleaning and splitting
# --------------------------------------------------------------------------------------------------------------------
def resize(data: ImageSet, size: int) -> ImageSet:
    if data.images.shape[-2:] == (size, size):
        return data
    return ImageSet(resize_images(data.images, (size, size)), data.labels, data.names, data.source)


def resize_images(images: Tensor, size: tuple[int, int]) -> Tensor:
    """[N, C, H, W] -> [N, C, *size], antialiased bilinear (a no-op at that size already)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def check_pixels(data: ImageSet) -> ImageSet:
    bad = ~torch.isfinite(data.images).flatten(1).all(1) | (data.images.flatten(1).amin(1) < 0)
    if bool(bad.any()):
        raise ConfigError(f"{data.source}: image {int(bad.nonzero()[0])} has non-finite or negative pixels")
    return data


def dedupe(data: ImageSet) -> tuple[ImageSet, int]:
    """Drop exact duplicate images, keeping the first; (kept set, number dropped)."""
    quantised = (data.images * 255).round().to(torch.uint8).flatten(1).numpy()
    seen: set[bytes] = set()
    keep = []
    for i, row in enumerate(quantised):
        key = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return data.subset(np.array(keep)), len(data) - len(keep)


def _stratified(data: ImageSet, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(data))
    try:
        return train_test_split(index, test_size=fraction, random_state=seed, stratify=data.labels.numpy())
    except ValueError as err:  # a class with a single image, or a split smaller than the number of classes
        raise ConfigError(f"{data.source}: cannot split off the {what} set ({' '.join(str(err).split())})") from err


def split(
    pool: ImageSet,
    test: ImageSet | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    max_examples: int | None = None,
) -> Splits:
    """Stratified, seeded train/val/test splits; the source's own test set (MNIST t10k) when it has one.

    ``val_fraction`` and ``test_fraction`` are shares of the whole pool, so the defaults give 70/15/15.
    """
    if max_examples is not None and max_examples < len(pool):
        _, keep = _stratified(pool, max_examples / len(pool), seed, "max_examples")
        pool = pool.subset(np.sort(keep))
    if test is None:
        rest, test_idx = _stratified(pool, test_fraction, seed, "test")
        test, pool = pool.subset(test_idx), pool.subset(rest)
        val_fraction = val_fraction / (1.0 - test_fraction)  # a share of what is left
    train_idx, val_idx = _stratified(pool, val_fraction, seed, "validation")
    return Splits(pool.subset(train_idx), pool.subset(val_idx), test)


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std over [N, C, H, W] (the model's input normalisation)."""
    return images.mean(dim=(0, 2, 3)), images.std(dim=(0, 2, 3))


def as_examples(data: ImageSet) -> list[tuple[Tensor, int]]:
    """(image, class id) pairs: the items ExampleBatches shuffles and :func:`image_collate` stacks."""
    return list(zip(data.images, data.labels.tolist(), strict=True))


def image_collate(items: list[tuple[Tensor, int]]) -> dict[str, Tensor]:
    """A list of (image [C, H, W], class id) -> {"pixel_values": [B, C, H, W], "labels": [B]} (module level, so
    DataLoader workers can pickle it)."""
    images, labels = zip(*items, strict=True)
    return {"pixel_values": torch.stack(images), "labels": torch.tensor(labels, dtype=torch.long)}


def write_images(data: ImageSet, out_dir: str | Path) -> list[Path]:
    """Every image as an 8-bit PNG ``out_dir/<label>/<n>.png`` (grey or RGB; the label is the folder, as
    :func:`load_folder` reads it)."""
    from PIL import Image

    paths = []
    for i, (image, label) in enumerate(zip(data.images, data.labels.tolist(), strict=True)):
        path = Path(out_dir) / data.names[label] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        Image.fromarray(pixels[0].numpy() if len(pixels) == 1 else pixels.permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths
