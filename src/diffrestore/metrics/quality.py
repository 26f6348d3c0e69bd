"""Image-quality metrics: PSNR, PSNR-Y, SSIM, LPIPS (per image), FID and KID (per set of features).

Conventions
-----------
* Images are float tensors in [-1, 1], shape (B, C, H, W) (a single (C, H, W) image is treated as
  B = 1). They are clamped to [-1, 1] and mapped to [0, 1] with ``(x + 1) / 2`` before any metric.
* By default PSNR and SSIM are computed on those float values. ``quantize=True`` first rounds to
  8 bits exactly as saving a PNG does (``image_io.tensor_to_uint8``: ``round((x + 1) * 127.5)``), then
  divides by 255, so the numbers match metrics computed on saved files.
* All arithmetic is in float64; results are float64 tensors of shape (B,) (one value per image).
* FID and KID work on feature matrices (N, D) (e.g. Inception pool features from
  ``evaluation.inception.inception_features``); see :func:`frechet_distance` and
  :func:`kernel_inception_distance`.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "MetricInputError",
    "to_unit_range",
    "psnr",
    "rgb_to_y",
    "psnr_y",
    "ssim",
    "lpips_or_note",
    "full_reference",
    "gaussian_window",
    "feature_statistics",
    "frechet_distance",
    "fid_from_features",
    "polynomial_mmd2_unbiased",
    "kernel_inception_distance",
]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
#: ITU-R BT.601 luma weights for [0, 1] RGB, giving Y in [0, 255] units (studio swing, 16..235)
BT601_Y = (65.481, 128.553, 24.966)
BT601_OFFSET = 16.0


class MetricInputError(ValueError):
    """Inputs a metric cannot compare (shape mismatch, image smaller than the SSIM window, ...)."""


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise MetricInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise MetricInputError(f"{name} must have shape (B, C, H, W) or (C, H, W), got {tuple(x.shape)}")
    return x


def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_batch(x, "x"), _as_batch(y, "y")
    if x.shape != y.shape:
        raise MetricInputError(f"images differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def to_unit_range(x: torch.Tensor, quantize: bool = False) -> torch.Tensor:
    """[-1, 1] float images -> float64 in [0, 1]: clamp, then ``(x + 1) / 2``.

    ``quantize=True`` rounds to 8 bits first, the way ``image_io.tensor_to_uint8`` writes PNGs:
    ``round((clamp(x) + 1) * 127.5) / 255``.
    """
    x = x.detach().to(torch.float64).clamp(-1.0, 1.0)
    if quantize:
        # Same float32 arithmetic as image_io.tensor_to_uint8, so the values are the saved PNG's.
        q = ((x.to(torch.float32) + 1.0) * 127.5).round()
        return q.to(torch.float64) / 255.0
    return (x + 1.0) / 2.0


def psnr(x: torch.Tensor, y: torch.Tensor, *, quantize: bool = False) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, one value per image, shape (B,), float64.

    ``PSNR = 10 * log10(1 / MSE)`` where MSE is the mean over channels and pixels of the squared
    difference of the two images mapped to [0, 1] (clamped; data range 1), computed in float64.
    Identical images give ``inf``. ``quantize=True`` compares the 8-bit (PNG) versions instead.
    """
    x, y = _pair(x, y)
    a, b = to_unit_range(x, quantize), to_unit_range(y, quantize)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return -10.0 * torch.log10(mse)


def rgb_to_y(x: torch.Tensor, *, quantize: bool = False) -> torch.Tensor:
    """BT.601 luma of RGB images in [-1, 1]: (B, H, W) float64 in [0, 255] units.

    ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` with R, G, B in [0, 1] (:func:`to_unit_range`,
    ``quantize=True``: the 8-bit PNG values); Y is not rounded. This is the luma of MATLAB's
    ``rgb2ycbcr``, which super-resolution papers report PSNR on.
    """
    x = _as_batch(x, "x")
    if x.shape[1] != 3:
        raise MetricInputError(f"Y-channel metrics need RGB images, got {x.shape[1]} channel(s)")
    a = to_unit_range(x, quantize)
    r, g, b = BT601_Y
    return BT601_OFFSET + r * a[:, 0] + g * a[:, 1] + b * a[:, 2]


def psnr_y(x: torch.Tensor, y: torch.Tensor, *, quantize: bool = False, crop: int = 0) -> torch.Tensor:
    """PSNR in dB of the BT.601 luma (:func:`rgb_to_y`), one value per image, shape (B,), float64.

    ``10 * log10(255^2 / MSE)`` of the Y planes in [0, 255] units. ``crop`` pixels are removed
    from every border first; the default is no crop (SR papers often crop ``scale`` pixels, which
    changes the number, so a table should say which it uses).
    """
    x, y = _pair(x, y)
    if crop < 0 or 2 * crop >= min(x.shape[-2:]):
        raise MetricInputError(f"crop {crop} does not fit images of {x.shape[-2]}x{x.shape[-1]}")
    a, b = rgb_to_y(x, quantize=quantize), rgb_to_y(y, quantize=quantize)
    if crop:
        a, b = a[:, crop:-crop, crop:-crop], b[:, crop:-crop, crop:-crop]
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(255.0**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian taps ``exp(-k^2 / (2 sigma^2))``, k = -(size//2)..size//2, float64."""
    k = torch.arange(size, dtype=torch.float64) - (size // 2)
    g = torch.exp(-0.5 * (k / sigma) ** 2)
    return g / g.sum()


def _band_matrix(n: int, g: torch.Tensor) -> torch.Tensor:
    """(n - len(g) + 1, n) matrix whose row i holds the taps g at columns i .. i + len(g) - 1, so
    ``M @ v`` is the 'valid' correlation of v with g."""
    k = g.numel()
    rows = torch.arange(n - k + 1, device=g.device)
    m = torch.zeros(n - k + 1, n, dtype=g.dtype, device=g.device)
    m[rows[:, None], rows[:, None] + torch.arange(k, device=g.device)] = g
    return m


def _valid_gaussian_filter(maps: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of every (H, W) plane of (..., H, W), 'valid' region (no padding).

    Done as two banded matrix products (``Gh @ X @ Gw^T``): in float64 on CPU this is several
    times faster than a grouped ``conv2d``, with the same result to rounding.
    """
    h, w = maps.shape[-2:]
    g = g.to(maps)
    return _band_matrix(h, g) @ maps @ _band_matrix(w, g).T


def ssim(x: torch.Tensor, y: torch.Tensor, *, quantize: bool = False) -> torch.Tensor:
    """Structural similarity, one value per image, shape (B,), float64.

    Exactly scikit-image's ``structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=-1)`` on float64 [0, 1] images:

    * images mapped to [0, 1] as in :func:`to_unit_range` (``quantize=True``: 8-bit PNG values);
    * local means / variances / covariance with a normalised Gaussian window of 11 taps,
      sigma 1.5 (separable), population (not sample) covariance;
    * ``C1 = (0.01 * 1)^2``, ``C2 = (0.03 * 1)^2``;
      ``S = (2 mu_x mu_y + C1)(2 cov_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2))``;
    * the SSIM map is kept only where the window fits inside the image ('valid': 5 pixels are
      dropped on each border, no padding), averaged over the pixels of each channel, then the
      per-channel (RGB) values are averaged.

    Images must be at least 11 x 11.
    """
    x, y = _pair(x, y)
    b, _, h, w = x.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise MetricInputError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    g = gaussian_window().to(x.device)
    # Chunks of images bound the float64 working memory (15 maps per RGB image).
    step = max(1, (1 << 21) // (h * w))
    return torch.cat([_ssim_chunk(x[i : i + step], y[i : i + step], g, quantize) for i in range(0, b, step)])


def _ssim_chunk(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, quantize: bool) -> torch.Tensor:
    c = x.shape[1]
    a, bb = to_unit_range(x, quantize), to_unit_range(y, quantize)
    # One filtering pass over the five maps of every channel.
    maps = torch.cat([a, bb, a * a, bb * bb, a * bb], dim=1)
    mu_a, mu_b, e_aa, e_bb, e_ab = _valid_gaussian_filter(maps, g).split(c, dim=1)
    var_a = e_aa - mu_a * mu_a
    var_b = e_bb - mu_b * mu_b
    cov = e_ab - mu_a * mu_b
    c1 = (SSIM_K1 * 1.0) ** 2
    c2 = (SSIM_K2 * 1.0) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(2, 3)).mean(dim=1)


def lpips_or_note(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    """(LPIPS-AlexNet per image pair, None), or (None, "n/a (why; how to get the weights)").

    Computed on the 8-bit (PNG) values of both images (``quantize=True``), so it equals LPIPS of the
    saved files; the network is loaded once per process and device (:func:`lpips.load_lpips`).
    """
    from diffrestore.metrics import lpips as _lpips

    x, y = _pair(x, y)
    try:
        return _lpips.lpips(x, y, quantize=True), None
    except _lpips.LPIPSUnavailable as e:
        return None, f"n/a ({e.note})"
    except ValueError as e:  # too small for the network
        return None, f"n/a ({str(e).splitlines()[0]})"


def full_reference(x_hat: torch.Tensor, ref: torch.Tensor) -> dict:
    """Every full-reference metric of one restored image (batch of 1) against its reference:
    ``psnr``, ``psnr_y`` (BT.601 luma, no border crop), ``ssim`` (float images) and ``lpips`` (8-bit
    images) when its weights are installed, else ``lpips_note`` saying how to get them."""
    out = {
        "psnr": float(psnr(x_hat, ref)[0]),
        "psnr_y": float(psnr_y(x_hat, ref)[0]),
        "ssim": float(ssim(x_hat, ref)[0]),
    }
    value, note = lpips_or_note(x_hat, ref)
    out.update({"lpips": float(value[0])} if value is not None else {"lpips_note": note})
    return out


# ----------------------------------------------------------------------------------------------
# FID


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mean (D,), covariance (D, D)), float64, covariance with N - 1 (as
    ``np.cov(features, rowvar=False)``, like pytorch-fid)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise MetricInputError(f"features must be (N >= 2, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative rounding eigenvalues -> 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:

    ``||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2))``.

    ``tr(sqrtm(sigma1 sigma2))`` is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix ``sqrt(sigma1) sigma2 sqrt(sigma1)`` (same eigenvalues as ``sigma1 sigma2``),
    with symmetric eigendecompositions: exact for covariance matrices, never complex, and about 10x
    faster than ``scipy.linalg.sqrtm`` on 2048-d Inception statistics. Singular covariances (fewer
    images than dimensions) need no offset: their zero eigenvalues contribute zero.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise MetricInputError(f"means differ in shape: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise MetricInputError(f"covariances must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all() and np.isfinite(mu1).all() and np.isfinite(mu2).all()):
        raise ValueError("FID: non-finite feature statistics")
    diff = mu1 - mu2
    r1 = _psd_sqrt(sigma1)
    m = r1 @ sigma2 @ r1
    trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def fid_from_features(features1, features2) -> float:
    """FID between two feature sets (N1, D), (N2, D): :func:`frechet_distance` of their
    :func:`feature_statistics`."""
    mu1, s1 = feature_statistics(features1)
    mu2, s2 = feature_statistics(features2)
    return frechet_distance(mu1, s1, mu2, s2)


# ----------------------------------------------------------------------------------------------
# KID


def polynomial_mmd2_unbiased(x, y) -> float:
    """Unbiased MMD^2 between samples x (m, D) and y (n, D) with the polynomial kernel
    ``k(a, b) = (a . b / D + 1) ** 3``:

    ``sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
    - 2 sum_{i, j} k(x_i, y_j) / (m n)``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    if m < 2 or n < 2 or y.shape[1] != d:
        raise MetricInputError(f"KID needs (>= 2, D) feature sets with the same D, got {x.shape}, {y.shape}")
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2.0 * kxy.sum() / (m * n)
    )


def kernel_inception_distance(
    features1, features2, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance, as clean-fid / torch-fidelity compute it. Returns (mean, std).

    ``m = min(N1, N2, subset_size)``; for each of ``num_subsets`` subsets, with
    ``rng = numpy.random.default_rng(seed)``, draw ``i1 = rng.choice(N1, m, replace=False)`` then
    ``i2 = rng.choice(N2, m, replace=False)`` and compute :func:`polynomial_mmd2_unbiased`
    (degree 3, gamma 1/D, coef 1) of ``features1[i1]`` vs ``features2[i2]``. The result is the mean
    and the (population) standard deviation over subsets. When ``m`` equals both set sizes every
    subset is the full set (the MMD does not depend on order), so ``num_subsets`` does not matter.
    """
    f1 = np.asarray(features1, dtype=np.float64)
    f2 = np.asarray(features2, dtype=np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise MetricInputError(f"KID needs (N, D) feature sets with the same D, got {f1.shape}, {f2.shape}")
    if num_subsets < 1:
        raise MetricInputError("num_subsets must be >= 1")
    m = min(f1.shape[0], f2.shape[0], subset_size)
    if m < 2:
        raise MetricInputError("KID needs at least 2 samples per set")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(num_subsets):
        i1 = rng.choice(f1.shape[0], m, replace=False)
        i2 = rng.choice(f2.shape[0], m, replace=False)
        vals.append(polynomial_mmd2_unbiased(f1[i1], f2[i2]))
    v = np.asarray(vals)
    return float(v.mean()), float(v.std())
