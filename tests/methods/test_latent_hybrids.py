"""DDRM-LDM (latent diffusion + pixel-space spectral consistency) and the report's DDRM-SRLDM."""

import re

import pytest
import torch

from diffrestore.methods.ddrm_ldm import spectral_consistency
from diffrestore.methods.ddrm_srldm import LatentSRAsPixelDenoiser
from diffrestore.methods import get_method
from diffrestore.operators.tasks import make_task
from diffrestore.priors.base import LatentSRPrior, alphas_cumprod_from_betas, sqrt_linear_betas


@pytest.mark.parametrize("task", ["sr4", "deblur", "inpaint", "colorize"])
def test_noiseless_consistency_is_the_range_null_space_projection(task):
    """sigma_y = 0: x0 + A^+ (y - A x0), with A^+ from torch.linalg.pinv of the dense matrix."""
    op = make_task(task, (3, 8, 8)).operator
    A = op.dense_matrix()
    g = torch.Generator().manual_seed(0)
    x_true = torch.rand(1, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    x0 = torch.rand(1, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    y = op.H(x_true)
    out = spectral_consistency(op, x0, y, sigma_y=0.0, tau=1.0)
    # the same singular-value cut-off as the operator: pinv of the thresholded spectrum
    s = op.singulars.double()
    rcond = float(op.threshold / s.max()) if op.threshold > 0 else 1e-12
    ref = x0.reshape(-1) + torch.linalg.pinv(A, rtol=rcond + 1e-12) @ (y.reshape(-1) - A @ x0.reshape(-1))
    torch.testing.assert_close(out.reshape(-1), ref, atol=1e-8, rtol=1e-8)
    if task != "deblur":  # deblur drops directions below the threshold, so y is matched up to them
        torch.testing.assert_close(op.H(out), y, atol=1e-8, rtol=1e-8)
    # never moves away from an image consistent with y (orthogonal projection onto an affine set)
    assert (out - x_true).norm() <= (x0 - x_true).norm() + 1e-12


def test_noisy_consistency_weights():
    """Observed rows move by w = tau^2 / (tau^2 + sigma_y^2 / s^2); null-space rows never move."""
    op = make_task("sr4", (3, 8, 8)).operator
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randn(2, *op.measurement_shape, generator=g, dtype=torch.float64)
    sigma_y, tau = 0.05, 0.1
    out = spectral_consistency(op, x0, y, sigma_y=sigma_y, tau=tau)
    s = op.singulars.double()
    w = tau**2 / (tau**2 + sigma_y**2 / s**2)
    v0, v1 = op.Vt(x0), op.Vt(out)
    ybar = op.Ut(y) / s
    torch.testing.assert_close(v1[:, : op.m], v0[:, : op.m] + w * (ybar - v0[:, : op.m]))
    torch.testing.assert_close(v1[:, op.m :], v0[:, op.m :])


class _PixelLatent(LatentSRPrior):
    """A 'latent' model whose autoencoder is 2x2 average pooling / nearest upsampling and whose eps is a
    fixed function, so the report's two strategies have closed forms."""

    downscale, latent_channels, multiple_of = 2, 3, 1

    def __init__(self):
        super().__init__(alphas_cumprod_from_betas(sqrt_linear_betas()))

    def encode(self, x):
        return torch.nn.functional.avg_pool2d(x, 2)

    def decode(self, z):
        return torch.nn.functional.interpolate(z, scale_factor=2, mode="nearest")

    def eps(self, z_t, t, lr):
        return 0.5 * z_t + lr


def test_report_strategies_closed_form():
    prior = _PixelLatent()
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(1, 3, 8, 8, generator=g)
    lr = torch.randn(1, 3, 4, 4, generator=g)
    t, skip = 500, 50
    a, a2 = float(prior.alphas_cumprod[t]), float(prior.alphas_cumprod[t - skip])
    z = prior.encode(x_t)
    e = 0.5 * z + lr
    b = LatentSRAsPixelDenoiser(prior, lr, "b", skip).eps(x_t, torch.tensor([float(t)]))
    torch.testing.assert_close(b, prior.decode(e))
    z0 = (z - (1 - a) ** 0.5 * e) / a**0.5
    expected_a = x_t - prior.decode(a2**0.5 * z0 + (1 - a2) ** 0.5 * e)
    got_a = LatentSRAsPixelDenoiser(prior, lr, "a", skip).eps(x_t, torch.tensor([float(t)]))
    torch.testing.assert_close(got_a, expected_a)


@pytest.fixture(scope="module")
def tiny_ldm(shared):
    from diffrestore.priors.ldm import load_latent_sr

    return load_latent_sr(shared / "golden" / "ldm" / "ldm_sr_tiny.ckpt")


@pytest.mark.parametrize("method", ["ddrm-ldm", "ddrm-srldm"])
@pytest.mark.parametrize("task", ["sr4", "deblur", "denoise", "noisy-sr4"])
def test_hybrids_run_and_are_seeded(tiny_ldm, method, task):
    """Random-weight tiny LDM: the methods run on the report's tasks and are reproducible."""
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    t = make_task(task, (3, 32, 32))
    y = t.operator.measure(x, t.sigma_y, torch.Generator().manual_seed(4))
    run = get_method(method).restore
    outs = [run(tiny_ldm, t.operator, y, sigma_y=t.sigma_y, steps=4, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert outs[0].shape == x.shape and torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])


def test_ddrm_ldm_output_matches_noiseless_measurement(tiny_ldm):
    """The last step's consistency makes H x_hat == y."""
    x = (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 1.2 - 0.6)
    t = make_task("sr4", (3, 32, 32))
    y = t.operator.H(x)
    seen = []
    out = get_method("ddrm-ldm").restore(tiny_ldm, t.operator, y, sigma_y=0.0, steps=3,
                                         generator=torch.Generator().manual_seed(7), callback=seen.append)
    assert [s["i"] for s in seen] == [0, 1, 2]
    last = seen[-1]["x0"]
    torch.testing.assert_close(t.operator.H(last), y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, last)
    torch.testing.assert_close(t.operator.H(out), y, atol=1e-4, rtol=1e-4)


def test_ddrm_ldm_start_is_the_encoded_consistent_upsampling(tiny_ldm):
    """start 0.5 (the default): the first latent is the diffused encoding of the bicubic-upsampled conditioning
    after the noiseless consistency projection (so it already satisfies H x = y)."""
    import torch.nn.functional as F

    from diffrestore.methods.ddim import ddim_schedule
    from diffrestore.methods.ddrm_ldm import spectral_consistency
    from diffrestore.methods.srldm import lr_conditioning

    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(8)) * 2 - 1
    t = make_task("sr4", (3, 32, 32))
    y = t.operator.H(x)
    draws = iter([torch.randn(1, tiny_ldm.latent_channels, 8, 8, generator=torch.Generator().manual_seed(k)) for k in range(9)])
    first = torch.randn(1, tiny_ldm.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    get_method("ddrm-ldm").restore(tiny_ldm, t.operator, y, sigma_y=0.0, steps=4, stop=0.0,
                                   randn=lambda shape: next(draws).clone(), callback=seen.append)
    sched = ddim_schedule(tiny_ldm.alphas_cumprod, 4, 1.0, 0.5)
    assert seen[0]["t"] == int(sched.timesteps[0]) == 376
    up = F.interpolate(lr_conditioning(t.operator, y, 4), scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
    x_init = spectral_consistency(t.operator, up, y, 0.0, 1.0)
    torch.testing.assert_close(t.operator.H(x_init), y, atol=1e-5, rtol=1e-5)
    a = float(sched.alphas[0])
    torch.testing.assert_close(seen[0]["z_t"], a**0.5 * tiny_ldm.encode(x_init) + (1 - a) ** 0.5 * first, rtol=1e-5, atol=1e-5)


def test_ddrm_ldm_stop_returns_the_consistent_estimate_at_the_stop_level(tiny_ldm):
    """stop=0.3: the steps span (300, 500], the output is the last step's consistent clean estimate
    (it satisfies H x = y for a noiseless task) and it differs from a full sample."""
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(9)) * 2 - 1
    t = make_task("sr4", (3, 32, 32))
    y = t.operator.H(x)
    seen = []
    restore = get_method("ddrm-ldm").restore
    out = restore(tiny_ldm, t.operator, y, sigma_y=0.0, steps=4, stop=0.3, generator=torch.Generator().manual_seed(1),
                  callback=seen.append)  # fmt: skip
    assert [s["t"] for s in seen] == [451, 401, 351, 301]
    torch.testing.assert_close(out, seen[-1]["x0"])
    torch.testing.assert_close(t.operator.H(out), y, atol=1e-5, rtol=1e-5)
    full = restore(tiny_ldm, t.operator, y, sigma_y=0.0, steps=4, stop=0.0, generator=torch.Generator().manual_seed(1))
    assert (out - full).abs().max() > 1e-3
    seen.clear()
    restore(tiny_ldm, t.operator, y, sigma_y=0.0, steps=4, callback=seen.append)
    assert [s["t"] for s in seen] == [476, 451, 426, 401]  # the default stop 0.4: grid (400, 500]
    with pytest.raises(ValueError, match=re.escape("stop (0.5) must be in [0, start=0.5)")):
        restore(tiny_ldm, t.operator, y, sigma_y=0.0, steps=4, stop=0.5)
    with pytest.raises(ValueError, match=re.escape("100 steps do not fit between stop 0.4 and start 0.5 (100 timesteps): use at most 99")):
        restore(tiny_ldm, t.operator, y, sigma_y=0.0, steps=100)
