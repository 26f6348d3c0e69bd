"""The prior contract: a trained network plus its noise schedule.

Methods only ever see these two shapes of prior, whatever file the weights came from:

* ``PixelPrior``: ``eps(x_t, t)`` predicts the noise in a pixel-space image ``x_t`` in [-1, 1];
* ``LatentSRPrior``: ``encode(x)``, ``decode(z)``, ``eps(z_t, t, lr)`` for a latent model conditioned
  on a low-resolution image concatenated to the latent.

``t`` is a 1-D tensor of integer-valued timesteps (float or int dtype), one per batch element.
``alphas_cumprod`` is the (T,) float32 tensor of the training schedule.
"""

from __future__ import annotations

import torch
from torch import nn


class PriorLoadError(ValueError):
    """A prior that cannot be loaded: missing file or config, wrong kind of model, keys or shapes that do
    not match the config. The message is one line (the CLI prints it and exits non-zero)."""


def linear_betas(start: float = 1e-4, end: float = 0.02, steps: int = 1000) -> torch.Tensor:
    """ADM / DDPM schedule: betas linear in beta (float64 linspace, cast to float32 as DDRM does)."""
    return torch.linspace(start, end, steps, dtype=torch.float64).float()


def sqrt_linear_betas(start: float = 0.0015, end: float = 0.0155, steps: int = 1000) -> torch.Tensor:
    """LDM schedule ("linear" in LDM, "scaled_linear" in diffusers): linear in sqrt(beta)."""
    return (torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2).float()


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """Cumulative product of (1 - beta) in float64, returned as float32."""
    return torch.cumprod(1.0 - betas.double(), dim=0).float()


class PixelPrior(nn.Module):
    """An unconditional epsilon-prediction diffusion model in pixel space."""

    #: image sides must be multiples of this (the UNet's total downsampling)
    multiple_of: int = 1
    #: native training resolution (informational; fully-convolutional models accept other sizes)
    image_size: int | None = None

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LatentSRPrior(nn.Module):
    """A latent diffusion model for super-resolution, conditioned by concatenating the LR image."""

    #: latent side = image side // downscale (the autoencoder's factor, 4 for LDM-SR)
    downscale: int = 4
    latent_channels: int = 3
    #: latent sides must be multiples of this (the latent UNet's total downsampling)
    multiple_of: int = 1

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
