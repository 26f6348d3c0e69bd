"""Separable per-channel operators H = A_h (x) A_w, i.e. ``Y_c = A_h X_c A_w^T`` for each channel.

Shared by super-resolution (``A`` is ``n/s x n``) and blur (``A`` is ``n x n``). With the 1-D SVDs
``A_h = U_h S_h V_h^T`` and ``A_w = U_w S_w V_w^T`` (full ``V``), the 2-D spectral coefficients of a
channel are ``V_h^T X V_w`` (``H x W``); the observed ones are the top-left ``mh x mw`` block, with
singular values ``s_h[i] * s_w[j]``.

Layout of ``Vt(x)`` (B, D): first the observed block of every channel, channel-outer then row-major
``(c, i, j)``, pairing with ``singulars`` and with ``Ut(y)`` (``U_h^T Y_c U_w`` flattened the same
way); then the unobserved coefficients (rows ``>= mh`` or columns ``>= mw``), in ``(c, i, j)`` order.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from .base import DEFAULT_REL_THRESHOLD, ImageSizeError, LinearOperator


#: 1-D SVDs kept for reuse, keyed by the matrix's shape and bytes (at 4000 px one costs ~20 s)
_SVD_CACHE: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
_SVD_CACHE_SIZE = 4


def svd_1d(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, s, V)`` of a float64 CPU matrix (full ``U`` and ``V``), cached: operators built again for
    the same size (every image of an evaluation, both axes of a square image) reuse the factors."""
    A = A.detach().cpu().to(torch.float64).contiguous()
    key = (tuple(A.shape), hashlib.blake2b(A.numpy(), digest_size=16).digest())
    hit = _SVD_CACHE.get(key)
    if hit is None:
        U, s, Vh = torch.linalg.svd(A, full_matrices=True)
        hit = _SVD_CACHE[key] = (U, s, Vh.mT)
        while len(_SVD_CACHE) > _SVD_CACHE_SIZE:
            _SVD_CACHE.popitem(last=False)
    _SVD_CACHE.move_to_end(key)
    return hit


class SeparableOperator(LinearOperator):
    """``H`` applies ``A_h`` along rows (height) and ``A_w`` along columns (width) of each channel.

    Args:
        in_shape: (C, H, W).
        A_h: (mh, H) matrix acting on the height axis; A_w: (mw, W) matrix acting on the width axis.
        threshold: singular values at or below ``threshold * max(s)`` (2-D values ``s_h * s_w``)
            are reported as exactly 0.
    """

    def __init__(self, in_shape, A_h: torch.Tensor, A_w: torch.Tensor, threshold: float = DEFAULT_REL_THRESHOLD):
        super().__init__(in_shape)
        c, h, w = self.in_shape
        A_h = torch.as_tensor(A_h, dtype=torch.float64)
        A_w = torch.as_tensor(A_w, dtype=torch.float64)
        if A_h.dim() != 2 or A_h.shape[1] != h or A_w.dim() != 2 or A_w.shape[1] != w:
            raise ImageSizeError(
                f"1-D matrices {tuple(A_h.shape)} and {tuple(A_w.shape)} do not fit images of height {h}, width {w}"
            )
        mh, mw = A_h.shape[0], A_w.shape[0]
        if mh > h or mw > w:
            raise ValueError("SeparableOperator needs A_h, A_w with no more rows than columns")
        self._mh, self._mw = int(mh), int(mw)
        self._register("A_h", A_h)
        self._register("A_w", A_w)
        s_parts = []
        for name, A in (("h", A_h), ("w", A_w)):
            U, s, V = svd_1d(A)
            self._register(f"U_{name}", U)
            self._register(f"V_{name}", V)
            s_parts.append(s)
        s2 = (s_parts[0][:, None] * s_parts[1][None, :]).reshape(-1).repeat(c)
        self._singulars = self._apply_threshold(s2, threshold)
        self._identity_perm = (mh == h and mw == w)

    # --- shapes -------------------------------------------------------------------------------
    @property
    def measurement_shape(self) -> tuple[int, int, int]:
        return (self.in_shape[0], self._mh, self._mw)

    # --- SVD parts ----------------------------------------------------------------------------
    def Vt(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        z = self._get("V_h", x).mT @ x @ self._get("V_w", x)
        if self._identity_perm:
            return z.reshape(x.shape[0], self.D)
        # observed block, then per channel the rest of rows < mh and the rows >= mh: (c, i, j) order
        B, C, mh, mw = x.shape[0], self.in_shape[0], self._mh, self._mw
        rest = torch.cat([z[:, :, :mh, mw:].reshape(B, C, -1), z[:, :, mh:, :].reshape(B, C, -1)], dim=2)
        return torch.cat([z[:, :, :mh, :mw].reshape(B, -1), rest.reshape(B, -1)], dim=1)

    def V(self, v: torch.Tensor) -> torch.Tensor:
        self._check_spec(v, self.D, "V")
        if self._identity_perm:
            z = v.reshape(v.shape[0], *self.in_shape)
        else:
            B, (C, H, W), mh, mw = v.shape[0], self.in_shape, self._mh, self._mw
            z = v.new_empty(B, C, H, W)
            z[:, :, :mh, :mw] = v[:, : C * mh * mw].reshape(B, C, mh, mw)
            rest = v[:, C * mh * mw :].reshape(B, C, -1)
            z[:, :, :mh, mw:] = rest[:, :, : mh * (W - mw)].reshape(B, C, mh, W - mw)
            z[:, :, mh:, :] = rest[:, :, mh * (W - mw) :].reshape(B, C, H - mh, W)
        return self._get("V_h", z) @ z @ self._get("V_w", z).mT

    def Ut(self, y: torch.Tensor) -> torch.Tensor:
        self._check_y(y)
        return (self._get("U_h", y).mT @ y @ self._get("U_w", y)).reshape(y.shape[0], self.m)

    def U(self, u: torch.Tensor) -> torch.Tensor:
        self._check_spec(u, self.m, "U")
        z = u.reshape(u.shape[0], *self.measurement_shape)
        return self._get("U_h", z) @ z @ self._get("U_w", z).mT

    # --- direct maps (exact, not thresholded) -------------------------------------------------
    def H(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        return self._get("A_h", x) @ x @ self._get("A_w", x).mT

    def Ht(self, y: torch.Tensor) -> torch.Tensor:
        self._check_y(y)
        return self._get("A_h", y).mT @ y @ self._get("A_w", y)

    # --- 1-D factors (float64, CPU), for inspection and tests -----------------------------------
    @property
    def matrices_1d(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 1-D matrices (A_h, A_w) as float64 CPU tensors."""
        return self._f64["A_h"], self._f64["A_w"]
