"""Inpainting: H = diag(mask), a pixel is either observed exactly or missing.

The measurement is the full-size masked image ``(C, H, W)`` with zeros where pixels are missing
(``m = D``). ``U = V`` is the permutation that lists the kept entries first (in ``(c, i, j)`` order),
then the missing ones; ``singulars`` are 1 on kept entries and 0 on missing ones. ``measure`` masks
the noise too, so missing entries of ``y`` stay exactly 0. The mask is shared by all channels
(``(H, W)``) or given per channel (``(C, H, W)``).
"""

from __future__ import annotations

import torch

from .base import ImageSizeError, LinearOperator


def random_mask(size, keep: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random pixel mask: bool tensor of ``size`` ((H, W), or (C, H, W) for a per-channel mask)
    with exactly ``round(keep * numel)`` True (kept) entries, drawn from ``generator`` (CPU)."""
    size = tuple(int(s) for s in size)
    keep = float(keep)
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep fraction must be in [0, 1], got {keep}")
    n = 1
    for s in size:
        n *= s
    order = torch.randperm(n, generator=generator, device=generator.device if generator is not None else "cpu")
    mask = torch.zeros(n, dtype=torch.bool, device=order.device)
    mask[order[: round(keep * n)]] = True
    return mask.view(size).cpu()


def mask_from_image(img) -> torch.Tensor:
    """A bool mask from a mask tensor or mask *image*: entries > 0 are observed, so 0/1 masks, bool
    masks and images in [-1, 1] (white = observed, black = missing) all work. Accepts (H, W),
    (C, H, W) or (1, C, H, W); channels that are all identical collapse to one shared (H, W) mask."""
    m = torch.as_tensor(img).detach().cpu()
    while m.dim() > 3 and m.shape[0] == 1:
        m = m[0]
    m = m if m.dtype == torch.bool else m > 0
    if m.dim() == 3 and bool((m == m[:1]).all()):
        m = m[0]
    return m


class Inpainting(LinearOperator):
    """Keep the pixels where ``mask`` is true (or 1), zero the rest.

    Args:
        in_shape: (C, H, W).
        mask: bool or 0/1 tensor of shape (H, W) / (1, H, W) (shared by the channels) or (C, H, W).
        fill: value ``to_image`` puts in missing pixels (default 0, mid-grey in [-1, 1]).
    """

    def __init__(self, in_shape, mask: torch.Tensor, fill: float = 0.0):
        super().__init__(in_shape)
        c, h, w = self.in_shape
        mask = torch.as_tensor(mask).detach().cpu()
        while mask.dim() > 3 and mask.shape[0] == 1:
            mask = mask[0]
        if mask.dim() == 2:
            mask = mask[None]
        if mask.dim() != 3 or tuple(mask.shape[-2:]) != (h, w) or mask.shape[0] not in (1, c):
            raise ImageSizeError(
                f"inpainting mask of shape {tuple(mask.shape)} does not fit images of {c}x{h}x{w} (CxHxW); "
                f"expected (H, W) or (C, H, W)"
            )
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("inpainting mask must be boolean or contain only 0 and 1")
            mask = mask != 0
        self.fill = float(fill)
        self.mask = mask.clone()  # (1 or C, H, W) bool, CPU
        self._register("mask_f", mask.to(torch.float64))
        full = mask.expand(c, h, w).reshape(-1)
        idx = torch.arange(self.D)
        perm = torch.cat([idx[full], idx[~full]])
        self.kept = int(full.sum())
        self._register("perm", perm)
        self._register("inv_perm", torch.argsort(perm))
        self._singulars = torch.cat([torch.ones(self.kept), torch.zeros(self.D - self.kept)]).to(torch.float64)

    @property
    def measurement_shape(self) -> tuple[int, int, int]:
        return self.in_shape

    def _permute(self, z: torch.Tensor) -> torch.Tensor:
        z = z.reshape(z.shape[0], self.D)
        return z.index_select(1, self._get("perm", z))

    def _unpermute(self, v: torch.Tensor) -> torch.Tensor:
        return v.index_select(1, self._get("inv_perm", v)).reshape(v.shape[0], *self.in_shape)

    def Vt(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        return self._permute(x)

    def V(self, v: torch.Tensor) -> torch.Tensor:
        self._check_spec(v, self.D, "V")
        return self._unpermute(v)

    def Ut(self, y: torch.Tensor) -> torch.Tensor:
        self._check_y(y)
        return self._permute(y)

    def U(self, u: torch.Tensor) -> torch.Tensor:
        self._check_spec(u, self.m, "U")
        return self._unpermute(u)

    def H(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        return x * self._get("mask_f", x)

    def Ht(self, y: torch.Tensor) -> torch.Tensor:
        self._check_y(y)
        return y * self._get("mask_f", y)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return self.Ht(y)  # the SVD pseudo-inverse of a 0/1 diagonal is itself

    def measure(self, x: torch.Tensor, sigma_y: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """y = mask * (x + sigma_y * n): noise only on observed pixels; missing ones stay 0."""
        y = self.H(x)
        if sigma_y > 0:
            y = y + sigma_y * self._noise(y, generator) * self._get("mask_f", y)
        return y

    def to_image(self, y: torch.Tensor) -> torch.Tensor:
        """The measurement with missing pixels set to ``fill`` (visible as flat mid-grey by default)."""
        self._check_y(y)
        m = self._get("mask_f", y)
        return y * m + self.fill * (1 - m)

    def __repr__(self) -> str:
        return f"Inpainting(in_shape={self.in_shape}, kept={self.kept}/{self.D})"
