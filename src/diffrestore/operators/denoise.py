"""Denoising: H = I (U = V = I, all singular values 1); the noise comes from ``measure``."""

from __future__ import annotations

import torch

from .base import LinearOperator


class Identity(LinearOperator):
    """The identity operator on images of ``in_shape`` (C, H, W); measurement shape = in_shape."""

    def __init__(self, in_shape):
        super().__init__(in_shape)
        self._singulars = torch.ones(self.D, dtype=torch.float64)

    @property
    def measurement_shape(self) -> tuple[int, int, int]:
        return self.in_shape

    def Vt(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        return x.reshape(x.shape[0], self.D)

    def V(self, v: torch.Tensor) -> torch.Tensor:
        self._check_spec(v, self.D, "V")
        return v.reshape(v.shape[0], *self.in_shape)

    def Ut(self, y: torch.Tensor) -> torch.Tensor:
        self._check_y(y)
        return y.reshape(y.shape[0], self.m)

    def U(self, u: torch.Tensor) -> torch.Tensor:
        self._check_spec(u, self.m, "U")
        return u.reshape(u.shape[0], *self.in_shape)

    def H(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        return x.clone()

    def Ht(self, y: torch.Tensor) -> torch.Tensor:
        self._check_y(y)
        return y.clone()

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        self._check_y(y)
        return y.clone()
