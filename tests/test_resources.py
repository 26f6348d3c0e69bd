"""Resource guards (``diffrestore.resources``) and the image reading they protect, checked against
closed forms and independent references."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffrestore import image_io, resources
from diffrestore.operators.blur import conv_matrix
from diffrestore.operators.tasks import check_task, measurement_factor
from diffrestore.restoration import resolve_steps


@pytest.mark.parametrize("text, expected", [("8G", 8 * 2**30), ("8GiB", 8 * 2**30), ("500MB", 500 * 10**6),
                                            ("1.5g", int(1.5 * 2**30)), ("4096", 4096), ("2 k", 2048)])
def test_parse_bytes(text, expected):
    assert resources.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "8X", "", "-1G", "0"])
def test_parse_bytes_refuses_what_is_not_a_size(text):
    with pytest.raises(resources.ResourceError, match="--max-memory"):
        resources.parse_bytes(text)


def test_estimate_is_the_documented_sum():
    h, w, s, b = 48, 80, 3, 2
    act = resources.ACTIVATION_BYTES_PER_PIXEL["latent"]
    plain = resources.BASE_BYTES + b * s * h * w * act
    assert resources.estimate_bytes(h, w, samples=s, batch=b, kind="latent") == plain
    factors = 6 * 8 * (h * h + w * w) + 2 * 8 * 3 * h * w
    assert resources.estimate_bytes(h, w, samples=s, batch=b, kind="latent", separable=True) == plain + factors


def test_refusal_suggests_a_sample_count_and_a_size_that_fit():
    budget = (resources.BASE_BYTES + 10 * 64 * 64 * resources.ACTIVATION_BYTES_PER_PIXEL["pixel"] + 5, "test")
    assert resources.check_memory(64, 64, budget, samples=10) <= budget[0]
    with pytest.raises(resources.ResourceError) as e:
        resources.check_memory(64, 64, budget, samples=11)
    msg = str(e.value)
    assert "--samples 10," in msg and "--max-memory" in msg and "\n" not in msg
    side = msg.split("at most about ")[1].split(",")[0]
    h, w = (int(v) for v in side.split("x"))
    assert resources.estimate_bytes(h, w, samples=11) <= budget[0] < resources.estimate_bytes(h + 1, w, samples=11)


def test_blur_width_limit():
    resources.check_blur_sigma(resources.MAX_BLUR_SIGMA)
    resources.check_blur_sigma((0.5, 3.0))
    for bad in (resources.MAX_BLUR_SIGMA * 1.01, 1e6, 0.0, -1.0, float("nan"), float("inf"), (1.0, 1e4)):
        with pytest.raises(resources.ResourceError):
            resources.check_blur_sigma(bad)


@pytest.mark.parametrize("border", ["zero", "reflect"])
@pytest.mark.parametrize("n, taps", [(7, 3), (16, 9), (33, 31)])
def test_conv_matrix_equals_torch_correlation(n, taps, border):
    if border == "reflect" and taps // 2 >= n:
        pytest.skip("reflect needs the radius below the side")
    k = torch.rand(taps, dtype=torch.float64, generator=torch.Generator().manual_seed(n + taps))
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    r = taps // 2
    padded = F.pad(x[:, None], (r, r), mode="constant" if border == "zero" else "reflect")
    reference = F.conv1d(padded, k.view(1, 1, -1))[:, 0]
    torch.testing.assert_close(x @ conv_matrix(n, k, border).T, reference, rtol=0, atol=1e-12)


def test_wide_blur_matrix_is_quick():
    start = time.perf_counter()
    A = conv_matrix(256, torch.full((801,), 1 / 801, dtype=torch.float64))
    assert time.perf_counter() - start < 2.0
    assert A.shape == (256, 256) and torch.allclose(A[128].sum(), torch.tensor(256 / 801, dtype=torch.float64))


def test_image_size_reads_only_the_header(tmp_path):
    path = tmp_path / "big.png"
    Image.new("1", (12000, 9000)).save(path)
    start = time.perf_counter()
    assert resources.image_size(path, 200_000_000) == (12000, 9000)
    with pytest.raises(resources.ResourceError, match="108,000,000 pixels.*--max-pixels"):
        resources.image_size(path, 50_000_000)
    assert time.perf_counter() - start < 1.0


def test_exif_orientation_is_applied(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (10, 24, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show the stored image rotated 90 degrees clockwise
    Image.fromarray(a).save(tmp_path / "turned.png", exif=exif)
    np.testing.assert_array_equal(np.asarray(image_io.open_rgb(tmp_path / "turned.png")), np.rot90(a, k=-1))
    x = image_io.read_image(tmp_path / "turned.png")
    assert x.shape == (3, 24, 10)
    np.testing.assert_array_equal(np.asarray(image_io.open_rgb(tmp_path / "turned.png", exif=False)), a)


def test_float_image_with_non_finite_values_is_refused(tmp_path):
    a = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(a, mode="F").save(tmp_path / "fine.tif")
    assert image_io.read_image(tmp_path / "fine.tif").shape == (3, 8, 8)
    a[2, 3], a[5, 5] = np.nan, -np.inf
    Image.fromarray(a, mode="F").save(tmp_path / "bad.tif")
    with pytest.raises(image_io.ImageReadError, match=r"bad.tif: 2 of its 64 pixels are NaN or infinite"):
        image_io.read_image(tmp_path / "bad.tif")


def test_steps_resolved_and_bounded_by_the_schedule():
    class Prior:
        num_timesteps = 1000

    assert resolve_steps("ddrm", None) == 20 and resolve_steps("srldm", None, Prior()) == 100
    assert resolve_steps("ddrm", 1000, Prior()) == 1000
    for bad in (0, -3, 1001):
        with pytest.raises(ValueError):
            resolve_steps("ddrm", bad, Prior())


def test_task_parameters_checked_on_a_probe_that_suits_the_scale():
    assert measurement_factor("sr4") == 4 and measurement_factor("sr4", scale=3) == 3 and measurement_factor("deblur") == 1
    check_task("sr4", scale=3)  # 64 is not a multiple of 3: the probe must not be 64
    check_task("sr4", scale=100)
    with pytest.raises(ValueError, match="scale"):
        check_task("sr4", scale=0)
    with pytest.raises(ValueError, match="no parameter scale"):
        check_task("deblur", scale=2)


def test_resolve_device():
    assert resources.resolve_device("cpu") == torch.device("cpu")
    for bad in ("bogus", "cuda:99" if torch.cuda.is_available() else "cuda"):
        with pytest.raises(resources.ResourceError, match="--device"):
            resources.resolve_device(bad)


@pytest.mark.parametrize("border", ["zero", "reflect"])
def test_wide_blur_uses_matrices_and_stays_the_same_operator(border):
    from diffrestore.operators.blur import SHIFT_ADD_MAX_TAPS, GaussianBlur

    op = GaussianBlur((3, 96, 96), 10.0, border=border)  # 81 taps
    assert len(op.kernels[0]) > SHIFT_ADD_MAX_TAPS
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 96, 96, generator=g), torch.randn(2, 3, 96, 96, generator=g)
    k2 = torch.outer(*op.kernels).float()
    r = k2.shape[0] // 2
    padded = F.pad(x, (r, r, r, r), mode="constant" if border == "zero" else "reflect")
    reference = F.conv2d(padded, k2.expand(3, 1, -1, -1), groups=3)
    torch.testing.assert_close(op.H(x), reference, rtol=0, atol=2e-5)
    torch.testing.assert_close((op.H(x) * y).sum(), (x * op.Ht(y)).sum(), rtol=1e-4, atol=1e-3)
