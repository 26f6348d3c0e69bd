"""Blur operators: separable Gaussian, anisotropic (axis-aligned) Gaussian and uniform (box) blur.

Definition. ``H x`` is the 2-D cross-correlation (``torch.nn.functional.conv2d``) of each channel with
the kernel ``outer(k_h, k_w)``, output the same size as the input (computed separably as sums of
shifted copies, which is faster on CPU than a depthwise conv2d). Kernels have an odd number of taps
and are centred; every tap is used. For the symmetric kernels built here correlation and convolution
coincide.

Borders (``border``):

* ``"zero"`` (default, DDRM's convention): zeros outside the image, i.e. ``conv2d(x, k, padding=r)``;
  the 1-D matrix is the band ``A[i, j] = k[j - i + r]`` for ``|j - i| <= r``, cut at the edges (rows
  near the border sum to less than 1).
* ``"reflect"``: mirror padding without repeating the edge sample (``F.pad(mode="reflect")``, i.e.
  ``d c b | a b c d | c b a``); needs the kernel radius to be smaller than both image sides.

Gaussian taps are ``exp(-t^2 / (2 sigma^2))`` at integer offsets ``|t| <= r`` with radius
``r = ceil(truncate * sigma)`` (``truncate = 4`` by default, so ``sigma = 1`` gives 9 taps), normalised
to sum 1.

SVD: from the 1-D ``n x n`` SVDs (``separable.py``); ``D = m``. The spectrum decays, so singular
values at or below ``threshold * max(s)`` (default ``threshold = 1e-3``) are reported as 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import DEFAULT_REL_THRESHOLD, ImageSizeError
from .separable import SeparableOperator

BORDERS = ("zero", "reflect")
#: widest kernel applied as a sum of shifted copies; wider ones use the dense 1-D matrices
SHIFT_ADD_MAX_TAPS = 63


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Sampled Gaussian with ``2 * ceil(truncate * sigma) + 1`` taps, symmetric, sum 1 (float64)."""
    sigma = float(sigma)
    if not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"Gaussian blur std must be a positive number of pixels, got {sigma}")
    if not truncate > 0:
        raise ValueError(f"truncate must be > 0, got {truncate}")
    r = max(1, math.ceil(truncate * sigma - 1e-9))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def uniform_kernel1d(size: int) -> torch.Tensor:
    """Box kernel of ``size`` (odd) taps, each ``1 / size`` (float64)."""
    if isinstance(size, bool) or int(size) != size or size < 1 or size % 2 == 0:
        raise ValueError(f"uniform blur size must be an odd positive integer, got {size!r}")
    size = int(size)
    return torch.full((size,), 1.0 / size, dtype=torch.float64)


def conv_matrix(n: int, kernel: torch.Tensor, border: str = "zero") -> torch.Tensor:
    """(n, n) float64 matrix of 1-D 'same' cross-correlation with ``kernel`` under ``border``."""
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    k = torch.as_tensor(kernel, dtype=torch.float64).reshape(-1)
    r = k.numel() // 2
    i = torch.arange(n).unsqueeze(1).expand(n, k.numel())  # row i, tap t: column i + t - r
    j = i + (torch.arange(k.numel()) - r)
    taps = k.expand(n, k.numel())
    if border == "zero":
        ok = (j >= 0) & (j < n)
        i, j, taps = i[ok], j[ok], taps[ok]
    else:  # mirror without repeating the edge sample
        j = torch.where(j < 0, -j, j)
        j = torch.where(j > n - 1, 2 * (n - 1) - j, j)
    A = torch.zeros(n, n, dtype=torch.float64)
    A.index_put_((i.reshape(-1), j.reshape(-1)), taps.reshape(-1), accumulate=True)
    return A


class SeparableBlur(SeparableOperator):
    """Blur with the separable kernel ``outer(kernel_h, kernel_w)`` (both odd-length, centred).

    Args:
        in_shape: (C, H, W).
        kernel_h: 1-D taps along the height axis; kernel_w: along the width axis.
        border: ``"zero"`` or ``"reflect"`` (see the module docstring).
        threshold: relative cut-off on singular values (default 1e-3 of the largest).
    """

    def __init__(self, in_shape, kernel_h, kernel_w, border: str = "zero", threshold: float = DEFAULT_REL_THRESHOLD):
        if border not in BORDERS:
            raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
        kh = torch.as_tensor(kernel_h, dtype=torch.float64).reshape(-1)
        kw = torch.as_tensor(kernel_w, dtype=torch.float64).reshape(-1)
        for k in (kh, kw):
            if k.numel() % 2 == 0:
                raise ValueError(f"blur kernels need an odd number of taps, got {k.numel()}")
        c, h, w = (int(s) for s in in_shape)
        self.border = border
        self.radius = (kh.numel() // 2, kw.numel() // 2)
        if border == "reflect" and (self.radius[0] >= h or self.radius[1] >= w):
            raise ImageSizeError(
                f"image of {h}x{w} (HxW) is too small for reflect borders with a kernel of "
                f"{kh.numel()}x{kw.numel()} taps (the radius must be smaller than each side)"
            )
        super().__init__(in_shape, conv_matrix(h, kh, border), conv_matrix(w, kw, border), threshold=threshold)
        self._taps = ([float(v) for v in kh], [float(v) for v in kw])
        self._kernels = (kh, kw)

    @property
    def kernels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 1-D kernels (k_h, k_w), float64."""
        return self._kernels

    def _correlate(self, x: torch.Tensor, flip: bool) -> torch.Tensor:
        """Separable 'same' correlation as a sum of shifted copies (faster on CPU than a depthwise
        conv2d, and a handful of fused kernels on GPU)."""
        for dim, taps, r in ((-2, self._taps[0], self.radius[0]), (-1, self._taps[1], self.radius[1])):
            if flip:
                taps = taps[::-1]
            n = x.shape[dim]
            pad = (0, 0, r, r) if dim == -2 else (r, r, 0, 0)
            xp = F.pad(x, pad, mode="constant" if self.border == "zero" else "reflect")
            out = xp.narrow(dim, 0, n) * taps[0]
            for t in range(1, len(taps)):
                out.add_(xp.narrow(dim, t, n), alpha=taps[t])
            x = out
        return x

    def _wide(self) -> bool:
        """Kernels of more than ``SHIFT_ADD_MAX_TAPS`` taps: two small matmuls beat a copy per tap."""
        return max(len(t) for t in self._taps) > SHIFT_ADD_MAX_TAPS

    def H(self, x: torch.Tensor) -> torch.Tensor:
        if self._wide():
            return super().H(x)
        self._check_x(x)
        return self._correlate(x, flip=False)

    def Ht(self, y: torch.Tensor) -> torch.Tensor:
        if self.border == "zero" and not self._wide():  # adjoint of zero-padded correlation = correlation with flipped taps
            self._check_y(y)
            return self._correlate(y, flip=True)
        return super().Ht(y)  # reflect: the folded border is not a convolution; two small matmuls

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(in_shape={self.in_shape}, taps={tuple(2 * r + 1 for r in self.radius)}, "
                f"border={self.border!r}, threshold={self.rel_threshold})")


class GaussianBlur(SeparableBlur):
    """Gaussian blur of std ``sigma`` pixels (a float, or ``(sigma_h, sigma_w)`` for an axis-aligned
    anisotropic blur), radius ``ceil(truncate * sigma)`` per axis."""

    def __init__(self, in_shape, sigma=1.0, truncate: float = 4.0, border: str = "zero",
                 threshold: float = DEFAULT_REL_THRESHOLD):
        if isinstance(sigma, (tuple, list)):
            if len(sigma) != 2:
                raise ValueError(f"sigma must be a number or a pair (sigma_h, sigma_w), got {sigma!r}")
            sh, sw = float(sigma[0]), float(sigma[1])
        else:
            sh = sw = float(sigma)
        self.sigma = (sh, sw)
        self.truncate = float(truncate)
        super().__init__(in_shape, gaussian_kernel1d(sh, truncate), gaussian_kernel1d(sw, truncate),
                         border=border, threshold=threshold)


class AnisotropicGaussianBlur(GaussianBlur):
    """Axis-aligned anisotropic Gaussian: std ``sigma_h`` along the height axis (vertical blur) and
    ``sigma_w`` along the width axis (horizontal blur)."""

    def __init__(self, in_shape, sigma_h: float = 1.0, sigma_w: float = 3.0, truncate: float = 4.0,
                 border: str = "zero", threshold: float = DEFAULT_REL_THRESHOLD):
        super().__init__(in_shape, (sigma_h, sigma_w), truncate=truncate, border=border, threshold=threshold)


class UniformBlur(SeparableBlur):
    """Box blur: the mean over a ``size x size`` window (``size`` odd)."""

    def __init__(self, in_shape, size: int = 9, border: str = "zero", threshold: float = DEFAULT_REL_THRESHOLD):
        k = uniform_kernel1d(size)
        self.size = int(size)
        super().__init__(in_shape, k, k, border=border, threshold=threshold)
