"""DDIM sampling exactly as the official LDM ``DDIMSampler`` (CompVis/latent-diffusion ``ddim.py``).

Conventions (checked against golden tensors of the official code):

* grid: ``uniform`` with the **+1 offset**: ``t_i = i * (T // S) + 1``, run from high to low
  (S=10, T=1000: 901, 801, ..., 1). For S that does not divide T the official ``arange(0, T, T//S) + 1``
  yields one point more than asked (and for some S an out-of-range 1000); we keep exactly S points, the
  first S of that grid (the same as diffusers' "leading" spacing with ``steps_offset=1``);
* ``a_t = alphas_cumprod[t_i]`` (the float32 buffer); ``a_prev`` is ``alphas_cumprod[t_{i-1}]`` and, at the
  last step, ``alphas_cumprod[0]`` (**not** 1.0);
* ``sigma = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))`` in float64 from the float32 alphas
  (bit for bit: the official numpy/torch mix takes ``1 / (1 - a_t)`` in float32), so sigma > 0 at the
  last step and noise is added there too;
* each step, with every scalar rounded to float32 as ``torch.full`` does::

      pred_x0 = (x - sqrt(1 - a_t) * eps) / sqrt(a_t)
      x_prev  = sqrt(a_prev) * pred_x0 + sqrt(1 - a_prev - sigma^2) * eps + sigma * noise

  with one standard-normal draw of ``x``'s shape per step (drawn even when sigma is 0, as the official
  sampler does), no clipping, temperature 1.

``ddim_sample`` is a plain function of ``eps_fn(x, t)``, ``x_T`` and a ``DDIMSchedule``; ``randn(shape)``
can be injected to replay recorded draws. It does not disable autograd: callers wrap it in
``torch.no_grad()`` when they only sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .common import MethodArgumentError


def check_range(start: float, stop: float = 0.0) -> None:
    """The fractions of the diffusion a truncated DDIM grid may span: ``0 <= stop < start <= 1``."""
    if not 0.0 < start <= 1.0:
        raise MethodArgumentError(f"start must be in (0, 1], got {start}")
    if not 0.0 <= stop < start:
        raise MethodArgumentError(f"stop ({stop}) must be in [0, start={start}); stop 0 gives a full sample")


def check_eta(eta: float) -> None:
    """DDIM's eta scales the fresh noise of each step (0: deterministic, 1: DDPM-like); negative is meaningless.
    (Whether a large eta fits a grid is checked by ``ddim_schedule``.)"""
    if not eta >= 0.0:
        raise MethodArgumentError(f"eta must be >= 0, got {eta}")


def ddim_timesteps(num_train_timesteps: int, steps: int, start: float = 1.0, stop: float = 0.0) -> torch.Tensor:
    """The official 'uniform' DDIM grid, ascending (int64): ``arange(steps) * (T' // steps) + 1`` with
    ``T' = round(start * T)`` (``start`` = 1: the official grid; < 1: the same grid over a truncated
    range, for samplers that start from a noised initial estimate instead of pure noise).
    ``stop`` > 0 shifts the grid to ``(round(stop * T), round(start * T)]``, for samplers that return
    their clean estimate at an intermediate noise level."""
    check_range(start, stop)
    offset = round(stop * num_train_timesteps)
    span = round(start * num_train_timesteps) - offset
    if steps < 1:
        raise ValueError(f"DDIM steps must be at least 1, got {steps}")
    if steps > span - 1:
        raise ValueError(
            f"{steps} steps do not fit between stop {stop} and start {start} ({span} timesteps): "
            f"use at most {span - 1} steps"
        )
    return offset + torch.arange(steps, dtype=torch.int64) * (span // steps) + 1


@dataclass(frozen=True)
class DDIMSchedule:
    """Per-step constants, in **sampling order** (index 0 is the first, noisiest step)."""

    timesteps: torch.Tensor  # (S,) int64
    alphas: torch.Tensor  # (S,) float32, alpha_bar at t
    alphas_prev: torch.Tensor  # (S,) float64 (float32 values), alpha_bar at the next (smaller) grid point
    sigmas: torch.Tensor  # (S,) float64
    sqrt_one_minus_alphas: torch.Tensor  # (S,) float32

    def __len__(self) -> int:
        return self.timesteps.shape[0]


def ddim_schedule(
    alphas_cumprod: torch.Tensor, steps: int, eta: float = 1.0, start: float = 1.0, stop: float = 0.0
) -> DDIMSchedule:
    """Constants of the official ``DDIMSampler.make_schedule`` for ``steps`` uniform steps (over the
    ``[stop, start]`` fraction of the diffusion, see ``ddim_timesteps``); the last step's ``a_prev`` is
    ``alphas_cumprod[round(stop * T)]`` (``alphas_cumprod[0]`` for the official full grid)."""
    check_eta(eta)
    ac = alphas_cumprod.detach().float().cpu()
    t = ddim_timesteps(ac.shape[0], steps, start, stop)
    a = ac[t]
    a_prev = torch.cat([ac[t[:1] - 1], ac[t[:-1]]]).double()
    # the official numpy/torch mix computes 1/(1 - a) in float32, the rest in float64
    var = (1 - a).reciprocal().double() * (1 - a_prev) * (1 - a.double() / a_prev)
    # math.sqrt is correctly rounded; torch's vectorised float64 sqrt can be off by an ulp
    sigmas = torch.tensor([eta * math.sqrt(v) for v in var.tolist()], dtype=torch.float64)
    if bool((sigmas.float() ** 2 > 1 - a_prev.float()).any()):
        raise ValueError(f"eta={eta} is too large: sigma exceeds sqrt(1 - alpha_prev)")
    # numpy's float32 sqrt of the float32 1 - a (correctly rounded), as the official buffer
    sqrt_one_minus = torch.tensor([math.sqrt(v) for v in (1 - a).tolist()], dtype=torch.float64).float()
    return DDIMSchedule(t.flip(0), a.flip(0), a_prev.flip(0), sigmas.flip(0), sqrt_one_minus.flip(0))


def ddim_step(
    x: torch.Tensor, eps: torch.Tensor, schedule: DDIMSchedule, i: int, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``i`` of the official DDIM update: returns (x_prev, pred_x0).

    The same torch ops as the official ``p_sample_ddim``, on ``torch.full((B,1,1,1), value)`` float32
    constants, so that even the rounding of torch's float32 ``sqrt`` is the same.
    """

    def full(v):
        return torch.full((x.shape[0], 1, 1, 1), float(v), dtype=torch.float32, device=x.device)

    a_t, a_prev, sigma_t = full(schedule.alphas[i]), full(schedule.alphas_prev[i]), full(schedule.sigmas[i])
    sqrt_one_minus_at = full(schedule.sqrt_one_minus_alphas[i])
    pred_x0 = (x - sqrt_one_minus_at * eps) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * eps
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt + sigma_t * noise
    return x_prev, pred_x0


def ddim_sample(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    schedule: DDIMSchedule,
    *,
    generator: torch.Generator | None = None,
    randn: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Run the DDIM chain from ``x_T``; returns the final sample x_0.

    ``eps_fn(x, t)`` gets ``t`` as a (B,) int64 tensor. Noise comes from ``randn(shape)`` if given, else
    ``torch.randn(shape, generator=generator)`` (on the generator's device, then moved to ``x_T``'s).
    ``callback(info)`` is called after every step with ``i``, ``t``, ``x_t`` (the step's input),
    ``x`` (its output, the next state), ``pred_x0`` and ``eps``.
    """
    if randn is None:

        def randn(shape):
            dev = generator.device if generator is not None else x_T.device
            return torch.randn(shape, generator=generator, device=dev, dtype=x_T.dtype)

    x = x_T
    b = x.shape[0]
    for i in range(len(schedule)):
        t = int(schedule.timesteps[i])
        eps = eps_fn(x, torch.full((b,), t, dtype=torch.int64, device=x.device))
        noise = randn(tuple(x.shape)).to(device=x.device, dtype=x.dtype)
        x_prev, pred_x0 = ddim_step(x, eps, schedule, i, noise)
        if callback is not None:
            callback({"i": i, "t": t, "x_t": x, "x": x_prev, "pred_x0": pred_x0, "eps": eps})
        x = x_prev
    return x
