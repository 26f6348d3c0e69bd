"""Each operator's H against an independent reference: direct 2-D convolution, avg_pool2d, PIL, closed forms."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffrestore.operators import (
    AnisotropicGaussianBlur,
    BicubicSR,
    BlockAverageSR,
    Colorization,
    GaussianBlur,
    Identity,
    Inpainting,
    UniformBlur,
    gaussian_kernel1d,
    random_mask,
)

f64 = torch.float64


def _gauss2d(sigma_h, sigma_w, r_h, r_w):
    """2-D Gaussian evaluated directly on the grid (not as a product of our 1-D kernels)."""
    k = torch.empty(2 * r_h + 1, 2 * r_w + 1, dtype=f64)
    for a in range(-r_h, r_h + 1):
        for b in range(-r_w, r_w + 1):
            k[a + r_h, b + r_w] = math.exp(-(a * a) / (2 * sigma_h**2) - (b * b) / (2 * sigma_w**2))
    return k / k.sum()


def _conv_ref(x, k2d, border):
    c = x.shape[1]
    rh, rw = k2d.shape[0] // 2, k2d.shape[1] // 2
    w = k2d.expand(c, 1, *k2d.shape)
    if border == "zero":
        return F.conv2d(x, w, padding=(rh, rw), groups=c)
    return F.conv2d(F.pad(x, (rw, rw, rh, rh), mode="reflect"), w, groups=c)


# --- Gaussian kernel -----------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.3, 0.5, 1.0, 1.5, 2.2, 3.0])
def test_gaussian_kernel_taps(sigma):
    k = gaussian_kernel1d(sigma)
    r = max(1, math.ceil(4 * sigma))
    assert k.numel() == 2 * r + 1  # documented radius ceil(4 sigma): no tap dropped
    assert torch.equal(k, k.flip(0))
    assert abs(k.sum().item() - 1) < 1e-14
    assert int(k.argmax()) == r
    ref = torch.tensor([math.exp(-t * t / (2 * sigma * sigma)) for t in range(-r, r + 1)], dtype=f64)
    torch.testing.assert_close(k, ref / ref.sum(), atol=1e-15, rtol=0)
    assert k[0] > 0 and k[-1] > 0


def test_gaussian_kernel_truncate_parameter():
    assert gaussian_kernel1d(1.0, truncate=3.0).numel() == 7
    assert GaussianBlur((1, 16, 16), 1.0).radius == (4, 4)
    assert AnisotropicGaussianBlur((1, 32, 32), 1.0, 3.0).radius == (4, 12)


# --- blur = direct 2-D convolution -----------------------------------------------------------------
@pytest.mark.parametrize("border", ["zero", "reflect"])
@pytest.mark.parametrize(
    "shape,sigma", [((3, 16, 16), (1.0, 1.0)), ((3, 20, 14), (1.5, 1.5)), ((2, 17, 24), (1.0, 3.0)), ((1, 12, 10), (2.0, 0.5))]
)
def test_gaussian_blur_equals_conv2d(shape, sigma, border):
    op = GaussianBlur(shape, sigma, border=border)
    rh, rw = (max(1, math.ceil(4 * s)) for s in sigma)
    x = torch.rand(2, *shape, dtype=f64) * 2 - 1
    ref = _conv_ref(x, _gauss2d(*sigma, rh, rw), border)
    torch.testing.assert_close(op.H(x), ref, atol=1e-13, rtol=0)
    # the 1-D matrices used by the SVD are exactly that convolution
    A_h, A_w = op.matrices_1d
    torch.testing.assert_close(A_h @ x @ A_w.T, ref, atol=1e-13, rtol=0)


@pytest.mark.parametrize("border", ["zero", "reflect"])
def test_anisotropic_axes(border):
    """sigma_h blurs along the height axis: a horizontal line stays sharp under (sigma_h=small)."""
    op = AnisotropicGaussianBlur((1, 24, 24), sigma_h=3.0, sigma_w=0.5, border=border)
    x = torch.zeros(1, 1, 24, 24, dtype=f64)
    x[0, 0, 12, :] = 1  # horizontal line
    y = op.H(x)
    torch.testing.assert_close(y, _conv_ref(x, _gauss2d(3.0, 0.5, 12, 2), border), atol=1e-13, rtol=0)
    assert y[0, 0, 12, 12] < 0.2  # spread vertically


@pytest.mark.parametrize("border", ["zero", "reflect"])
@pytest.mark.parametrize("size,shape", [(3, (3, 8, 10)), (9, (3, 16, 12)), (5, (1, 7, 9))])
def test_uniform_blur_equals_conv2d(size, shape, border):
    op = UniformBlur(shape, size, border=border)
    x = torch.rand(2, *shape, dtype=f64)
    ref = _conv_ref(x, torch.full((size, size), 1.0 / size**2, dtype=f64), border)
    torch.testing.assert_close(op.H(x), ref, atol=1e-13, rtol=0)


def test_blur_adjoint_equals_transposed_conv():
    op = GaussianBlur((3, 12, 10), (1.0, 2.0))
    y = torch.randn(2, 3, 12, 10, dtype=f64)
    k = _gauss2d(1.0, 2.0, 4, 8)
    ref = F.conv_transpose2d(y, k.expand(3, 1, *k.shape), padding=(4, 8), groups=3)
    torch.testing.assert_close(op.Ht(y), ref, atol=1e-13, rtol=0)


def test_blur_at_report_size_float32():
    op = GaussianBlur((3, 64, 48), 1.0)
    x = torch.rand(1, 3, 64, 48) * 2 - 1
    ref = _conv_ref(x.double(), _gauss2d(1.0, 1.0, 4, 4), "zero")
    assert (op.H(x).double() - ref).abs().max() < 1e-6
    # float32 pinv agrees with float64, and H pinv H x = H x up to the thresholded directions
    p32, p64 = op.pinv(op.H(x)), op.pinv(op.H(x.double()))
    assert (p32.double() - p64).abs().max() < 1e-4 * p64.abs().max()
    resid = op.H(p64) - op.H(x.double())
    assert resid.norm() <= op.threshold * x.double().norm() * (1 + 1e-6)


# --- super-resolution ------------------------------------------------------------------------------
@pytest.mark.parametrize("factor,shape", [(2, (3, 8, 12)), (4, (3, 16, 24)), (8, (2, 16, 32)), (4, (1, 4, 4))])
def test_block_average_equals_avg_pool(factor, shape):
    op = BlockAverageSR(shape, factor)
    assert op.measurement_shape == (shape[0], shape[1] // factor, shape[2] // factor)
    x = torch.rand(2, *shape, dtype=f64)
    ref = F.avg_pool2d(x, factor)
    torch.testing.assert_close(op.H(x), ref, atol=1e-14, rtol=0)
    A_h, A_w = op.matrices_1d
    torch.testing.assert_close(A_h @ x @ A_w.T, ref, atol=1e-14, rtol=0)
    # all singular values are 1/factor and the pseudo-inverse is nearest-neighbour upsampling
    torch.testing.assert_close(op.singulars, torch.full((op.m,), 1.0 / factor, dtype=f64), atol=1e-13, rtol=0)
    torch.testing.assert_close(op.pinv(ref), F.interpolate(ref, scale_factor=factor, mode="nearest"), atol=1e-12, rtol=0)


def _pil_bicubic(x, factor):
    """PIL's BICUBIC resize of each channel as a mode-'F' (float32) image."""
    b, c, h, w = x.shape
    out = torch.empty(b, c, h // factor, w // factor, dtype=f64)
    for i in range(b):
        for j in range(c):
            im = Image.fromarray(x[i, j].numpy().astype(np.float32))
            assert im.mode == "F"
            out[i, j] = torch.from_numpy(np.array(im.resize((w // factor, h // factor), Image.BICUBIC), dtype=np.float64))
    return out


@pytest.mark.parametrize("factor,shape", [(2, (3, 8, 12)), (4, (3, 16, 24)), (8, (1, 32, 16)), (3, (2, 12, 9)), (4, (3, 64, 64))])
def test_bicubic_equals_pil(factor, shape):
    op = BicubicSR(shape, factor)
    x = (torch.rand(2, *shape) * 2 - 1).double()  # float32-representable values
    y = op.H(x)
    ref = _pil_bicubic(x, factor)
    assert (y - ref).abs().max().item() < 1e-5
    # torch's antialiased bicubic is the same filter (independent implementation)
    ref2 = F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(y, ref2, atol=1e-12, rtol=0)


def test_bicubic_rows_sum_to_one_and_reach_the_border():
    A_h, _ = BicubicSR((1, 32, 32), 4).matrices_1d
    torch.testing.assert_close(A_h.sum(1), torch.ones(8, dtype=f64), atol=1e-14, rtol=0)
    assert (A_h[0] != 0).sum() == 2 * 4 + 2  # first output: taps cut at the left edge, renormalised
    assert (A_h[3] != 0).sum() == 16  # interior: support 2*factor on each side


# --- inpainting, colorization, identity ------------------------------------------------------------
def test_random_mask_fraction_and_seed():
    m1 = random_mask((16, 24), 0.3, torch.Generator().manual_seed(5))
    m2 = random_mask((16, 24), 0.3, torch.Generator().manual_seed(5))
    m3 = random_mask((16, 24), 0.3, torch.Generator().manual_seed(6))
    assert m1.dtype == torch.bool and m1.shape == (16, 24)
    assert int(m1.sum()) == round(0.3 * 16 * 24)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert random_mask((3, 4, 4), 1.0).all() and not random_mask((4, 4), 0.0).any()
    with pytest.raises(ValueError):
        random_mask((4, 4), 1.5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_inpainting_masks_pixels(per_channel):
    shape = (3, 10, 12)
    g = torch.Generator().manual_seed(0)
    mask = random_mask(shape if per_channel else shape[1:], 0.5, g)
    op = Inpainting(shape, mask.float() if per_channel else mask)
    x = torch.rand(2, *shape, dtype=f64) * 2 - 1
    m = mask.to(f64).expand(shape)
    torch.testing.assert_close(op.H(x), x * m, atol=0, rtol=0)
    assert int((op.singulars == 1).sum()) == int(m.sum()) and int((op.singulars == 0).sum()) == int((1 - m).sum())
    # Vt puts the kept pixels first
    v = op.Vt(x)
    torch.testing.assert_close(v[:, : op.kept], x.reshape(2, -1)[:, m.reshape(-1).bool()], atol=0, rtol=0)
    # noise only on observed pixels; to_image shows missing ones as the fill value
    y = op.measure(x, 0.1, torch.Generator().manual_seed(1))
    assert bool((y[:, m == 0] == 0).all())
    assert (y - x * m)[:, m == 1].abs().max() > 0.05
    img = Inpainting(shape, mask, fill=-1.0).to_image(y)
    assert bool((img[:, m == 0] == -1).all())
    torch.testing.assert_close(img[:, m == 1], y[:, m == 1])


def test_colorization_closed_form():
    op = Colorization((3, 6, 8))
    x = torch.rand(2, 3, 6, 8, dtype=f64) * 2 - 1
    torch.testing.assert_close(op.H(x), x.mean(1, keepdim=True), atol=1e-15, rtol=0)
    torch.testing.assert_close(op.singulars, torch.full((48,), 1 / math.sqrt(3), dtype=f64), atol=1e-15, rtol=0)
    v = op.Vt(x).reshape(2, 3, 6, 8)
    torch.testing.assert_close(v[:, 0], x.sum(1) / math.sqrt(3), atol=1e-14, rtol=0)
    torch.testing.assert_close(v[:, 1], (x[:, 0] - x[:, 1]) / math.sqrt(2), atol=1e-14, rtol=0)
    torch.testing.assert_close(v[:, 2], (x[:, 0] + x[:, 1] - 2 * x[:, 2]) / math.sqrt(6), atol=1e-14, rtol=0)
    y = op.H(x)
    torch.testing.assert_close(op.to_image(y), y.expand(2, 3, 6, 8), atol=0, rtol=0)
    torch.testing.assert_close(op.pinv(y), y.expand(2, 3, 6, 8), atol=1e-14, rtol=0)


def test_identity():
    op = Identity((3, 5, 7))
    x = torch.randn(2, 3, 5, 7, dtype=f64)
    for fn in (op.H, op.Ht, op.pinv):
        torch.testing.assert_close(fn(x), x, atol=0, rtol=0)
    y = op.measure(x, 0.2, torch.Generator().manual_seed(0))
    assert abs((y - x).std().item() - 0.2) < 0.02
