"""The prior contract: a trained network plus its noise schedule.

Methods only ever see these two shapes of prior, whatever file the weights came from:

* ``PixelPrior``: ``eps(x_t, t)`` predicts the noise in a pixel-space image ``x_t`` in [-1, 1];
* ``LatentSRPrior``: ``encode(x)``, ``decode(z)``, ``eps(z_t, t, lr)`` for a latent model conditioned
  on a low-resolution image concatenated to the latent.

``t`` is a 1-D tensor of integer-valued timesteps (float or int dtype), one per batch element.
``alphas_cumprod`` is the (T,) float32 tensor of the training schedule, computed exactly as the official
code of each model family does (see ``adm_alphas_cumprod`` / ``ldm_alphas_cumprod``): samplers that
replay official runs depend on it to the last bit.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn


class PriorLoadError(ValueError):
    """A prior that cannot be loaded: missing file or config, wrong kind of model, keys or shapes that do
    not match the config. The message is one line (the CLI prints it and exits non-zero)."""


# --------------------------------------------------------------------------------------------------
# schedules


def linear_betas(
    start: float = 1e-4, end: float = 0.02, steps: int = 1000, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Betas linear in beta: a float64 linspace rounded to ``dtype``. float32 is ADM as DDRM runs it
    (its float32 cumprod reproduces DDRM's x0 predictions bit for bit); LDM's "sqrt_linear" keeps float64."""
    return torch.linspace(start, end, steps, dtype=torch.float64).to(dtype)


def sqrt_linear_betas(start: float = 0.0015, end: float = 0.0155, steps: int = 1000) -> torch.Tensor:
    """LDM's "linear" schedule (diffusers "scaled_linear"): linear in sqrt(beta), in float64 as LDM keeps
    it (rounding to float32 first puts 28 of 1000 alphas_cumprod one ulp off the official buffer)."""
    return torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2


def cosine_betas(steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Improved-DDPM cosine schedule (diffusers "squaredcos_cap_v2"), float64 as in guided-diffusion."""

    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / steps) / abar(i / steps), max_beta) for i in range(steps)],
                        dtype=torch.float64)  # fmt: skip


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """Cumulative product of (1 - beta) in the betas' own dtype, returned as float32: each official code
    takes it in the precision of its betas (DDRM float32, LDM and guided-diffusion float64)."""
    return torch.cumprod(1.0 - betas, dim=0).float()


def adm_alphas_cumprod(start: float = 1e-4, end: float = 0.02, steps: int = 1000) -> torch.Tensor:
    """The ADM / DDPM linear schedule as DDRM computes it (the default of pixel priors)."""
    return alphas_cumprod_from_betas(linear_betas(start, end, steps))


def _betas(schedule: str, start: float, end: float, steps: int, trained_betas, linear_dtype, where: str):
    if trained_betas is not None:
        return torch.as_tensor(trained_betas, dtype=torch.float64)
    if schedule == "linear":
        return linear_betas(start, end, steps, linear_dtype)
    if schedule == "scaled_linear":
        return sqrt_linear_betas(start, end, steps)
    if schedule == "squaredcos_cap_v2":
        return cosine_betas(steps)
    raise PriorLoadError(
        f"{where}: unsupported beta_schedule {schedule!r} (use linear, scaled_linear or squaredcos_cap_v2)"
    )


def ldm_alphas_cumprod(
    beta_start: float = 0.0015,
    beta_end: float = 0.0155,
    num_timesteps: int = 1000,
    beta_schedule: str = "scaled_linear",
    trained_betas=None,
) -> torch.Tensor:
    """The (T,) float32 ``alphas_cumprod`` of an LDM-trained model, bit-identical to LDM's buffer.

    ``beta_schedule`` uses diffusers' names: ``"scaled_linear"`` (LDM's "linear") or ``"linear"`` (LDM's
    "sqrt_linear"); LDM never rounds betas, so both stay float64 through the cumulative product.
    """
    betas = _betas(beta_schedule, beta_start, beta_end, num_timesteps, trained_betas, torch.float64, "LDM schedule")
    return alphas_cumprod_from_betas(betas)


def scheduler_alphas_cumprod(
    cfg: Mapping[str, Any], where: str = "scheduler config", predictions: tuple[str, ...] = ("epsilon",)
) -> torch.Tensor:
    """``alphas_cumprod`` of a diffusers ``scheduler_config.json`` (diffusers defaults for absent keys).

    Each schedule name maps to the one function of its model family: "linear" is ADM's (``linear_betas``),
    "scaled_linear" LDM's (``sqrt_linear_betas``). A ``prediction_type`` outside ``predictions`` (the ones
    the caller's prior converts) is refused here, before any weights are read.
    """
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in predictions:
        need = " or ".join(predictions)
        raise PriorLoadError(f"{where}: prediction_type {pred!r} is not supported (need {need})")
    betas = _betas(
        str(cfg.get("beta_schedule", "linear")),
        float(cfg.get("beta_start", 1e-4)),
        float(cfg.get("beta_end", 0.02)),
        int(cfg.get("num_train_timesteps", 1000)),
        cfg.get("trained_betas"),
        torch.float32,
        where,
    )
    return alphas_cumprod_from_betas(betas)


#: the network targets a latent prior may have (``LatentSRPrior.eps`` converts v-prediction)
PREDICTION_TYPES = ("epsilon", "v_prediction")


def eps_from_v(v: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Epsilon from a v-prediction: with ``x_t = sqrt(a) x0 + sqrt(1-a) eps`` and ``v = sqrt(a) eps -
    sqrt(1-a) x0`` (Salimans & Ho 2022), ``eps = sqrt(a) v + sqrt(1-a) x_t``."""
    return alpha_bar.sqrt() * v + (1 - alpha_bar).sqrt() * x_t


# --------------------------------------------------------------------------------------------------
# the two kinds of prior


class _ScheduledPrior(nn.Module):
    """What both kinds share: the float32 training schedule."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) cast the networks only: samplers index the schedule in float32
        schedule = self.alphas_cumprod
        super()._apply(fn, recurse)
        self.alphas_cumprod = schedule.to(self.alphas_cumprod.device)
        return self


class PixelPrior(_ScheduledPrior):
    """An unconditional epsilon-prediction diffusion model in pixel space."""

    #: image sides must be multiples of this (the UNet's total downsampling)
    multiple_of: int = 1
    #: native training resolution (informational; fully-convolutional models accept other sizes)
    image_size: int | None = None

    def eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LatentSRPrior(_ScheduledPrior):
    """A latent diffusion model for super-resolution, conditioned by concatenating the LR image.

    ``eps`` is always the noise estimate; a network trained for another target (``prediction_type``
    "v_prediction") is converted by :meth:`eps_from_output`.
    """

    #: latent side = image side // downscale (the autoencoder's factor, 4 for LDM-SR)
    downscale: int = 4
    latent_channels: int = 3
    #: latent sides must be multiples of this (the latent UNet's total downsampling)
    multiple_of: int = 1
    #: what the network predicts, one of ``PREDICTION_TYPES``
    prediction_type: str = "epsilon"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def eps_from_output(self, out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network output as epsilon (:func:`eps_from_v` for v-prediction, computed in float32)."""
        if self.prediction_type == "epsilon":
            return out
        a = self.alphas_cumprod.to(z_t.device)[t.long()].view(-1, *([1] * (z_t.ndim - 1)))
        return eps_from_v(out.float(), z_t.float(), a).to(out.dtype)
