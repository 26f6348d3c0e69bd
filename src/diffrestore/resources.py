"""Resource limits, checked before any heavy work: image pixels, blur kernel size, step counts, memory.

A command that cannot fit is refused in a second with a one-line message that names the limit and what
would work, instead of running for minutes and failing to allocate (or hanging a shared machine). This
module imports neither torch nor numpy, so the CLI can decide before it loads them.

Memory is an *estimate* (:func:`estimate_bytes`): the restored image times the number of samples times
what the method's networks keep per pixel, plus the dense 1-D factors of a separable operator's SVD
(blur, super-resolution). The per-pixel figures are peak-RSS increments measured with the built-in priors
(``docs/results/``); larger priors need more, so the estimate is a floor, not a promise. A tiled
restoration passes the tile's size instead of the image's.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

#: default ``--max-pixels``: images larger than this many pixels are refused (PIL's own bomb check
#: starts at 89 million; 50 million is a 48 MP phone photo with room to spare)
DEFAULT_MAX_PIXELS = 50_000_000
#: largest Gaussian blur std in pixels: wider blurs leave nothing to restore and need kernels of 8 sigma
MAX_BLUR_SIGMA = 100.0
#: bytes the networks hold per restored pixel and per sample (float32, no gradients), by prior kind
#: ("none": a baseline, which runs no network)
#: bytes per pixel a tiled restoration keeps for the whole image besides the network (the method's
#: state, prediction, spectral copies, draws, the decoded input and the measurement): 12 MP denoise
#: peaked at 2.75 GB (~140 B/px beyond the process and one tile), a 64 MP denoise had reached 18.9 GB
#: (~290 B/px) when it was stopped; rounded up so that the guard refuses before memory runs out
STATE_BYTES_PER_PIXEL = 400
#: the tile side that automatic tiling uses (``priors.tiled``)
DEFAULT_TILE = 512
ACTIVATION_BYTES_PER_PIXEL = {"pixel": 2048, "latent": 2048, "none": 64}
#: the interpreter, torch and a model's weights: what a run needs before its first image
BASE_BYTES = 600 * 2**20
#: the share of the memory the system reports available that a run may plan to use
AVAILABLE_SHARE = 0.8

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}  # fmt: skip


class ResourceError(ValueError):
    """A command that would exceed a resource limit (one line: the limit, and what would work)."""


def gib(n: float) -> str:
    """``n`` bytes as a short human number (``1.5 GiB``, ``300 MiB``)."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def parse_bytes(text: str, option: str = "--max-memory") -> int:
    """``"8G"``, ``"8GiB"``, ``"500MB"``, ``"1.5g"`` or a plain number of bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ResourceError(f"{option} {text!r} is not a size such as 8G, 500M or 2GiB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ResourceError(f"{option} must be positive, got {text!r}")
    return value


def available_memory(device: str = "cpu") -> int:
    """Bytes free for a run on ``device``: the GPU's free memory for CUDA, else the system's
    ``MemAvailable`` (``/proc/meminfo``; the physical memory where that file does not exist)."""
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget(max_memory: str | None, device: str = "cpu") -> tuple[int, str]:
    """(bytes a run may use, how that was decided): ``--max-memory`` when given, else a share of what is
    available."""
    if max_memory is not None:
        return parse_bytes(max_memory), "--max-memory"
    return int(available_memory(device) * AVAILABLE_SHARE), f"{AVAILABLE_SHARE:.0%} of the available memory"


def estimate_bytes(height: int, width: int, *, samples: int = 1, batch: int = 1, kind: str = "pixel",
                   separable: bool = False, tile: int | None = None) -> int:
    """Peak memory of restoring ``batch`` images of ``height`` x ``width`` with ``samples`` draws each by a
    method with a ``kind`` prior; ``separable``: the operator keeps dense 1-D SVD factors (float64
    ``A, U, V`` of each side, plus their workspace) and an index permutation of the image. ``tile``: the
    network runs on tiles of that side (``priors.tiled``), so its activations are a tile's and the
    whole image costs only the method's state."""
    pixels = height * width
    if tile and tile * tile < pixels:
        per_draw = tile * tile * ACTIVATION_BYTES_PER_PIXEL[kind] + pixels * STATE_BYTES_PER_PIXEL
    else:
        per_draw = pixels * ACTIVATION_BYTES_PER_PIXEL[kind]
    total = BASE_BYTES + batch * samples * per_draw
    if separable:
        total += 6 * 8 * (height**2 + width**2) + 2 * 8 * 3 * pixels
    return total


def check_memory(height: int, width: int, budget: tuple[int, str], *, samples: int = 1, batch: int = 1,
                 kind: str = "pixel", separable: bool = False, what: str = "", tile: int | None = None) -> int:
    """Raise ResourceError when :func:`estimate_bytes` exceeds ``budget`` (from :func:`memory_budget`),
    saying what would fit: fewer samples, a smaller image, or a higher ``--max-memory``."""
    need = estimate_bytes(height, width, samples=samples, batch=batch, kind=kind, separable=separable, tile=tile)
    limit, source = budget
    if need <= limit:
        return need
    fixed = estimate_bytes(height, width, samples=0, batch=batch, kind=kind, separable=separable)
    per_sample = estimate_bytes(height, width, samples=1, batch=batch, kind=kind, separable=separable) - fixed
    fit = []
    if samples > 1 and (limit - fixed) // per_sample >= 1:
        fit.append(f"--samples {(limit - fixed) // per_sample}")
    side = _largest_side(limit, height / width, samples, batch, kind, separable)
    if side:
        fit.append(f"an image of at most about {side[0]}x{side[1]}")
    fit.append("a higher --max-memory (at your own risk)")
    raise ResourceError(
        f"{what or f'{height}x{width}'} with {samples} sample(s) needs about {gib(need)} (estimate), more than "
        f"the limit of {gib(limit)} ({source}); use {', or '.join(fit)}"
    )


def _largest_side(limit: int, aspect: float, samples: int, batch: int, kind: str, separable: bool):
    """The largest (height, width) of the same aspect whose estimate fits ``limit`` (None if none does)."""
    lo, hi = 0, 1 << 16
    while lo < hi:  # largest height h with a fitting estimate
        mid = (lo + hi + 1) // 2
        w = max(1, round(mid / aspect))
        if estimate_bytes(mid, w, samples=max(samples, 1), batch=batch, kind=kind, separable=separable) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return (lo, max(1, round(lo / aspect))) if lo >= 8 else None


def check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    """Refuse an image of more than ``max_pixels`` pixels (``--max-pixels``)."""
    if width * height > max_pixels:
        raise ResourceError(
            f"{what}: {width}x{height} is {width * height:,} pixels, more than the limit of {max_pixels:,} "
            f"(a guard against decompression bombs and runs that cannot fit); raise it with --max-pixels"
        )


def image_size(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of an image file from its header alone (no pixel is decoded, so a decompression
    bomb costs nothing); refuses more than ``max_pixels`` pixels. Raises ValueError for a file that is
    missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    path = check_regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with no_pil_bomb_limit(), Image.open(path) as img:
                size = img.size
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not an image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__})") from None
    check_pixels(size[0], size[1], max_pixels, str(path))
    return size


def check_regular_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path; ValueError for something that exists but is neither a file nor a folder (a FIFO
    or a device would block or never end when read)."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        raise ValueError(f"{path}: not a regular file")
    return path


class no_pil_bomb_limit:
    """PIL's own bomb check off for a block: ``--max-pixels`` is the limit, checked by the caller."""

    def __enter__(self):
        from PIL import Image

        self.saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None

    def __exit__(self, *exc):
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = self.saved



def check_blur_sigma(sigma, truncate: float = 4.0) -> None:
    """Refuse a Gaussian blur std that is not a positive number or wider than ``MAX_BLUR_SIGMA`` (its kernel
    would have ``2 ceil(truncate sigma) + 1`` taps)."""
    for s in sigma if isinstance(sigma, (tuple, list)) else (sigma,):
        s = float(s)
        if not (s > 0 and math.isfinite(s)):
            raise ResourceError(f"blur std must be a positive number of pixels, got {s:g}")
        if s > MAX_BLUR_SIGMA:
            raise ResourceError(
                f"blur std {s:g} px is wider than the limit of {MAX_BLUR_SIGMA:g} px (its kernel would have "
                f"{2 * math.ceil(truncate * s) + 1:,} taps per axis); use --blur-sigma {MAX_BLUR_SIGMA:g} or less"
            )


def check_steps(steps: int | None, option: str = "--steps") -> None:
    """Refuse a step count below 1 (None: the method's default)."""
    if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 1):
        raise ResourceError(f"{option} must be a whole number of at least 1, got {steps}")


def check_device_name(device: str | None) -> None:
    """Refuse, without torch, a ``--device`` that names no device type this package runs on."""
    if device is not None and not re.fullmatch(r"cpu|mps|cuda(:[0-9]+)?", str(device)):
        raise ResourceError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps)")


def resolve_device(device: str | None):
    """The torch device a command runs on (None: CUDA when available, else the CPU); ResourceError for a
    name torch does not know or a CUDA device this machine does not have."""
    check_device_name(device)
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ResourceError(f"--device {device}: no CUDA device is available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ResourceError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ResourceError(f"--device {device}: no MPS device on this machine (use cpu or cuda)")
    return dev
