"""Images in and out, and atomic writes.

Images live in the library as float tensors in [-1, 1], shape (C, H, W) or (B, C, H, W), RGB.
Every file the tool writes goes through ``atomic_write*`` so an interrupted run never leaves a
truncated PNG or JSON behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from diffrestore.resources import DEFAULT_MAX_PIXELS, ResourceError, check_pixels, check_regular_file, no_pil_bomb_limit

if TYPE_CHECKING:  # numpy and torch are imported when needed, so a command can refuse its inputs first
    import numpy as np
    import torch

#: file-name suffixes (lower case) read as images wherever the package lists a folder of photos
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_UMASK = os.umask(0o022)
os.umask(_UMASK)


class ImageReadError(ValueError):
    """A file that cannot be read as an image."""


class OutputDirError(ValueError):
    """An output folder that cannot be created or written to."""


def prepare_output_dir(path: str | os.PathLike) -> bool:
    """Create ``path`` if needed and check a file can be written there, before any long work.

    Returns True when this call created the folder (so a caller that fails later can remove it)."""
    path = Path(path)
    created = not path.exists()
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output folder {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        if created:
            remove_if_empty(path)
        raise OutputDirError(f"output folder {path} is not writable ({e.strerror or e})") from None
    return created


def remove_if_empty(path: str | os.PathLike) -> None:
    try:
        Path(path).rmdir()
    except OSError:
        pass


@contextmanager
def writing_into(out: str | os.PathLike, subdirs: tuple[str, ...] = ()):
    """Prepare the output folder ``out`` (:func:`prepare_output_dir`) and yield a list for the caller to
    append every file it writes to. If the block fails, those files are removed, then the ``subdirs`` of
    ``out`` if empty, then ``out`` itself if this call created it and it is empty: no output files."""
    out = Path(out)
    created = prepare_output_dir(out)
    written: list[Path] = []
    try:
        yield written
    except BaseException:
        for f in written:
            Path(f).unlink(missing_ok=True)
        for d in subdirs:
            remove_if_empty(out / d)
        if created:
            remove_if_empty(out)
        raise


def pil_to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to 8-bit RGB.

    16-bit and float greyscale are scaled to 8 bits by their nominal range (I;16: /257), not by
    their min/max, so intensities keep their meaning. Alpha is composited on white. Integer and float
    images with NaN or infinite pixels are refused (ImageReadError): clipped, they would come out black.
    """
    import numpy as np

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        a = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "I":
        a = np.asarray(img, dtype=np.float64)
        scale = 257.0 if a.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(np.rint(a / scale), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        bad = int(a.size - np.isfinite(a).sum())
        if bad:
            raise ImageReadError(f"{bad} of its {a.size} pixels are NaN or infinite (a float image needs finite values)")
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
        img = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def open_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, exif: bool = True) -> Image.Image:
    """An image file as 8-bit RGB, as a viewer shows it: EXIF orientation applied (unless ``exif`` is
    False), any mode converted (:func:`pil_to_rgb`). The size is checked against ``max_pixels`` from the
    header, before any pixel is decoded. Raises ImageReadError / ResourceError (ValueErrors, one line)."""
    path = check_regular_file(path)
    try:
        with no_pil_bomb_limit(), Image.open(path) as img:
            check_pixels(img.size[0], img.size[1], max_pixels, str(path))
            img.load()
            return pil_to_rgb(ImageOps.exif_transpose(img) if exif else img)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a directory, not an image") from None
    except ResourceError:
        raise
    except ImageReadError as e:
        raise ImageReadError(f"{path}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__})") from None


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Read an image file as a (3, H, W) float32 tensor in [-1, 1] (see :func:`open_rgb`)."""
    return rgb_to_tensor(open_rgb(path, max_pixels))


def rgb_to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) float32 tensor in [-1, 1]."""
    import numpy as np

    return uint8_to_tensor(np.asarray(img))


def uint8_to_tensor(a: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    import numpy as np
    import torch

    return torch.from_numpy(np.array(a, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, C) uint8 (clamped, rounded). One channel -> greyscale."""
    import torch

    x = x.detach().float().cpu()
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError("tensor_to_uint8 takes one image")
        x = x[0]
    a = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success rename it over ``path`` (atomic on POSIX)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should be readable like any file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_image(path: str | os.PathLike, x: torch.Tensor) -> None:
    """Write a [-1, 1] image tensor as PNG, atomically."""
    a = tensor_to_uint8(x)
    with atomic_path(path) as tmp:
        Image.fromarray(a).save(tmp, format="PNG")
