"""The task registry: every task builds, measures with the right noise, and has a sensible baseline."""

import pytest
import torch
import torch.nn.functional as F

from diffrestore.operators import (
    TASKS,
    BicubicSR,
    BlockAverageSR,
    Colorization,
    GaussianBlur,
    Identity,
    ImageSizeError,
    Inpainting,
    UniformBlur,
    list_tasks,
    make_task,
    task_names,
)

REQUIRED = ["sr4", "deblur", "denoise", "noisy-sr4", "sr2", "sr8", "sr4-bicubic", "deblur-uniform",
            "deblur-aniso", "inpaint", "colorize"]


def test_registry_lists_required_tasks():
    assert set(REQUIRED) <= set(task_names())
    assert task_names() == list(TASKS)
    pairs = list_tasks()
    assert [n for n, _ in pairs] == task_names()
    assert all(isinstance(d, str) and d for _, d in pairs)


def test_report_tasks_defaults():
    shape = (3, 32, 32)
    t = make_task("sr4", shape)
    assert isinstance(t.operator, BlockAverageSR) and t.operator.factor == 4 and t.sigma_y == 0
    t = make_task("deblur", shape)
    assert isinstance(t.operator, GaussianBlur) and t.operator.sigma == (1.0, 1.0) and t.sigma_y == 0
    t = make_task("denoise", shape)
    assert isinstance(t.operator, Identity) and t.sigma_y == 0.1
    t = make_task("noisy-sr4", shape)
    assert isinstance(t.operator, BlockAverageSR) and t.operator.factor == 4 and t.sigma_y == 0.05
    assert make_task("sr2", shape).operator.factor == 2 and make_task("sr8", shape).operator.factor == 8
    assert isinstance(make_task("sr4-bicubic", shape).operator, BicubicSR)
    u = make_task("deblur-uniform", shape).operator
    assert isinstance(u, UniformBlur) and u.size == 9
    assert make_task("deblur-aniso", shape).operator.sigma == (1.0, 3.0)
    ip = make_task("inpaint", shape).operator
    assert isinstance(ip, Inpainting) and ip.kept == 3 * 32 * 32 // 2
    assert isinstance(make_task("colorize", shape).operator, Colorization)


@pytest.mark.parametrize("name", REQUIRED)
@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 16, 40)])
def test_task_measure_noise_and_baseline(name, shape):
    sigma = 0.1
    t = make_task(name, shape, sigma_y=sigma)
    op = t.operator
    x = torch.rand(2, *shape) * 2 - 1
    y = t.measure(x, torch.Generator().manual_seed(3))
    assert y.shape == (2, *op.measurement_shape)
    noise = y - op.H(x)
    if isinstance(op, Inpainting):
        noise = noise[:, op.mask.expand(shape)]
    n = noise.numel()
    assert abs(noise.std().item() - sigma) < 5 * sigma / (2 * n) ** 0.5 + 1e-3
    assert abs(noise.mean().item()) < 5 * sigma / n**0.5
    # same generator seed -> same measurement; no noise with sigma_y 0
    torch.testing.assert_close(t.measure(x, torch.Generator().manual_seed(3)), y, atol=0, rtol=0)
    t0 = make_task(name, shape, sigma_y=0.0)
    torch.testing.assert_close(t0.measure(x, torch.Generator().manual_seed(3)), op.H(x), atol=0, rtol=0)
    b = t.baseline(y)
    assert b.shape == x.shape and b.dtype == x.dtype
    assert b.min() >= -1 and b.max() <= 1


def test_default_noise_levels_statistically():
    x = torch.zeros(1, 3, 64, 64)
    for name, sigma in (("denoise", 0.1), ("noisy-sr4", 0.05)):
        t = make_task(name, x.shape[1:])
        y = t.measure(x, torch.Generator().manual_seed(0))
        n = y.numel()
        assert abs(y.std().item() - sigma) < 5 * sigma / (2 * n) ** 0.5


def test_baselines():
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    t = make_task("noisy-sr4", (3, 32, 24))
    y = t.measure(x, torch.Generator().manual_seed(0))
    ref = F.interpolate(y.clamp(-1, 1), size=(32, 24), mode="bicubic", align_corners=False).clamp(-1, 1)
    torch.testing.assert_close(t.baseline(y), ref, atol=0, rtol=0)
    t = make_task("denoise", (3, 32, 24))
    y = t.measure(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(t.baseline(y), y.clamp(-1, 1), atol=0, rtol=0)
    t = make_task("colorize", (3, 32, 24))
    y = t.measure(x)
    torch.testing.assert_close(t.baseline(y), x.mean(1, keepdim=True).expand_as(x), atol=1e-6, rtol=0)
    t = make_task("inpaint", (3, 32, 24))
    y = t.measure(x)
    m = t.operator.mask.expand(3, 32, 24)
    torch.testing.assert_close(t.baseline(y), torch.where(m, x, torch.zeros_like(x)), atol=0, rtol=0)


def test_overrides():
    shape = (3, 32, 32)
    assert make_task("sr4", shape, scale=2).operator.factor == 2
    assert make_task("sr4", shape, scale=None).operator.factor == 4
    assert make_task("deblur", shape, blur_sigma=2.0).operator.sigma == (2.0, 2.0)
    assert make_task("deblur", shape, border="reflect").operator.border == "reflect"
    assert make_task("deblur-aniso", shape, blur_sigma=(2.0, 0.5)).operator.sigma == (2.0, 0.5)
    assert make_task("deblur-uniform", shape, blur_size=5).operator.size == 5
    assert make_task("sr4", shape, sigma_y=0.2).sigma_y == 0.2
    assert make_task("inpaint", shape, keep=0.25).operator.kept == 3 * 32 * 32 // 4
    a, b = make_task("inpaint", shape).operator.mask, make_task("inpaint", shape).operator.mask
    assert torch.equal(a, b) and not torch.equal(a, make_task("inpaint", shape, mask_seed=1).operator.mask)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[:, :16] = True
    op = make_task("inpaint", shape, mask=mask).operator
    assert op.kept == 3 * 32 * 16 and torch.equal(op.mask[0], mask)
    # a mask image as read from a file: (3, H, W) in [-1, 1], white = observed
    img = torch.where(mask, 1.0, -1.0).expand(3, 32, 32)
    op = make_task("inpaint", shape, mask=img).operator
    assert op.mask.shape == (1, 32, 32) and torch.equal(op.mask[0], mask)
    per_channel = torch.stack([mask, ~mask, mask]).float()
    assert torch.equal(make_task("inpaint", shape, mask=per_channel).operator.mask, per_channel.bool())


def test_errors():
    with pytest.raises(ValueError, match="valid tasks: .*sr4"):
        make_task("sr5", (3, 32, 32))
    with pytest.raises(ValueError, match="blur_sigma"):
        make_task("sr4", (3, 32, 32), blur_sigma=2.0)
    with pytest.raises(ValueError):
        make_task("denoise", (3, 32, 32), sigma_y=-0.1)
    with pytest.raises(ImageSizeError, match="divisible"):
        make_task("sr4", (3, 255, 256))
    with pytest.raises(ImageSizeError):
        make_task("sr8", (3, 32, 36))
    with pytest.raises(ImageSizeError):
        make_task("inpaint", (3, 32, 32), mask=torch.ones(16, 16, dtype=torch.bool))


def test_report_size_builds_fast():
    """All tasks at 256x256 (the report's size): construction and one H / Vt / V round trip."""
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    for name in REQUIRED:
        op = make_task(name, (3, 256, 256)).operator
        y = op.H(x)
        torch.testing.assert_close(op.V(op.Vt(x)), x, atol=1e-4, rtol=0)
        assert op.Ut(y).shape == (1, op.m)


def test_real_photo_task_names_are_the_bicubic_model():
    """`upscale` / `upscale-noisy` (the names for real photos) are sr4-bicubic's operator, the noisy one
    with noise 0.05, and not the report's block average."""
    from diffrestore.operators.tasks import make_task

    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref = make_task("sr4-bicubic", (3, 32, 32))
    block = make_task("sr4", (3, 32, 32))
    for name, sigma in (("upscale", 0.0), ("upscale-noisy", 0.05)):
        task = make_task(name, (3, 32, 32))
        assert task.sigma_y == sigma
        assert torch.equal(task.operator.H(x), ref.operator.H(x))
        assert not torch.allclose(task.operator.H(x), block.operator.H(x))
