"""DDRM-SRLDM: the report's hybrid (Sec. 3.3, Fig. 5) as the report built it, which fails (kept to show why).

DDRM runs in pixel space and needs a pixel noise prediction ``eps(x_t, t)``. The report obtained one
from the latent SR model (conditioned on the degraded image downscaled to the latent size) in one
of two ways, both selectable with ``strategy``:

* ``"a"`` (step-and-difference): ``z_t = E(x_t)``; ``e = eps_theta(z_t, t, lr)``; one deterministic
  DDIM step ``z_{t'} = sqrt(a_{t'}) z0 + sqrt(1 - a_{t'}) e`` with ``z0 = (z_t - sqrt(1-a_t) e) / sqrt(a_t)``
  to the next DDRM timestep ``t'``; decode ``x'_{t'} = D(z_{t'})``; use ``eps_t = x_t - x'_{t'}``.
* ``"b"`` (decode the noise): ``eps_t = D(eps_theta(E(x_t), t, lr))``.

Why they collapse: ``x_t - x'_{t'}`` is a difference of two *images* at neighbouring noise levels,
not a unit-variance noise estimate (its scale is about ``sqrt(1-a_t) - sqrt(1-a_{t'})`` times the noise,
far below 1, so DDRM's ``x0 = (x_t - sqrt(1-a_t) eps) / sqrt(a_t)`` keeps almost all of the noise);
and the decoder maps latents to natural images, so ``D(eps_latent)`` is an image-like pattern, not
Gaussian pixel noise. In both cases the encoder also sees pixel-space noise it was never trained on.
"""

from __future__ import annotations

import torch

from ..priors.base import PixelPrior
from . import ddrm
from .common import MethodArgumentError, check_latent_image_size
from .srldm import lr_conditioning

STRATEGIES = ("a", "b")


def check_values(*, strategy: str, eta: float, eta_b: float, **_) -> None:
    """The option values DDRM-SRLDM accepts: a strategy of the report and DDRM's weights."""
    _check_strategy(strategy)
    ddrm.check_values(eta=eta, eta_b=eta_b)


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise MethodArgumentError(f"unknown DDRM-SRLDM strategy {strategy!r}; use 'a' or 'b'")


class LatentSRAsPixelDenoiser(PixelPrior):
    """Exposes a latent SR prior as the pixel ``eps(x_t, t)`` DDRM expects, the report's way."""

    def __init__(self, prior, lr: torch.Tensor, strategy: str, skip: int):
        _check_strategy(strategy)
        super().__init__(prior.alphas_cumprod)
        self.prior, self.lr, self.strategy, self.skip = prior, lr, strategy, skip

    def _alpha(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_int = t.round().long()
        z_t = self.prior.encode(x_t)
        e = self.prior.eps(z_t, t_int, self.lr)
        if self.strategy == "b":
            return self.prior.decode(e)
        tt = int(t_int[0])
        a_t, a_next = self._alpha(tt), self._alpha(tt - self.skip)
        z0 = (z_t - (1 - a_t) ** 0.5 * e) / a_t**0.5
        z_next = a_next**0.5 * z0 + (1 - a_next) ** 0.5 * e
        return x_t - self.prior.decode(z_next)


@torch.no_grad()
def restore(
    prior, operator, y: torch.Tensor, *, sigma_y: float, steps: int = 20, strategy: str = "a", eta: float = 0.85,
    eta_b: float = 1.0, generator: torch.Generator | None = None, randn=None, callback=None,
) -> torch.Tensor:
    """DDRM with the latent SR model standing in for the pixel denoiser (``strategy`` "a" or "b").

    Args:
        strategy: how the pixel noise is made from the latent model: "a" steps and differences, "b" decodes it.
        eta: DDRM eta: share of fresh noise on unobserved / less-noisy rows.
        eta_b: DDRM eta_b: weight of the measurement on rows noisier than y.
    """
    check_values(strategy=strategy, eta=eta, eta_b=eta_b)
    check_latent_image_size(prior, operator, "DDRM-SRLDM")
    device = prior.alphas_cumprod.device
    y = y.to(device)
    lr = lr_conditioning(operator, y, prior.downscale)
    denoiser = LatentSRAsPixelDenoiser(prior, lr, strategy, prior.num_timesteps // steps)
    x = ddrm.restore(
        denoiser, operator, y, sigma_y=sigma_y, steps=steps, eta=eta, eta_b=eta_b,
        generator=generator, randn=randn, callback=callback,
    )
    return x.clamp(-1, 1)
