"""PSNR / SSIM against scikit-image; FID against closed forms; KID against a direct double loop."""


import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffrestore.metrics.quality import (
    MetricInputError,
    fid_from_features,
    frechet_distance,
    kernel_inception_distance,
    polynomial_mmd2_unbiased,
    psnr,
    ssim,
)
from diffrestore.image_io import tensor_to_uint8, uint8_to_tensor


def _sk_ssim(a, b, data_range=1.0):
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range, channel_axis=-1
    )


def _unit_hwc(x):
    """[-1, 1] (3, H, W) tensor -> float64 (H, W, 3) in [0, 1], clamped (the documented mapping)."""
    return ((x.double().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def _astronaut_pairs():
    img = uint8_to_tensor(skdata.astronaut())  # (3, 512, 512) in [-1, 1]
    g = torch.Generator().manual_seed(1)
    crops = torch.stack([img[:, 0:96, 0:128], img[:, 200:296, 150:278], img[:, 400:496, 300:428]])
    # a blurred (box 3x3), a noisy and an out-of-range (to exercise clamping) version
    blurred = torch.nn.functional.avg_pool2d(crops, 3, stride=1, padding=1, count_include_pad=False)
    noisy = crops + 0.1 * torch.randn(crops.shape, generator=g)
    return crops, torch.cat([blurred[:1], noisy[1:2], (crops[2:] * 1.3 + 0.05)])


def test_ssim_psnr_match_skimage_random():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 37, 52, generator=g, dtype=torch.float64) * 2 - 1
    y = x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)  # partly outside [-1, 1]
    s, p = ssim(x, y), psnr(x, y)
    assert s.shape == (4,) and s.dtype == torch.float64 and p.shape == (4,)
    for i in range(4):
        a, b = _unit_hwc(x[i]), _unit_hwc(y[i])
        assert s[i].item() == pytest.approx(_sk_ssim(a, b), abs=1e-9)
        assert p[i].item() == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-9)


def test_ssim_psnr_match_skimage_astronaut_float32_inputs():
    x, y = _astronaut_pairs()  # float32 tensors, as the library produces
    s, p = ssim(x, y), psnr(x, y)
    for i in range(3):
        a, b = _unit_hwc(x[i]), _unit_hwc(y[i])
        assert s[i].item() == pytest.approx(_sk_ssim(a, b), abs=1e-6)
        assert p[i].item() == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-6)
    assert 0.3 < s.min() and s.max() < 0.99  # non-trivial pairs


def test_quantize_matches_metrics_on_saved_png_values():
    x, y = _astronaut_pairs()
    y = y + 0.004  # sub-level offsets, so quantization matters
    sq, pq = ssim(x, y, quantize=True), psnr(x, y, quantize=True)
    for i in range(3):
        a, b = tensor_to_uint8(x[i]), tensor_to_uint8(y[i])  # what io writes to PNG
        assert sq[i].item() == pytest.approx(_sk_ssim(a, b, data_range=255), abs=1e-6)
        assert pq[i].item() == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-6)
    assert not torch.allclose(sq, ssim(x, y), atol=1e-7)


def test_identity_batching_and_single_image():
    x, y = _astronaut_pairs()
    assert torch.isinf(psnr(x, x)).all() and torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    assert torch.equal(ssim(x, y)[1:2], ssim(x[1], y[1]))
    assert torch.equal(psnr(x, y)[2:], psnr(x[2:], y[2:]))
    # a known PSNR: constant error of 0.1 in [0, 1] units -> 20 dB
    z = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    assert psnr(z, z + 0.2).item() == pytest.approx(20.0, abs=1e-9)


def test_metric_input_errors():
    with pytest.raises(MetricInputError):
        ssim(torch.zeros(1, 3, 10, 20), torch.zeros(1, 3, 10, 20))
    with pytest.raises(MetricInputError):
        psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 17))


# ---------------------------------------------------------------------------------------------- FID


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def test_fid_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # 1-d: (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)


def test_fid_commuting_covariances_closed_form():
    d = 8
    q = _rotation(d, 1)
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.05, 2, d), rng.uniform(0.05, 2, d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_rank_deficient_features_match_eigen_formula():
    # fewer samples than dimensions, as with 100 images and 2048-d features
    rng = np.random.default_rng(3)
    f1 = rng.standard_normal((20, 48)) @ rng.standard_normal((48, 48))
    f2 = rng.standard_normal((20, 48)) @ rng.standard_normal((48, 48)) + 0.5
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    # tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), a symmetric PSD problem
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(f1, f1) == pytest.approx(0.0, abs=1e-6 * np.trace(s1))


# ---------------------------------------------------------------------------------------------- KID


def _mmd2_direct(x, y):
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_kid_full_set_matches_direct():
    rng = np.random.default_rng(4)
    f1, f2 = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) * 1.5 + 0.3
    direct = _mmd2_direct(f1, f2)
    assert polynomial_mmd2_unbiased(f1, f2) == pytest.approx(direct, rel=1e-10)
    mean, std = kernel_inception_distance(f1, f2, num_subsets=4, subset_size=1000)
    assert mean == pytest.approx(direct, rel=1e-10) and std == pytest.approx(0.0, abs=1e-12)


def test_kid_subsets_follow_documented_draws():
    rng = np.random.default_rng(5)
    f1, f2 = rng.standard_normal((15, 4)), rng.standard_normal((11, 4)) + 0.2
    mean, std = kernel_inception_distance(f1, f2, num_subsets=5, subset_size=6, seed=7)
    draws = np.random.default_rng(7)
    vals = []
    for _ in range(5):
        i1 = draws.choice(15, 6, replace=False)
        i2 = draws.choice(11, 6, replace=False)
        vals.append(_mmd2_direct(f1[i1], f2[i2]))
    assert mean == pytest.approx(np.mean(vals), rel=1e-10) and std == pytest.approx(np.std(vals), rel=1e-8)


def test_kid_separates_distributions():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((300, 16)), rng.standard_normal((300, 16))
    same, _ = kernel_inception_distance(a, b, num_subsets=10, subset_size=200)
    shifted, _ = kernel_inception_distance(a, b + 0.5, num_subsets=10, subset_size=200)
    assert abs(same) < 0.1 * shifted and shifted > 0


def test_frechet_distance_matches_scipy_sqrtm_on_full_rank_covariances():
    """The eigen route equals the textbook formula with scipy.linalg.sqrtm (an independent algorithm)."""
    import scipy.linalg

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 40)), rng.normal(size=(300, 40)) @ rng.normal(size=(40, 40)) * 0.3
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
