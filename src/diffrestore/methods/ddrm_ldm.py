"""DDRM-LDM: latent diffusion with DDRM-style data consistency in pixel space (the report's
"future work", done so that it works).

The report's hybrid (``ddrm_srldm``) forces a latent model to act as a pixel denoiser and collapses.
Here the diffusion state stays in the latent space the model was trained on, and the measurement is
enforced where it lives — in pixel space, on the decoded *clean* estimate — in the spirit of
DDNM / ReSample / PSLD. One DDIM step from ``z_t`` (grid and constants as ``methods.ddim``):

1. ``e = eps_theta(z_t, t, lr)``, ``z0 = (z_t - sqrt(1 - a_t) e) / sqrt(a_t)``  (lr: the measurement
   as SRLDM conditions on it)
2. ``x0 = D(z0)``
3. data consistency in the spectral space of ``H = U S V^T``: with ``v = V^T x0`` and, on observed rows,
   ``ybar_i = (U^T y)_i / s_i`` (noise std ``sigma_y / s_i``),

       v_i <- v_i + w_i (ybar_i - v_i),   w_i = tau_t^2 / (tau_t^2 + sigma_y^2 / s_i^2),

   where ``tau_t^2 = (1 - a_t) / a_t + rho^2`` is the assumed error variance of the prior's estimate
   (its diffusion noise level plus a floor ``rho``, default 0.3: on held-out photos 200-202 of
   imagenet-sample-500, noisy sr4 with ``builtin:ldmsr-s``, 0.3 beat 0.1 by 0.5 dB and 0.2 by 0.1 dB,
   and 0.5 was no better). Unobserved rows (null space of H) keep the prior's
   values. For ``sigma_y = 0`` this is the range–null-space projection ``A^+ y + (I - A^+ A) x0``.
   ``x0c = V v``.
4. re-encode ``z0c = E(x0c)``, recompute the matching noise ``e_c = (z_t - sqrt(a_t) z0c) / sqrt(1 - a_t)``
   and take the DDIM step ``z_{t'} = sqrt(a_{t'}) z0c + sqrt(1 - a_{t'} - s^2) e_c + s n``.

The output is ``x0c`` of the last step (not clamped, like DDRM's), so it satisfies the measurement (exactly for noiseless
tasks); the orthogonal projection onto ``{x : Hx = y}`` never moves an estimate away from any image
consistent with y, so for noiseless tasks it can only lower the error of the decoded estimate.
``start`` < 1 (default 0.5) begins at ``t = start * T`` from ``E(x_init)`` diffused to that level, with
``x_init`` the bicubic-upsampled conditioning after step 3 (``srldm.initial_latent``): the noisiest steps,
where a small latent model's eps is least reliable (its x0 at t = T is ~11 dB on a photo where its
conditioning alone gives ~30), are replaced by what the measurement already says.
``stop`` > 0 ends the steps at ``t = stop * T`` (the grid spans ``(stop T, start T]``, same number of
steps) and returns that step's ``x0c``: an estimate of the posterior *mean* instead of a sample. Along
a full trajectory the consistent estimates gain PSNR until mid-way and lose it in the low-noise steps,
where a small latent UNet adds detail it gets wrong (``builtin:ldmsr-s``, sr4, eta 0, held-out photos
200-205 of imagenet-sample-500: 26.45 dB at t = 441, 25.33 dB at t = 1; bicubic 25.91). ``stop`` is
the perception–distortion knob: 0 for a full sample, 0.4 (default) for PSNR. On the first 100 photos
(``evaluate --first 100``, 50 steps, bf16) stop 0.4 beat stop 0 in PSNR *and* FID: sr4 26.49 dB / FID
89.1 against 25.12 / 103.4 (bicubic 26.28 / 106.7), noisy sr4 25.23 / 127.6 against 24.08 / 141.8
(bicubic 25.28 / 139.2) — the late samples' detail was wrong enough to cost FID as well.
How high the best ``stop`` lies depends on how good the prior's clean estimate is at high noise. A
v-prediction UNet (``builtin:ldmsr-xs``) predicts it directly; there it is close to the UNet's regression
of ``z0`` on the conditioning, a posterior mean. An epsilon UNet (``ldmsr-s``) gets it by dividing out
``sqrt(a_t)``, which multiplies its noise error by ``sqrt((1 - a_t) / a_t)`` (3.6 at t = 600). With
``ldmsr-xs`` on held-out photos 100-115 (50 steps, bf16, PSNR over bicubic; ``start = stop + 0.2`` except
the default pair 0.5 / 0.4): sr4 +0.55 / +0.62 / +0.72 at stop 0.4 / 0.5 / 0.6, noisy sr4 +0.33 / +0.38 /
+0.45 / +0.49 / +0.49 at stop 0.4 / 0.5 / 0.6 / 0.7 / 0.8. On the first 100, ``start 0.8, stop 0.6`` gave
noisy sr4 25.31 dB / FID 126.7 against 25.23 / 126.9 with the default (bicubic 25.28 / 139.2; better on
92 of the 100 photos) and sr4 26.62 / 90.5 against 26.49 / 91.0 (bicubic 26.28 / 106.7). With ``ldmsr-s``
the same pair loses (held-out 100-107, noisy sr4: +0.07 against +0.23 with the default), so the defaults
stay those of ``ldmsr-s``, the default prior; use ``start=0.8, stop=0.6`` with v-prediction priors. The returned
``x0c`` is blended with ``tau = rho`` (the estimate is a clean one, its diffusion noise term is gone;
for ``stop`` = 0 the two differ by < 1%): on the same photos, noisy sr4, stop 0.4, that is 25.50 dB
against 25.36 with ``tau_t`` (bicubic 25.21; 0.2 gave 25.38, 0.4 25.49).
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
    prior,
    operator,
    y: torch.Tensor,
    *,
    sigma_y: float,
    steps: int = 50,
    eta: float = 1.0,
    rho: float = 0.3,
    start: float = 0.5,
    stop: float = 0.4,
    generator: torch.Generator | None = None,
    randn=None,
    callback=None,
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
        e = prior.eps(z, torch.full((z.shape[0],), t, device=device, dtype=torch.int64), lr)
        z0 = (z - (1 - a_t) ** 0.5 * e) / a_t**0.5
        x0 = prior.decode(z0)
        last = i == len(schedule) - 1
        # the returned estimate is a clean one: only the floor rho remains of its assumed error
        x0c = spectral_consistency(operator, x0, y, sigma_y, rho if last else estimate_error_std(a_t, rho))
        if callback is not None:
            callback(StepInfo(i=i, steps=len(schedule), t=t, z_t=z, x_t=lambda z=z: prior.decode(z), x0=x0c))
        if last:
            break
        z0c = prior.encode(x0c)
        e_c = (z - a_t**0.5 * z0c) / (1 - a_t) ** 0.5
        noise = randn(tuple(z.shape)).to(device)
        z, _ = ddim_step(z, e_c, schedule, i, noise)
    return x0c
