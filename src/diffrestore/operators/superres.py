"""Super-resolution operators: block averaging (DDRM's ``sr4``) and antialiased bicubic downsampling.

Both are separable per channel, ``Y_c = A_h X_c A_w^T`` with 1-D ``(n/s x n)`` matrices, and get their
SVD from the two 1-D SVDs (see ``separable.py`` for the spectral layout). The measurement is the small
image ``(C, H/s, W/s)``; image sides must be divisible by the factor ``s``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import DEFAULT_REL_THRESHOLD, ImageSizeError
from .separable import SeparableOperator


def _check_factor(in_shape, factor) -> int:
    integral = isinstance(factor, int) or (isinstance(factor, float) and factor.is_integer())
    if isinstance(factor, bool) or not integral or factor < 1:
        raise ValueError(f"SR factor must be a positive integer, got {factor!r}")
    factor = int(factor)
    _, h, w = (int(s) for s in in_shape)
    if h % factor or w % factor:
        raise ImageSizeError(
            f"image of {h}x{w} (HxW) cannot be downsampled by {factor}: both sides must be divisible by {factor}"
        )
    return factor


def block_average_matrix(n: int, factor: int) -> torch.Tensor:
    """(n/factor, n) float64 matrix averaging consecutive blocks of ``factor`` samples."""
    if n % factor:
        raise ImageSizeError(f"length {n} is not divisible by {factor}")
    rows = torch.arange(n) // factor
    A = torch.zeros(n // factor, n, dtype=torch.float64)
    A[rows, torch.arange(n)] = 1.0 / factor
    return A


def keys_cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel (support [-2, 2]); ``a = -0.5`` as in PIL."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((t - 5) * t + 8) * t * a - 4 * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def bicubic_matrix(n: int, factor: int, a: float = -0.5) -> torch.Tensor:
    """(n/factor, n) float64 matrix of antialiased bicubic downsampling, as PIL's ``resize(BICUBIC)``.

    Output sample ``i`` sits at ``c_i = (i + 0.5) * factor`` in input coordinates (pixel centres at
    ``j + 0.5``). The Keys kernel is stretched by the factor: weight ``k((j + 0.5 - c_i) / factor)``,
    support ``2 * factor`` on each side; every row is renormalised to sum 1 over the taps that fall
    inside the image (this is how borders are handled, no padding).
    """
    if n % factor:
        raise ImageSizeError(f"length {n} is not divisible by {factor}")
    m = n // factor
    centres = (torch.arange(m, dtype=torch.float64) + 0.5) * factor
    pos = torch.arange(n, dtype=torch.float64) + 0.5
    W = keys_cubic((pos[None, :] - centres[:, None]) / factor, a)
    return W / W.sum(dim=1, keepdim=True)


class BlockAverageSR(SeparableOperator):
    """Downsampling by averaging ``factor x factor`` blocks (``H = avg_pool2d(x, factor)``).

    All singular values equal ``1 / factor``, so no thresholding ever applies.
    """

    def __init__(self, in_shape, factor: int = 4):
        self.factor = _check_factor(in_shape, factor)
        _, h, w = in_shape
        super().__init__(in_shape, block_average_matrix(h, self.factor), block_average_matrix(w, self.factor),
                         threshold=DEFAULT_REL_THRESHOLD)

    def H(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        return F.avg_pool2d(x, self.factor) if self.factor > 1 else x.clone()

    def Ht(self, y: torch.Tensor) -> torch.Tensor:
        self._check_y(y)
        s = self.factor
        return y.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1) / (s * s)

    def __repr__(self) -> str:
        return f"BlockAverageSR(in_shape={self.in_shape}, factor={self.factor})"


class BicubicSR(SeparableOperator):
    """Antialiased bicubic downsampling by an integer ``factor`` (Keys cubic, a = -0.5), equal to
    PIL's ``Image.resize((W/s, H/s), BICUBIC)`` on float images. ``H`` is two small matmuls.

    Args:
        threshold: relative cut-off on the 2-D singular values (default 1e-3 of the largest).
    """

    def __init__(self, in_shape, factor: int = 4, threshold: float = DEFAULT_REL_THRESHOLD):
        self.factor = _check_factor(in_shape, factor)
        _, h, w = in_shape
        super().__init__(in_shape, bicubic_matrix(h, self.factor), bicubic_matrix(w, self.factor), threshold=threshold)

    def __repr__(self) -> str:
        return f"BicubicSR(in_shape={self.in_shape}, factor={self.factor}, threshold={self.rel_threshold})"
