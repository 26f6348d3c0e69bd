"""DDRM-LDM: latent diffusion with DDRM-style data consistency in pixel space.

The report's hybrid (``ddrm_srldm``) forces a latent model to act as a pixel denoiser and collapses.
Here the diffusion state stays in the latent space the model was trained on, and the measurement is
enforced where it lives, in pixel space, on the decoded *clean* estimate (in the spirit of
DDNM / ReSample / PSLD). One DDIM step from ``z_t`` (grid and constants as ``methods.ddim``):

1. ``e = eps_theta(z_t, t, lr)``, ``z0 = (z_t - sqrt(1 - a_t) e) / sqrt(a_t)``  (lr: the measurement
   as SRLDM conditions on it)
2. ``x0 = D(z0)``
3. data consistency in the spectral space of ``H = U S V^T``: with ``v = V^T x0`` and, on observed rows,
   ``ybar_i = (U^T y)_i / s_i`` (noise std ``sigma_y / s_i``),

       v_i <- v_i + w_i (ybar_i - v_i),   w_i = tau_t^2 / (tau_t^2 + sigma_y^2 / s_i^2),

   where ``tau_t^2 = (1 - a_t) / a_t + rho^2`` is the assumed error variance of the prior's estimate
   (its diffusion noise level plus a floor ``rho``). Unobserved rows (null space of H) keep the prior's
   values. For ``sigma_y = 0`` this is the range-null-space projection ``A^+ y + (I - A^+ A) x0``.
   ``x0c = V v``.
4. re-encode ``z0c = E(x0c)``, recompute the matching noise ``e_c = (z_t - sqrt(a_t) z0c) / sqrt(1 - a_t)``
   and take the DDIM step ``z_{t'} = sqrt(a_{t'}) z0c + sqrt(1 - a_{t'} - s^2) e_c + s n``.

The output is ``x0c`` of the last step (not clamped, like DDRM's), blended with ``tau = rho``, so it
satisfies the measurement (exactly for noiseless tasks). ``start`` < 1 begins at ``t = start * T`` from
the encoded, consistent bicubic upsampling of the measurement diffused to that level, replacing the
noisiest steps, where a small latent model is least reliable. ``stop`` > 0 ends the steps at
``t = stop * T`` and returns that step's ``x0c``: an estimate of the posterior mean instead of a sample
(the perception-distortion knob: 0 for a full sample). The defaults (rho 0.3, start 0.5, stop 0.4) suit
the epsilon-prediction ``builtin:ldmsr-s``; ``start=0.8, stop=0.6`` suits v-prediction priors such as
``builtin:ldmsr-xs`` (why: docs/methods.md).
Cost per step: one UNet call, one decode, one encode.
"""

from __future__ import annotations

import torch

from .common import StepInfo, check_latent_image_size, check_rho, make_randn, spectral_consistency
from .ddim import check_eta, check_range, ddim_schedule, ddim_step
from .srldm import initial_latent, lr_conditioning, upsample_conditioning


def check_values(*, eta: float, rho: float, start: float, stop: float, **_) -> None:
    """The option values DDRM-LDM accepts."""
    check_eta(eta)
    check_range(start, stop)
    check_rho(rho)


def estimate_error_std(a_t: float, rho: float) -> float:
    """``tau_t`` of step 3: the prior estimate's assumed error std at noise level ``a_t``."""
    return ((1 - a_t) / a_t + rho**2) ** 0.5


@torch.no_grad()
def restore(
    prior, operator, y: torch.Tensor, *, sigma_y: float, steps: int = 50, eta: float = 1.0, rho: float = 0.3,
    start: float = 0.5, stop: float = 0.4, generator: torch.Generator | None = None, randn=None, callback=None,
) -> torch.Tensor:
    """Restore ``x`` from ``y = H x + sigma_y n`` with a latent SR prior (see module docstring).

    Args:
        eta: DDIM eta, the share of fresh noise in each latent step.
        rho: the floor of the prior estimate's assumed error std in the data-consistency blend.
        start: fraction of the diffusion the steps begin at, from the upsampled measurement (1: pure noise).
        stop: fraction of the diffusion the steps end at, returning that step's consistent estimate (0: a full sample).
    """
    check_values(eta=eta, rho=rho, start=start, stop=stop)
    check_latent_image_size(prior, operator, "DDRM-LDM")
    _, H, W = operator.in_shape
    device = prior.alphas_cumprod.device
    y = y.to(device=device, dtype=torch.float32)
    randn = randn or make_randn(generator, device)

    lr = lr_conditioning(operator, y, prior.downscale)
    schedule = ddim_schedule(prior.alphas_cumprod, steps, eta, start, stop)
    noise = randn((y.shape[0], prior.latent_channels, H // prior.downscale, W // prior.downscale)).to(device)
    x_init = None
    if start < 1:
        tau = estimate_error_std(float(schedule.alphas[0]), rho)
        x_init = spectral_consistency(operator, upsample_conditioning(lr, prior.downscale), y, sigma_y, tau)
    z = initial_latent(prior, schedule, noise, x_init)
    x0c = None
    for i in range(len(schedule)):
        t = int(schedule.timesteps[i])
        a_t = float(schedule.alphas[i])
        # 1. e = eps_theta(z_t, t, lr), z0 = (z_t - sqrt(1 - a_t) e) / sqrt(a_t); 2. x0 = D(z0)
        e = prior.eps(z, torch.full((z.shape[0],), t, device=device, dtype=torch.int64), lr)
        z0 = (z - (1 - a_t) ** 0.5 * e) / a_t**0.5
        x0 = prior.decode(z0)
        last = i == len(schedule) - 1
        # 3. data consistency with error std tau_t; the returned estimate is a clean one: only the floor
        # rho remains of its assumed error
        x0c = spectral_consistency(operator, x0, y, sigma_y, rho if last else estimate_error_std(a_t, rho))
        if callback is not None:
            callback(StepInfo(i=i, steps=len(schedule), t=t, z_t=z, x_t=lambda z=z: prior.decode(z), x0=x0c))
        if last:
            break
        # 4. z0c = E(x0c), e_c = (z_t - sqrt(a_t) z0c) / sqrt(1 - a_t), one DDIM step
        z0c = prior.encode(x0c)
        e_c = (z - a_t**0.5 * z0c) / (1 - a_t) ** 0.5
        noise = randn(tuple(z.shape)).to(device)
        z, _ = ddim_step(z, e_c, schedule, i, noise)
    return x0c
