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
* ``singulars -> (m,)``: non-negative, float64 on the CPU (use ``singulars_as(x)`` for a copy on
  ``x``'s device and dtype); values at or below ``threshold`` are reported as exactly 0 so that
  methods treat those directions as unobserved instead of dividing by a tiny number. The order of
  the first ``m`` entries is not sorted.

Threshold convention. Operators whose spectrum decays (blur, bicubic SR) take a constructor
parameter ``threshold`` that is *relative* to their largest singular value (default
``DEFAULT_REL_THRESHOLD = 1e-3``); it is kept as ``rel_threshold`` and the instance attribute
``threshold`` holds the resulting *absolute* cut-off ``rel_threshold * max(s)``. Block averaging
uses the default (all its singular values are equal, so nothing is ever cut); identity, inpainting
and colorization have exactly known 0/1/constant spectra and ``threshold = 0``.

``H``/``Ht`` are always the exact operator and its adjoint (subclasses use direct convolutions,
pooling or small matmuls); only the spectral view (``singulars`` and therefore ``pinv``) is
thresholded, so ``pinv`` is the truncated pseudo-inverse.

The operator is built for one image shape ``in_shape = (C, H, W)`` (its SVD factors depend on the
size); other shapes raise ``ImageSizeError``. Factor matrices are small (1-D, n x n) and are kept in
float64 on the CPU, with copies cached per (device, dtype) of the inputs they meet.

Nothing here forms a dense D x D matrix; ``dense_matrix`` exists only for tests on tiny sizes.
"""

from __future__ import annotations

import torch

#: Default relative threshold on singular values (fraction of the largest one).
DEFAULT_REL_THRESHOLD = 1e-3


class ImageSizeError(ValueError):
    """The image size is one the operator cannot take (e.g. not divisible by the SR factor)."""


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


class LinearOperator:
    """Base class. Subclasses implement the SVD parts; H, Ht and pinv follow from them but
    subclasses may override them with a faster direct form."""

    #: Absolute cut-off: singular values at or below this are reported as exactly zero.
    threshold: float = 0.0

    def __init__(self, in_shape: tuple[int, int, int]):
        if len(tuple(in_shape)) != 3:
            raise ImageSizeError(f"in_shape must be (C, H, W), got {tuple(in_shape)}")
        self.in_shape = tuple(int(s) for s in in_shape)
        if min(self.in_shape) < 1:
            raise ImageSizeError(f"in_shape must be positive, got {self.in_shape}")
        self._f64: dict[str, torch.Tensor] = {}  # float64 / int64 CPU masters
        self._cache: dict[tuple, torch.Tensor] = {}  # (name, device, dtype) -> copy

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
        """(m,) float64 on the CPU: what the subclass's constructor stored in ``_singulars`` (or override)."""
        s = self.__dict__.get("_singulars")
        if s is None:
            raise NotImplementedError(f"{type(self).__name__} defines no singular values")
        return s

    def singulars_as(self, t: torch.Tensor) -> torch.Tensor:
        """``singulars`` on ``t``'s device and dtype (cached)."""
        key = ("__singulars__", t.device, t.dtype)
        if key not in self._cache:
            self._cache[key] = self.singulars.to(device=t.device, dtype=t.dtype)
        return self._cache[key]

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
        return self.U(v * self.singulars_as(v))

    def Ht(self, y: torch.Tensor) -> torch.Tensor:
        u = self.Ut(y) * self.singulars_as(y)
        return self.V(self._pad_spectral(u))

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """Truncated pseudo-inverse V diag(1/s, 0 where s == 0) U^T y, an image batch."""
        s = self.singulars_as(y)
        u = self.Ut(y)
        inv = torch.where(s > 0, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
        return self.V(self._pad_spectral(u * inv))

    def _pad_spectral(self, u: torch.Tensor) -> torch.Tensor:
        """Extend (B, m) spectral coefficients with zeros to (B, D)."""
        if u.shape[1] == self.D:
            return u
        return torch.cat([u, u.new_zeros(u.shape[0], self.D - u.shape[1])], dim=1)

    def measure(self, x: torch.Tensor, sigma_y: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """y = H x + sigma_y * n, n ~ N(0, I), drawn from ``generator``."""
        y = self.H(x)
        if sigma_y > 0:
            y = y + sigma_y * self._noise(y, generator)
        return y

    @staticmethod
    def _noise(y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        dev = generator.device if generator is not None else y.device
        return torch.randn(y.shape, generator=generator, dtype=y.dtype, device=dev).to(y.device)

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
        """Raise ImageSizeError unless an image of ``shape`` ((C, H, W) or (B, C, H, W)) fits."""
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (3, 4) or shape[-3:] != self.in_shape:
            raise ImageSizeError(
                f"{type(self).__name__} was built for images of {_fmt_shape(self.in_shape)} (CxHxW), "
                f"got {_fmt_shape(shape)}; build the operator for this image size"
            )

    # --- helpers for subclasses ---------------------------------------------------------------
    def _register(self, name: str, t: torch.Tensor) -> None:
        """Keep a factor as a CPU master (float64, or int64 for index tensors)."""
        t = t.detach().cpu()
        self._f64[name] = t.to(torch.float64) if t.is_floating_point() else t.to(torch.int64)
        self._cache = {k: v for k, v in self._cache.items() if k[0] != name}

    def _get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Factor ``name`` on ``like``'s device (and dtype, for floating factors), cached."""
        master = self._f64[name]
        dtype = like.dtype if master.is_floating_point() else master.dtype
        key = (name, like.device, dtype)
        t = self._cache.get(key)
        if t is None:
            t = master.to(device=like.device, dtype=dtype)
            self._cache[key] = t
        return t

    def _check_x(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ImageSizeError(
                f"{type(self).__name__} expects an image batch (B, C, H, W), got shape {tuple(x.shape)}"
            )
        if tuple(x.shape[1:]) != self.in_shape:
            self.check_size(tuple(x.shape))

    def _check_y(self, y: torch.Tensor) -> None:
        if y.dim() != 1 + len(self.measurement_shape) or tuple(y.shape[1:]) != tuple(self.measurement_shape):
            raise ImageSizeError(
                f"{type(self).__name__} expects measurements of shape (B, {_fmt_shape(self.measurement_shape)}), "
                f"got {tuple(y.shape)}"
            )

    def _check_spec(self, v: torch.Tensor, n: int, what: str) -> None:
        if v.dim() != 2 or v.shape[1] != n:
            raise ValueError(f"{type(self).__name__}.{what} expects (B, {n}) spectral coefficients, got {tuple(v.shape)}")

    def _apply_threshold(self, s: torch.Tensor, rel_threshold: float) -> torch.Tensor:
        """Set ``self.threshold`` = rel * max(s) and return s with values <= it set to exactly 0."""
        rel_threshold = float(rel_threshold)
        if not rel_threshold >= 0:
            raise ValueError(f"threshold must be >= 0 (relative to the largest singular value), got {rel_threshold}")
        self.rel_threshold = rel_threshold
        smax = float(s.max()) if s.numel() else 0.0
        self.threshold = rel_threshold * smax
        return torch.where(s > self.threshold, s, torch.zeros_like(s))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_shape={self.in_shape})"
