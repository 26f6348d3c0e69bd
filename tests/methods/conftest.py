"""Test helpers for the methods: operators laid out exactly like the official DDRM ``H_functions``
(built from the SVD factors stored in the golden references), a prior that replays recorded network
outputs, and fixtures that load the golden DDRM references.

The layouts below were written from the documented behaviour of the official classes
(bahjat-kawar/ddrm ``functions/svd_replacement.py``):

* ``Denoising``: identity everywhere, singulars all 1.
* ``SuperResolution(ratio r)``: the image is cut into r x r patches (patch index row-major,
  pixels row-major inside a patch); every patch is multiplied by ``V_small^T`` (r^2 x r^2, the SVD of
  the 1 x r^2 averaging row). Spectral layout: first the coefficient 0 of every (channel, patch) in
  (channel, patch) order -- these pair with the singulars -- then coefficients 1..r^2-1 with the
  coefficient index innermost. ``U = U_small[0, 0]`` (a sign).
* ``Deblurring``: per channel ``V_small^T X V_small`` flattened row-major, entries reordered by the
  stored permutation ``_perm`` (descending 2-D singular values), then laid out channel-innermost
  (pixel-major); U the same with ``U_small``. ``singulars()`` repeats the per-pixel values per
  channel (channel-outermost), i.e. NOT in the same layout as U/V -- the official defect the golden
  README describes; we reproduce it because the reference was recorded with it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffrestore.operators.base import LinearOperator
from diffrestore.priors.base import PixelPrior, alphas_cumprod_from_betas, linear_betas


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class OfficialDenoising(LinearOperator):
    def __init__(self, in_shape=(3, 64, 64)):
        super().__init__(in_shape)
        self._s = torch.ones(self.D)

    @property
    def measurement_shape(self):
        return (self.D,)

    @property
    def singulars(self):
        return self._s

    def Vt(self, x):
        return x.reshape(x.shape[0], -1)

    def V(self, v):
        return v.reshape(v.shape[0], *self.in_shape)

    def Ut(self, y):
        return y.reshape(y.shape[0], -1)

    def U(self, u):
        return u.reshape(u.shape[0], -1)


class OfficialSuperResolution(LinearOperator):
    def __init__(self, V_small, U_small, singulars_small, ratio, in_shape=(3, 64, 64)):
        super().__init__(in_shape)
        self.r = int(ratio)
        c, h, w = self.in_shape
        self.yh, self.yw = h // self.r, w // self.r
        self.n = self.yh * self.yw
        self.V_small = V_small.float()
        self.u = float(U_small.reshape(-1)[0])
        self._s = singulars_small.float().repeat(c * self.n)

    @property
    def measurement_shape(self):
        return (self.in_shape[0] * self.n,)

    @property
    def singulars(self):
        return self._s

    def Vt(self, x):
        B = x.shape[0]
        c, r = self.in_shape[0], self.r
        p = x.reshape(B, c, self.yh, r, self.yw, r).permute(0, 1, 2, 4, 3, 5).reshape(B, c, self.n, r * r)
        coef = p @ self.V_small.to(p)  # row-vector form of V_small^T @ patch
        return torch.cat([coef[..., 0].reshape(B, -1), coef[..., 1:].reshape(B, -1)], dim=1)

    def V(self, v):
        B = v.shape[0]
        c, r = self.in_shape[0], self.r
        k = c * self.n
        coef = torch.cat([v[:, :k].reshape(B, c, self.n, 1), v[:, k:].reshape(B, c, self.n, r * r - 1)], dim=3)
        p = coef @ self.V_small.t().to(v)  # V_small @ coef per patch
        return p.reshape(B, c, self.yh, self.yw, r, r).permute(0, 1, 2, 4, 3, 5).reshape(B, *self.in_shape)

    def Ut(self, y):
        return self.u * y.reshape(y.shape[0], -1)

    def U(self, u):
        return self.u * u.reshape(u.shape[0], -1)


class OfficialDeblurring(LinearOperator):
    def __init__(self, U_small, V_small, perm, singulars_full, in_shape=(3, 64, 64)):
        super().__init__(in_shape)
        self.U_small, self.V_small = U_small.float(), V_small.float()
        self.perm = perm.long()
        self._s = singulars_full.float()

    @property
    def measurement_shape(self):
        return (self.D,)

    @property
    def singulars(self):
        return self._s

    def _fwd(self, M, x):  # M^T X M per channel, permuted, channel-innermost
        B = x.shape[0]
        c, h, w = self.in_shape
        M = M.to(x)
        z = (M.t() @ x.reshape(B, c, h, w) @ M).reshape(B, c, h * w)
        return z[:, :, self.perm.to(x.device)].permute(0, 2, 1).reshape(B, -1)

    def _inv(self, M, v):  # inverse of _fwd
        B = v.shape[0]
        c, h, w = self.in_shape
        M = M.to(v)
        z = torch.zeros(B, h * w, c, dtype=v.dtype, device=v.device)
        z[:, self.perm.to(v.device), :] = v.reshape(B, h * w, c)
        z = z.permute(0, 2, 1).reshape(B, c, h, w)
        return M @ z @ M.t()

    def Vt(self, x):
        return self._fwd(self.V_small, x)

    def V(self, v):
        return self._inv(self.V_small, v)

    def Ut(self, y):
        return self._fwd(self.U_small, y)

    def U(self, u):
        return self._inv(self.U_small, u).reshape(u.shape[0], -1)


def official_operator(ref: dict) -> LinearOperator:
    deg, Hi = ref["deg"], ref["H_internals"]
    if deg == "deno":
        return OfficialDenoising()
    if deg.startswith("sr"):
        return OfficialSuperResolution(Hi["V_small"], Hi["U_small"], Hi["singulars_small"], int(deg[2:]))
    if deg.startswith("deblur"):
        return OfficialDeblurring(Hi["U_small"], Hi["V_small"], Hi["_perm"], Hi["singulars()"])
    raise ValueError(deg)


def reddiff_official_operator(ref: dict) -> LinearOperator:
    """The operator of a RED-diff-repository reference (ΠGDM / RED-diff goldens): DDRM's layouts above,
    with that repository's ``H_pinv``, which passes spectral entries of zero singular value through
    undivided instead of zeroing them."""
    Hi = dict(ref["H_internals"])
    Hi["singulars()"] = Hi["singulars"]
    op = official_operator({**ref, "H_internals": Hi})

    def pinv(y):
        u = op.Ut(y)
        s = op.singulars.to(u)
        u = torch.where(s > 0, u / torch.where(s > 0, s, torch.ones_like(s)), u)
        return op.V(op._pad_spectral(u))

    op.pinv = pinv
    return op


class ReplayPrior(PixelPrior):
    """Returns the recorded eps (first 3 of 6 channels) of call i and records how far its inputs
    were from the recorded ones (relative L2 of x_in; exact t)."""

    def __init__(self, model_calls):
        super().__init__(alphas_cumprod_from_betas(linear_betas()))
        self.calls = model_calls
        self.i = 0
        self.x_errors: list[float] = []
        self.t_seen: list[torch.Tensor] = []

    def eps(self, x_t, t):
        call = self.calls[self.i]
        self.i += 1
        self.x_errors.append(rel_l2(x_t, call["x_in"]))
        self.t_seen.append(t.detach().cpu().clone())
        return call["out"][:, :3].to(x_t)


class OraclePrior(PixelPrior):
    """eps that is exact for a known clean image x0: eps = (x_t - sqrt(a) x0) / sqrt(1 - a)."""

    def __init__(self, x0):
        super().__init__(alphas_cumprod_from_betas(linear_betas()))
        self.x0 = x0

    def eps(self, x_t, t):
        a = self.alphas_cumprod.to(x_t.device)[t.long()].view(-1, 1, 1, 1).double()
        return ((x_t.double() - a.sqrt() * self.x0.double()) / (1 - a).sqrt()).to(x_t.dtype)


def golden_loader(shared: Path, method: str, weights_only: bool = True, filename: str = "ref_{}.pt"):
    """``load(name)`` of ``../shared/golden/<method>/<filename with name>`` (cached); skips when absent."""
    folder = shared / "golden" / method
    if not folder.is_dir():
        pytest.skip(f"golden {method} references not found at {folder}")
    cache: dict[str, dict] = {}

    def load(name: str) -> dict:
        if name not in cache:
            cache[name] = torch.load(folder / filename.format(name), weights_only=weights_only, map_location="cpu")
        return cache[name]

    load.folder = folder
    return load


@pytest.fixture(scope="session")
def golden_ddrm(shared: Path):
    return golden_loader(shared, "ddrm", weights_only=False)


@pytest.fixture(scope="session")
def golden_pigdm(shared: Path):
    """Loader of the ΠGDM (``name`` = ``pigdm_<deg>``) and RED-diff (``reddiff/reddiff_<deg>``) goldens."""
    return golden_loader(shared, "pigdm", filename="{}.pt")


@pytest.fixture(scope="session")
def ddrm_helpers():
    """The helpers above, for test modules (conftest modules are not imported by name)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        rel_l2=rel_l2,
        official_operator=official_operator,
        reddiff_official_operator=reddiff_official_operator,
        ReplayPrior=ReplayPrior,
        OraclePrior=OraclePrior,
        OfficialDenoising=OfficialDenoising,
        OfficialSuperResolution=OfficialSuperResolution,
        OfficialDeblurring=OfficialDeblurring,
    )


# --- official DDNM layouts (wyhuai/DDNM ``functions/svd_operators.py``) -------------------------------
# DDNM's SuperResolution, Deblurring and Denoising lay out their SVD like DDRM's classes above. Its
# DDNM+ ``Lambda_noise`` puts pixels of z and eps on the spectral rows by a plain reordering, which is
# each layout with the rotation left out; ``spectral_pixel_order`` gives it (what ddnm.restore reads).


def _layout_order(unrotated: LinearOperator) -> torch.Tensor:
    """Vt of an operator whose small rotations are identities, applied to the pixel indices."""
    idx = torch.arange(unrotated.D, dtype=torch.float64).reshape(1, *unrotated.in_shape)
    return unrotated.Vt(idx).reshape(-1).round().long()


class OfficialColorization(LinearOperator):
    """Per pixel, the needle (R, G, B) times ``V_small^T``; spectral layout coefficient-major
    (all pixels' coefficient 0 first: these pair with the singulars), ``U = U_small[0, 0]``."""

    def __init__(self, V_small, U_small, singulars_small, in_shape=(3, 64, 64)):
        super().__init__(in_shape)
        c, h, w = self.in_shape
        self.V_small = V_small.float()
        self.u = float(U_small.reshape(-1)[0])
        self._s = singulars_small.float().repeat(h * w)
        self.spectral_pixel_order = torch.arange(self.D)  # coefficient k of pixel p <-> channel k of p

    @property
    def measurement_shape(self):
        return (self.in_shape[1] * self.in_shape[2],)

    @property
    def singulars(self):
        return self._s

    def Vt(self, x):
        B, c = x.shape[0], self.in_shape[0]
        coef = x.reshape(B, c, -1).transpose(1, 2) @ self.V_small.to(x)
        return coef.transpose(1, 2).reshape(B, -1)

    def V(self, v):
        B, c = v.shape[0], self.in_shape[0]
        needles = v.reshape(B, c, -1).transpose(1, 2) @ self.V_small.t().to(v)
        return needles.transpose(1, 2).reshape(B, *self.in_shape)

    def Ut(self, y):
        return self.u * y.reshape(y.shape[0], -1)

    def U(self, u):
        return self.u * u.reshape(u.shape[0], -1)


class OfficialInpainting(OfficialDenoising):
    """Vector index ``3 * pixel + channel``; V^T lists the kept indices, then the missing ones; U = I."""

    def __init__(self, kept_indices, missing_indices, in_shape=(3, 64, 64)):
        super().__init__(in_shape)
        c = self.in_shape[0]
        hw = self.D // c
        idx = torch.cat([kept_indices.long(), missing_indices.long()])
        self.spectral_pixel_order = (idx % c) * hw + idx // c  # flat (c, h, w) index of each row
        self._s = torch.ones(kept_indices.numel())

    @property
    def measurement_shape(self):
        return (self._s.numel(),)

    def Vt(self, x):
        return x.reshape(x.shape[0], -1)[:, self.spectral_pixel_order.to(x.device)]

    def V(self, v):
        out = torch.zeros_like(v)
        out[:, self.spectral_pixel_order.to(v.device)] = v
        return out.reshape(v.shape[0], *self.in_shape)


def official_ddnm_operator(ref: dict):
    """(operator, lambda_singulars or None) of a golden DDNM reference, from its stored factors."""
    kind, Ai = ref["A_class"], ref["A_internals"]
    if kind == "Denoising":
        return OfficialDenoising(), None
    if kind == "Inpainting":
        return OfficialInpainting(Ai["kept_indices"], Ai["missing_indices"]), None
    if kind == "Colorization":
        return OfficialColorization(Ai["V_small"], Ai["U_small"], Ai["singulars_small"]), None
    if kind == "SuperResolution":
        r = int(ref["A_attrs"]["ratio"])
        op = OfficialSuperResolution(Ai["V_small"], Ai["U_small"], Ai["singulars_small"], r)
        op.spectral_pixel_order = _layout_order(OfficialSuperResolution(torch.eye(r * r), Ai["U_small"], Ai["singulars_small"], r))
        return op, None
    if kind == "Deblurring":
        op = OfficialDeblurring(Ai["U_small"], Ai["V_small"], Ai["_perm"], Ai["singulars()"])
        eye = torch.eye(Ai["V_small"].shape[0])
        op.spectral_pixel_order = _layout_order(OfficialDeblurring(eye, eye, Ai["_perm"], Ai["singulars()"]))
        # its Lambda / Lambda_noise use the unthresholded values in the U/V (pixel-major) layout
        return op, Ai["_singulars_orig"].repeat_interleave(op.in_shape[0])
    raise ValueError(kind)


@pytest.fixture(scope="session")
def golden_ddnm(shared: Path):
    return golden_loader(shared, "ddnm")


@pytest.fixture(scope="session")
def ddnm_helpers(ddrm_helpers):
    from types import SimpleNamespace

    return SimpleNamespace(**vars(ddrm_helpers), official_ddnm_operator=official_ddnm_operator)
