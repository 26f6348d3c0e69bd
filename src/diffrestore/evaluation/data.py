"""Evaluation images, prepared as DDRM prepares ImageNet: centre square crop, then resize.

Pipeline per file: open -> RGB (greyscale, palette, RGBA, CMYK, 16-bit converted by
``image_io.pil_to_rgb``) -> centre crop to a square whose side is the shorter side (i.e. the longer side
is cropped) -> bilinear resize to ``size`` with antialiasing (PIL's BILINEAR filter widens its
support when shrinking) -> [-1, 1] float tensor (3, size, size). EXIF orientation is not applied, as in
the published protocols (torchvision's loader ignores it), so numbers stay comparable with theirs.
Images over ``max_pixels`` are refused from their header, before decoding.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffrestore.image_io import IMAGE_SUFFIXES, open_rgb, uint8_to_tensor
from diffrestore.resources import DEFAULT_MAX_PIXELS


def find_images(root: str | os.PathLike) -> list[Path]:
    """All image files under ``root`` (recursive), sorted by relative path for a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def choose_subset(files: list[Path], n: int | None, seed: int, first: bool = False) -> list[Path]:
    """A seeded random subset of ``n`` files, or with ``first`` the first ``n`` in sorted order (all files,
    in order, when n is None or >= len). ``first`` exists because published protocols say "the first 100
    images"."""
    if n is None or n >= len(files):
        return list(files)
    if n <= 0:
        raise ValueError(f"--n must be positive, got {n}")
    if first:
        return list(files[:n])
    idx = sorted(random.Random(seed).sample(range(len(files)), n))
    return [files[i] for i in idx]


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.BILINEAR)
    return img


def load_eval_image(path: str | os.PathLike, size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """One evaluation image as (3, size, size) float32 in [-1, 1]."""
    rgb = open_rgb(path, max_pixels, exif=False)
    return uint8_to_tensor(np.asarray(center_crop_resize(rgb, size)))


def check_images(root: Path, files: list[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict]:
    """Decode every file (paths relative to ``root``) as the evaluation will; returns ``{"file", "reason"}``
    of each one that cannot be used (unreadable, truncated, over ``max_pixels``, non-finite values)."""
    bad = []
    for f in files:
        try:
            open_rgb(root / f, max_pixels, exif=False)
        except ValueError as e:
            bad.append({"file": f, "reason": str(e).splitlines()[0].removeprefix(f"{root / f}: ")})
    return bad
