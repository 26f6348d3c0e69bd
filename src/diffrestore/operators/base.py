"""The operator contract: a linear degradation y = H x with its SVD applied implicitly.

Every restoration method talks to degradations only through this interface, so a method never
needs to know whether it restores a blur, a downsampling or a mask.

Shapes. ``x`` is an image batch ``(B, C, H, W)``; ``y`` is a measurement batch
``(B, *measurement_shape)`` in the operator's natural layout (a small image for super-resolution,
a grey image for colorization, ...). The SVD is ``H = U diag(s) V^T`` with

* ``Vt(x) -> (B, D)``: spectral coefficients of ``x`` (``D = C*H*W``), ordered so that the first
  ``m`` entries pair with ``singulars`` and with ``Ut(y)``; the remaining ``D - m`` span the null
  space of H;
* ``V(v)``: the inverse of ``Vt`` (V is orthogonal);
* ``Ut(y) -> (B, m)`` and ``U(u)``: the measurement-side orthogonal factor (``m`` = measurement size);
* ``singulars -> (m,)``: non-negative; values at or below ``threshold`` are reported as exactly 0 so
  that methods treat those directions as unobserved instead of dividing by a tiny number.

Nothing here forms a dense D x D matrix; ``dense_matrix`` exists only for tests on tiny sizes.
"""

from __future__ import annotations

import torch


class ImageSizeError(ValueError):
    """The image size is one the operator cannot take (e.g. not divisible by the SR factor)."""


class LinearOperator:
    """Base class. Subclasses implement the SVD parts; H, Ht and pinv follow from them but
    subclasses may override them with a faster direct form."""

    #: Singular values at or below this are treated as exactly zero (documented per operator).
    threshold: float = 0.0

    def __init__(self, in_shape: tuple[int, int, int]):
        self.in_shape = tuple(int(s) for s in in_shape)

    # --- shapes -------------------------------------------------------------------------------
    @property
    def measurement_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def D(self) -> int:
        c, h, w = self.in_shape
        return c * h * w

    @property
    def m(self) -> int:
        n = 1
        for s in self.measurement_shape:
            n *= s
        return n

    # --- SVD parts ----------------------------------------------------------------------------
    @property
    def singulars(self) -> torch.Tensor:
        raise NotImplementedError

    def Vt(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def V(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def Ut(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def U(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- derived maps -------------------------------------------------------------------------
    def H(self, x: torch.Tensor) -> torch.Tensor:
        v = self.Vt(x)[:, : self.m]
        return self.U(v * self.singulars.to(v))

    def Ht(self, y: torch.Tensor) -> torch.Tensor:
        u = self.Ut(y) * self.singulars.to(y)
        return self.V(self._pad_spectral(u))

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        s = self.singulars.to(y)
        u = self.Ut(y)
        inv = torch.where(s > 0, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
        return self.V(self._pad_spectral(u * inv))

    def _pad_spectral(self, u: torch.Tensor) -> torch.Tensor:
        """Extend (B, m) spectral coefficients with zeros to (B, D)."""
        return torch.cat([u, u.new_zeros(u.shape[0], self.D - u.shape[1])], dim=1)

    def measure(self, x: torch.Tensor, sigma_y: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """y = H x + sigma_y * n, n ~ N(0, I), drawn from ``generator``."""
        y = self.H(x)
        if sigma_y > 0:
            dev = generator.device if generator is not None else y.device
            n = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=dev).to(y.device)
            y = y + sigma_y * n
        return y

    def to_image(self, y: torch.Tensor) -> torch.Tensor:
        """A viewable image of the measurement (B, C', H', W'); default: the measurement itself."""
        return y

    def dense_matrix(self) -> torch.Tensor:
        """H as a dense (m, D) float64 matrix, built column by column. For tests on tiny sizes."""
        cols = []
        for j in range(self.D):
            e = torch.zeros(1, self.D, dtype=torch.float64)
            e[0, j] = 1.0
            cols.append(self.H(e.view(1, *self.in_shape)).reshape(-1))
        return torch.stack(cols, dim=1)

    def check_size(self, shape: tuple[int, ...]) -> None:
        """Raise ImageSizeError unless an image of ``shape`` (C, H, W) fits this operator."""
        if tuple(shape[-3:]) != self.in_shape:
            raise ImageSizeError(f"operator built for images {self.in_shape}, got {tuple(shape[-3:])}")
