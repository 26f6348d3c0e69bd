"""DDNM and DDNM+: Denoising Diffusion Null-space Models (Wang, Yu & Zhang, ICLR 2023).

A re-implementation of the official SVD sampler (wyhuai/DDNM, ``functions/svd_ddnm.py``) written
against our :class:`~diffrestore.operators.base.LinearOperator` contract, so it runs on any operator
with SVD parts. It reproduces the official states step by step when fed the same operator factors
and Gaussian draws (with the ``official_*`` options); see ``tests/methods/test_ddnm_golden.py``.

Each step predicts ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)`` (never clamped) and corrects it
in the range of ``H = U diag(s) V^T``: with ``r = V^T H^+ (H x0 - y)`` (on observed rows
``(V^T x0)_i - (U^T y)_i / s_i``, 0 elsewhere),

* DDNM (``sigma_y = 0``): ``x0_hat = x0 - V r`` (so ``H x0_hat = y``), and
  ``x_next = sqrt(a') x0_hat + sigma' eta z + sigma' sqrt(1 - eta^2) eps`` with
  ``sigma' = sqrt(1 - a')``: here ``eta`` splits the whole variance of the next state between fresh
  noise ``z`` and the predicted noise (not DDIM's eta);
* DDNM+ (``sigma_y > 0``): the correction is scaled per spectral row, ``x0_hat = x0 - V(lambda r)``,
  so that the measurement noise it brings in (``lambda sigma_y / s``) stays below what the next
  state can absorb: ``lambda = s sigma' sqrt(1 - eta^2) / (sqrt(a') sigma_y)`` on rows with
  ``sigma' < sqrt(a') sigma_y / s``, else 1. The noise is added per row as
  ``V(d1 z' + d2 eps')``: ``d1 = sigma' eta, d2 = 0`` on those rows; ``d1 = sqrt(sigma'^2 -
  a' sigma_y^2 / s^2), d2 = 0`` on the other observed rows; ``d1 = sigma' eta, d2 = sigma'
  sqrt(1 - eta^2)`` on unobserved rows (``s = 0``). The last step (``a' = 1``, ``sigma' = 0``)
  has ``lambda = 0``: the output is the last raw prediction, without the noisy measurement mixed
  in (the paper's posterior step has zero variance there too, so this is kept as published).

Schedule: ``skip = T // steps`` and the network is called at ``t = i * skip`` for ``i = steps-1 ..
0`` (so 6 steps of 1000 start at 830, not 999); with ``travel_length`` L and ``travel_repeat`` R
> 1, RePaint's "time travel" jumps back L indices after each block of L steps (R - 1 times per
block), re-noising the state, before walking down again. Gaussian draws, in order: the initial
image (B, C, H, W), then one image per time pair (travel pairs and the last step included).

Two places where the official code departs from its paper; the default follows the paper and an
option restores the official behaviour (used by the golden test):

* ``official_eps_basis``: DDNM+'s ``eps`` term enters the spectral rows through a fixed reordering
  of its pixels instead of ``V^T eps``, so each row gets an unrelated pixel of ``eps`` (harmless
  for the iid ``z``, not for ``eps``). The reordering is the operator's ``spectral_pixel_order``
  when it defines one (the official operator layouts do), else ``V^T`` itself when ``V`` is a
  permutation (identity, inpainting: no difference there), else the identity (the official
  colorization layout; our separable SR/blur bases have no official counterpart).
* ``official_travel``: a time-travel pair ``t -> t'`` re-noises the latest *raw* prediction,
  ``sqrt(a_t') x0 + sqrt(1 - a_t') z`` (dropping its range-space correction), where the paper
  diffuses the current state forward, ``x_t' ~ q(x_t' | x_t)``.

Fresh noise always enters DDNM+'s spectral rows through that same reordering (it is iid, so any
reordering is equally correct), so the two ``eps`` bases differ in nothing else.
"""

from __future__ import annotations

import math

import torch

from ..operators.base import LinearOperator
from ..priors.base import PixelPrior
from .common import (
    MethodArgumentError, RandnFn, StepCallback, StepInfo, alpha_bar, check_measurement, check_svd_operator,
    sampler_setup,
)

__all__ = ["restore", "check_values", "travel_schedule", "time_pairs"]


def check_values(*, eta: float, travel_length: int = 1, travel_repeat: int = 1, **_) -> None:
    """The option values DDNM accepts: ``eta`` is a share of variance in [0, 1]; the time-travel
    length and repeat count are positive integers (1 and 1: no time travel)."""
    if not 0.0 <= eta <= 1.0:
        raise MethodArgumentError(f"eta must be in [0, 1], got {eta}")
    for name, value in (("travel_length", travel_length), ("travel_repeat", travel_repeat)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MethodArgumentError(f"{name} must be an integer >= 1, got {value!r}")


def travel_schedule(steps: int, length: int, repeat: int) -> list[int]:
    """RePaint's jump schedule over step indices: from ``steps - 1`` down to 0, then -1; after
    reaching an index ``j`` that is a multiple of ``length`` below ``steps - length``, go back up
    ``length`` indices, ``repeat - 1`` times per such ``j``."""
    jumps_left = {j: repeat - 1 for j in range(0, steps - length, length)}
    out: list[int] = []
    i = steps
    while i > 0:
        i -= 1
        out.append(i)
        if jumps_left.get(i, 0) > 0:
            jumps_left[i] -= 1
            out.extend(range(i + 1, i + length + 1))
            i += length
    out.append(-1)
    return out


def time_pairs(num_timesteps: int, steps: int, length: int = 1, repeat: int = 1) -> list[tuple[int, int]]:
    """``(t, t_next)`` timestep pairs the sampler walks: index ``i`` is timestep ``i * (T // steps)``,
    index -1 is -1 (``alpha_bar = 1``). ``t_next < t``: a denoising step; ``t_next > t``: time travel."""
    steps = int(steps)
    if not 1 <= steps <= num_timesteps:
        raise MethodArgumentError(f"steps must be in [1, {num_timesteps}], got {steps}")
    skip = num_timesteps // steps
    ts = [max(i * skip, -1) for i in travel_schedule(steps, length, repeat)]
    return list(zip(ts[:-1], ts[1:]))


def _pixel_order(operator: LinearOperator) -> torch.Tensor:
    """For each spectral row, the flat (c, h, w) pixel index the operator's layout ties to it (see the
    module docstring, ``official_eps_basis``); (D,) int64 on the CPU."""
    order = getattr(operator, "spectral_pixel_order", None)
    D = operator.D
    if order is not None:
        return torch.as_tensor(order).reshape(-1).long().cpu()
    probe = operator.Vt(torch.arange(D, dtype=torch.float64).reshape(1, *operator.in_shape)).reshape(-1).cpu()
    idx = probe.round()
    if torch.equal(idx, probe) and torch.equal(idx.sort().values, torch.arange(D, dtype=torch.float64)):
        return idx.long()  # V is a permutation: its own order
    return torch.arange(D)


def _plus_coefficients(s: torch.Tensor, sqrt_a: float, sigma: float, sigma_y: float, eta: float):
    """DDNM+'s per-row (lambda, d1, d2) for the step to a state with ``alpha_bar = sqrt_a^2`` and noise
    std ``sigma`` (module docstring); ``s`` (D,) with 0 on unobserved rows."""
    observed = s > 0
    y_std = sqrt_a * sigma_y / torch.where(observed, s, torch.ones_like(s))  # measurement noise at the row's scale
    quiet = observed & (sigma < y_std)  # the state's noise is below the measurement's
    keep = math.sqrt(1.0 - eta**2)
    lam = torch.where(quiet, s * (sigma * keep / (sqrt_a * sigma_y)), torch.ones_like(s))
    d1 = torch.where(observed & ~quiet, (sigma**2 - y_std**2).clamp_min(0).sqrt(), torch.full_like(s, sigma * eta))
    d2 = torch.where(observed, torch.zeros_like(s), torch.full_like(s, sigma * keep))
    return lam, d1, d2


def _padded_singulars(values: torch.Tensor, D: int, like: torch.Tensor) -> torch.Tensor:
    s = values.detach().reshape(-1).to(device=like.device, dtype=like.dtype)
    return torch.cat([s, s.new_zeros(D - s.shape[0])]) if s.shape[0] < D else s


@torch.no_grad()
def restore(
    prior: PixelPrior, operator: LinearOperator, y: torch.Tensor, *, sigma_y: float, steps: int = 100,
    eta: float = 0.85, travel_length: int = 1, travel_repeat: int = 1, generator: torch.Generator | None = None,
    randn: RandnFn | None = None, callback: StepCallback | None = None, x_T: torch.Tensor | None = None,
    official_eps_basis: bool = False, official_travel: bool = False, lambda_singulars: torch.Tensor | None = None,
) -> torch.Tensor:
    """Restore ``x`` from ``y = H x + sigma_y n``: DDNM when ``sigma_y = 0``, DDNM+ otherwise.

    Args:
        prior: pixel-space epsilon model; ``prior.eps(x_t, t)`` with ``t`` a float tensor (B,).
        operator: the degradation ``H`` with its implicit SVD (an operator without one is refused).
        y: measurements ``(B, *operator.measurement_shape)``.
        sigma_y: measurement noise std in [-1, 1] units (0: noiseless DDNM).
        steps: network calls without time travel (``T // steps`` apart; official ``T_sampling``).
        eta: share of the next state's noise std drawn fresh (the rest is the predicted eps).
        travel_length, travel_repeat: RePaint time travel (official ``travel_length``,
            ``travel_repeat``); 1 and 1 turn it off. Each repeat costs ``travel_length`` more calls.
        generator: source of the default Gaussian draws (used on its own device).
        randn: ``randn(shape) -> Tensor`` replacing the default source, called in the official
            order and shapes (module docstring), e.g. to replay a reference's draws.
        callback: ``callback(info)`` once per network call with a :class:`~.common.StepInfo`
            (``i``, ``steps`` = number of calls, ``t``, ``x_t`` the evaluated state, ``x0`` its raw
            prediction, ``x0_hat`` the range-corrected one, computed when read).
        x_T: the initial image ``(B, C, H, W)``; replaces the first draw.
        official_eps_basis, official_travel: the official code's departures from the paper
            (module docstring); for replaying official references and measuring their effect.
        lambda_singulars: singular values (m,) for DDNM+'s lambda/d1/d2 only, in the operator's
            spectral order (default: ``operator.singulars``). Only to replay the official
            deblurring, whose scaling uses other singular values than its pseudo-inverse.

    Returns:
        The last state ``(B, C, H, W)`` (not clamped): DDNM's last ``x0_hat``; DDNM+'s last raw
        prediction.
    """
    check_svd_operator(operator, "ddnm")
    check_measurement(operator, y, sigma_y)
    check_values(eta=eta, travel_length=travel_length, travel_repeat=travel_repeat)
    pairs = time_pairs(prior.num_timesteps, steps, travel_length, travel_repeat)
    n_calls = sum(1 for t, t_next in pairs if t_next < t)
    sigma_y = float(sigma_y)
    noisy = sigma_y > 0

    device, dtype, img_shape, draw_shape = sampler_setup(operator, y, generator, randn)
    B, C = img_shape[:2]
    D = operator.D

    def draw() -> torch.Tensor:
        return draw_shape(img_shape)

    ac = prior.alphas_cumprod.detach().to("cpu", torch.float32)
    like = torch.empty(0, device=device, dtype=dtype)
    s = _padded_singulars(operator.singulars, D, like)
    observed = s > 0
    m = operator.m
    ybar = torch.zeros(B, D, device=device, dtype=dtype)
    ybar[:, :m] = operator.Ut(y).reshape(B, m).to(dtype) / torch.where(observed[:m], s[:m], torch.ones_like(s[:m]))
    s_lam = s if lambda_singulars is None else _padded_singulars(lambda_singulars, D, like)
    order = _pixel_order(operator) if noisy else torch.arange(D)
    order = None if torch.equal(order, torch.arange(D)) else order.to(device)

    def reorder(v: torch.Tensor) -> torch.Tensor:  # pixels onto spectral rows, no rotation
        v = v.reshape(B, D)
        return v if order is None else v.index_select(1, order)

    if x_T is None:
        x = draw()
    else:
        if tuple(x_T.shape) != img_shape:
            raise MethodArgumentError(f"x_T must have shape {img_shape}, got {tuple(x_T.shape)}")
        x = x_T.to(device=device, dtype=dtype)

    x0 = None
    k = 0
    for t, t_next in pairs:
        a_next = alpha_bar(ac, t_next)
        sqrt_an, sigma_n = float(a_next.sqrt()), float((1 - a_next).sqrt())
        if t_next > t:  # time travel back to t_next: re-noise the raw x0 (official) or x_t ~ q(x_t' | x_t)
            z = draw()
            if official_travel:
                x = x0 * sqrt_an + z * sigma_n
            else:
                ratio = a_next / alpha_bar(ac, t)
                x = x * float(ratio.sqrt()) + z * float((1 - ratio).sqrt())
            continue
        a_t = alpha_bar(ac, t)
        et = prior.eps(x, torch.full((B,), float(t), device=device, dtype=torch.float32))
        if et.shape[1] == 2 * C:  # learned-sigma output: keep the epsilon channels
            et = et[:, :C]
        et = et.to(dtype)
        # x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
        x0 = torch.sub(x, et, alpha=float((1 - a_t).sqrt())).div_(float(a_t.sqrt()))
        # r = V^T H^+ (H x0 - y): the range-space error of x0, zero on unobserved rows
        r = torch.where(observed, operator.Vt(x0).reshape(B, D).to(dtype) - ybar, 0.0)
        z = draw()
        if not noisy:
            # DDNM: x0_hat = x0 - V r, x' = sqrt(a') x0_hat + sigma' (eta z + sqrt(1 - eta^2) eps)
            x0_hat = x0 - operator.V(r).reshape(img_shape).to(dtype)
            x_next = x0_hat * sqrt_an + z * (sigma_n * eta) + et * (sigma_n * math.sqrt(1 - eta**2))
            hat = x0_hat
        else:
            # DDNM+: x0_hat = x0 - V(lambda r), x' = sqrt(a') x0_hat + V(d1 z' + d2 eps') row by row
            lam, d1, d2 = _plus_coefficients(s_lam, sqrt_an, sigma_n, sigma_y, eta)
            e_rows = reorder(et) if official_eps_basis else operator.Vt(et).reshape(B, D)
            spec = d1 * reorder(z) + d2 * e_rows.to(dtype) - (sqrt_an * lam) * r
            x_next = x0 * sqrt_an + operator.V(spec).reshape(img_shape).to(dtype)
            lam_r = lam * r
            hat = lambda x0=x0, lam_r=lam_r: x0 - operator.V(lam_r).reshape(img_shape).to(dtype)  # noqa: E731
        if callback is not None:
            callback(StepInfo(i=k, steps=n_calls, t=t, x_t=x, x0=x0, x0_hat=hat))
        x = x_next
        k += 1
    return x
