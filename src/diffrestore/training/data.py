"""Training photos: decoded once into memory, served as random rescaled crops with flips.

Each crop comes from the photo virtually rescaled to a short side drawn from ``short_side``, so the
network sees content at the scales evaluation images have (ImageNet photos shrunk to 256 px); rescale
and crop are one PIL ``resize(box=...)`` call, so no resized copy of a photo is ever made. Every
``holdout_every``-th photo (sorted by name) is held out; validation crops are drawn from those.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..image_io import IMAGE_SUFFIXES, open_rgb
from .checkpoints import TrainingError


def list_photos(data_dir: str | os.PathLike) -> list[Path]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TrainingError(f"{data_dir}: training data folder not found")
    files = sorted(p for p in data_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise TrainingError(f"{data_dir}: no images found")
    return files


def split_photos(files: list[Path], holdout_every: int = 28) -> tuple[list[Path], list[Path]]:
    """(train, held-out): every ``holdout_every``-th file (sorted order) is held out; 0 = none."""
    if holdout_every <= 0:
        return list(files), []
    held = [f for i, f in enumerate(files) if i % holdout_every == holdout_every - 1]
    train = [f for i, f in enumerate(files) if i % holdout_every != holdout_every - 1]
    return train, held


def load_photos(files: list[Path], min_short_side: int = 128, limit: int | None = None) -> list[Image.Image]:
    """Decode photos into memory as 8-bit RGB PIL images as a viewer shows them (``image_io.open_rgb``), skipping
    those with a short side below ``min_short_side`` (they would have to be upsampled); a file that cannot
    be used is a TrainingError."""
    out = []
    for f in files:
        try:
            rgb = open_rgb(f)
        except ValueError as e:  # unreadable, truncated, too many pixels, non-finite values
            raise TrainingError(f"{str(e).splitlines()[0]}; remove it from --data") from None
        if min(rgb.size) < min_short_side:
            continue
        out.append(rgb)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise TrainingError(f"no usable photos (short side >= {min_short_side})")
    return out


class CropSampler:
    """Random ``crop`` x ``crop`` patches from photos rescaled to a random short side, random h-flip."""

    def __init__(
        self,
        photos: list[Image.Image],
        crop: int,
        short_side: tuple[float, float] = (192.0, 256.0),
        flip: bool = True,
    ):
        if crop <= 0:
            raise TrainingError(f"crop must be positive, got {crop}")
        lo, hi = short_side
        if not (0 < lo <= hi):
            raise TrainingError(f"bad short-side range {short_side}")
        self.photos = photos
        self.crop = int(crop)
        self.short_side = (float(lo), float(hi))
        self.flip = flip

    def one(self, rng: np.random.Generator) -> np.ndarray:
        """One (crop, crop, 3) uint8 patch."""
        img = self.photos[int(rng.integers(len(self.photos)))]
        w, h = img.size
        target = rng.uniform(*self.short_side)
        scale = target / min(w, h)  # output px per source px
        region = min(self.crop / scale, float(min(w, h)))  # side of the source box
        x0 = rng.uniform(0.0, w - region)
        y0 = rng.uniform(0.0, h - region)
        patch = img.resize(
            (self.crop, self.crop), Image.Resampling.BICUBIC, box=(x0, y0, x0 + region, y0 + region)
        )
        a = np.asarray(patch)
        if self.flip and rng.random() < 0.5:
            a = a[:, ::-1]
        return a

    def batch(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        """(n, 3, crop, crop) float32 in [-1, 1]."""
        a = np.stack([self.one(rng) for _ in range(n)])
        return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def fixed_batch(sampler: CropSampler, n: int, seed: int = 12345) -> torch.Tensor:
    """A reproducible batch (for validation), independent of the training RNG."""
    return sampler.batch(n, np.random.default_rng(seed))


def block_downsample(x: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Average over non-overlapping ``factor`` x ``factor`` blocks (DDRM's sr4 operator for factor 4)."""
    return torch.nn.functional.avg_pool2d(x, factor, stride=factor)


def load_training_data(data_dir, crop: int, short_side, holdout_every: int, max_photos: int | None, val_size: int):
    """(training photos, their CropSampler, fixed validation crops of the held-out photos or None)."""
    train_files, held_files = split_photos(list_photos(data_dir), holdout_every)
    photos = load_photos(train_files, limit=max_photos)
    sampler = CropSampler(photos, crop, short_side=short_side)
    val_x = None
    if held_files and val_size > 0:
        held = load_photos(held_files, limit=max_photos)
        val_x = fixed_batch(CropSampler(held, crop, short_side=short_side), val_size)
    return photos, sampler, val_x
