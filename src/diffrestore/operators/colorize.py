"""Colorization: y = mean over the channels, a grey image (B, 1, H, W).

Per pixel H is the 1 x C row ``[1/C, ..., 1/C]`` = ``1 * (1/sqrt(C)) * v1^T`` with
``v1 = (1, ..., 1) / sqrt(C)``: one singular value ``1/sqrt(C)`` per pixel, ``U = I``. ``V`` is the
per-pixel C x C orthonormal (Helmert) basis: ``v1``, then
``v_k = (1, ..., 1, -k, 0, ..., 0) / sqrt(k (k + 1))`` (k ones) for k = 1..C-1; for RGB
``(1,1,1)/sqrt(3)``, ``(1,-1,0)/sqrt(2)``, ``(1,1,-2)/sqrt(6)``.

``Vt(x)`` is ``(B, C*H*W)``: the coefficient on ``v1`` of every pixel (row-major), pairing with
``singulars`` and ``Ut(y) = y`` flattened, then all coefficients on ``v2``, then on ``v3``, ...
"""

from __future__ import annotations

import math

import torch

from .base import LinearOperator


def helmert_basis(c: int) -> torch.Tensor:
    """(c, c) float64 orthonormal matrix whose first column is ones / sqrt(c)."""
    Vm = torch.zeros(c, c, dtype=torch.float64)
    Vm[:, 0] = 1.0 / math.sqrt(c)
    for k in range(1, c):
        Vm[:k, k] = 1.0
        Vm[k, k] = -float(k)
        Vm[:, k] /= math.sqrt(k * (k + 1))
    return Vm


class Colorization(LinearOperator):
    """Grey-scale conversion by the channel mean (C = 3 for RGB; any C >= 1 works)."""

    def __init__(self, in_shape):
        super().__init__(in_shape)
        c, h, w = self.in_shape
        self._register("V", helmert_basis(c))
        self._singulars = torch.full((h * w,), 1.0 / math.sqrt(c), dtype=torch.float64)

    @property
    def measurement_shape(self) -> tuple[int, int, int]:
        return (1, self.in_shape[1], self.in_shape[2])

    def Vt(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        coef = torch.einsum("ck,bchw->bkhw", self._get("V", x), x)
        return coef.reshape(x.shape[0], self.D)

    def V(self, v: torch.Tensor) -> torch.Tensor:
        self._check_spec(v, self.D, "V")
        coef = v.reshape(v.shape[0], *self.in_shape)
        return torch.einsum("ck,bkhw->bchw", self._get("V", v), coef)

    def Ut(self, y: torch.Tensor) -> torch.Tensor:
        self._check_y(y)
        return y.reshape(y.shape[0], self.m)

    def U(self, u: torch.Tensor) -> torch.Tensor:
        self._check_spec(u, self.m, "U")
        return u.reshape(u.shape[0], *self.measurement_shape)

    def H(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        return x.mean(dim=1, keepdim=True)

    def Ht(self, y: torch.Tensor) -> torch.Tensor:
        self._check_y(y)
        return y.expand(-1, self.in_shape[0], -1, -1) / self.in_shape[0]

    def to_image(self, y: torch.Tensor) -> torch.Tensor:
        """The grey measurement replicated over the C channels (also the pseudo-inverse)."""
        self._check_y(y)
        return y.expand(-1, self.in_shape[0], -1, -1).clone()
