"""ΠGDM: pseudoinverse-guided diffusion models (Song, Vahdat, Mardani & Kautz, ICLR 2023).

A re-implementation of the official sampler (NVlabs/RED-diff, ``algos/pgdm.py``) against our
:class:`~diffrestore.operators.base.LinearOperator` / :class:`~diffrestore.priors.base.PixelPrior`
contracts. Fed the same operator factors, Gaussian draws and network, it reproduces the official
states step by step (see ``tests/methods/test_pigdm_golden.py``). In normal use our exact operators
are used; the official ones (DDRM's, with a 4-tap "Gaussian" blur whose singular values are laid out
in the wrong order, and a pseudo-inverse that passes zero-singular directions through undivided)
appear only in that test.

Each step (timestep ``t`` to the previous one ``s``, ``a`` the cumulative alpha, ``a(-1) = 1``):

* ``eps = net(x_t, t)``, ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)`` (never clamped);
* the guidance residual ``mat`` (detached), ``H^+ y - H^+ H x0`` for a noiseless ``y``;
* ``g = (d x0 / d x_t)^T mat``: a vector-Jacobian product through the network (autograd);
* ``x_s = sqrt(a_s) x0 + c1 z + c2 eps + sqrt(a_s) sqrt(a_t) w g`` with the DDIM coefficients
  ``c1 = eta sqrt((1 - a_t/a_s)(1 - a_s)/(1 - a_t))``, ``c2 = sqrt(1 - a_s - c1^2)`` and the
  guidance weight ``w``. The last step (``a_s = 1``) returns ``x0 + sqrt(a_0) w g``.

The state starts from the measurement, not from pure noise:
``x_T = sqrt(a_T) H^+ y + sqrt(1 - a_T) n``. Gaussian draws, in order: ``n`` ``(B, C, H, W)``, then
one ``z`` of the same shape per step (drawn even when ``eta = 0`` and at the last step).

Noisy measurements. The official code uses ``H^+`` whatever ``sigma_y`` is, so measurement noise is
amplified by ``1 / s_i`` and pulled into the sample at full weight. The paper's guidance is
``H^T (r_t^2 H H^T + sigma_y^2 I)^-1 (y - H x0)`` with ``r_t^2 = 1 - a_t`` (the paper's
``sigma_t^2 / (1 + sigma_t^2)``, ``sigma_t^2 = (1 - a_t) / a_t``: the variance of x0 given x_t under a
unit-variance prior). In the SVD basis of ``H`` this is diagonal: row ``i`` of
``U^T (y - H x0)`` is scaled by ``r_t^2 s_i / (r_t^2 s_i^2 + sigma_y^2)`` (the ``r_t^2`` factor, which the
paper folds into its noiseless step size, makes it exactly ``H^+`` at ``sigma_y = 0``). That is the
default here, and the same weighting (at ``r_T``) replaces ``H^+`` in the initial state.
``official_ignore_sigma_y=True`` restores the official behaviour (the golden test uses it); for
``sigma_y = 0`` both are the same.

Gradients. The vector-Jacobian product needs autograd through the prior's ``eps`` (one backward pass
per step, so a step costs a few times DDRM's; docs/methods.md). A prior run as
frozen TorchScript graphs cannot give it and is refused, as is any prior whose ``eps`` comes back
without a graph; a bf16 prior works (its backward pass runs in bf16).
"""

from __future__ import annotations

import torch

from ..operators.base import LinearOperator
from ..priors.base import PixelPrior
from .common import (
    MethodArgumentError, RandnFn, StepCallback, StepInfo, alpha_bar, check_measurement, make_randn,
    previous_timesteps, uniform_skip_timesteps,
)

__all__ = ["restore", "check_values"]

NO_GRADIENTS = "pigdm needs gradients through the prior's network"


def check_values(*, eta: float, guidance_weight: float, **_) -> None:
    """The option values ΠGDM accepts: ``eta`` a share in [0, 1], a non-negative guidance weight."""
    if not 0.0 <= eta <= 1.0:
        raise MethodArgumentError(f"eta must be in [0, 1], got {eta}")
    if not 0.0 <= guidance_weight < float("inf"):
        raise MethodArgumentError(f"guidance_weight must be >= 0 and finite, got {guidance_weight}")


def check_differentiable_prior(prior: PixelPrior, method: str = "pigdm") -> None:
    """Refuse a prior that runs its network as frozen graphs (they have no backward pass)."""
    if getattr(prior, "uses_frozen_graphs", False):
        raise MethodArgumentError(f"{method} needs gradients through the prior's network; run without --frozen-graphs")


def weighted_inverse(operator: LinearOperator, r: torch.Tensor, r2: float, sigma_y: float) -> torch.Tensor:
    """``V diag(r2 s / (r2 s^2 + sigma_y^2)) U^T r``: ``r2 H^T (r2 H H^T + sigma_y^2 I)^-1 r``, the
    noise-aware pseudo-inverse (``H^+`` when ``sigma_y = 0``; 0 on rows with ``s = 0``)."""
    B = r.shape[0]
    u = operator.Ut(r).reshape(B, -1)
    s = operator.singulars_as(u)
    denom = r2 * s * s + sigma_y**2
    w = torch.where(s > 0, r2 * s / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(s))
    return operator.V(operator._pad_spectral(u * w))


def make_guidance(operator: LinearOperator, y: torch.Tensor, sigma_y: float, official_ignore_sigma_y: bool):
    """``residual(x0, a) -> mat``: the guidance vector for a prediction ``x0`` at cumulative alpha ``a``
    (detached), ``H^+ y - H^+ H x0`` officially, the noise-aware inverse of ``y - H x0`` otherwise."""
    img_shape = (y.shape[0], *operator.in_shape)
    if float(sigma_y) > 0 and not official_ignore_sigma_y:
        return lambda x0, a: weighted_inverse(operator, y - operator.H(x0), float(1 - a), sigma_y).reshape(img_shape)
    pinv_y = operator.pinv(y).reshape(img_shape)  # fixed across steps
    return lambda x0, a: pinv_y - operator.pinv(operator.H(x0)).reshape(img_shape)


def pigdm_step(prior, x_t, t: int, a_t, a_s, residual, z, *, eta: float, guidance_weight: float):
    """One ΠGDM step from ``x_t`` at timestep ``t`` (cumulative alphas ``a_t``, ``a_s``: float32 0-dim
    tensors) with the fresh draw ``z``; returns ``(x_s, x0, eps, g)`` (all detached)."""
    C = x_t.shape[1]
    # DDIM coefficients c1 (fresh noise), c2 (predicted noise) and the guidance scale sqrt(a_s) sqrt(a_t) w
    c1 = ((1 - a_t / a_s) * (1 - a_s) / (1 - a_t)).sqrt() * eta
    c2 = ((1 - a_s) - c1**2).sqrt()
    coeff = a_s.sqrt() * a_t.sqrt() * guidance_weight
    # x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), kept on the autograd graph
    x = x_t.detach().requires_grad_(True)
    t_tensor = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
    with torch.enable_grad():
        eps = prior.eps(x, t_tensor)
        if eps.shape[1] == 2 * C:  # learned-sigma output: keep the epsilon channels
            eps = eps[:, :C]
        x0 = (x - eps * float((1 - a_t).sqrt())) / float(a_t.sqrt())
    if not eps.requires_grad:
        raise MethodArgumentError(f"{NO_GRADIENTS}; this prior's eps is not differentiable")
    # g = (d x0 / d x_t)^T mat, mat the (weighted) pseudo-inverse of the residual y - H x0
    x0_d, eps = x0.detach(), eps.detach()
    mat = residual(x0_d, a_t).to(x0_d)
    (g,) = torch.autograd.grad(x0, x, grad_outputs=mat)
    # x_s = sqrt(a_s) x0 + c1 z + c2 eps + sqrt(a_s) sqrt(a_t) w g
    x_s = x0_d * float(a_s.sqrt()) + z * float(c1) + eps * float(c2) + g * float(coeff)
    return x_s, x0_d, eps, g


@torch.no_grad()
def restore(
    prior: PixelPrior, operator: LinearOperator, y: torch.Tensor, *, sigma_y: float, steps: int = 20,
    eta: float = 1.0, guidance_weight: float = 1.0, official_ignore_sigma_y: bool = False,
    generator: torch.Generator | None = None, randn: RandnFn | None = None, callback: StepCallback | None = None,
) -> torch.Tensor:
    """Restore ``x`` from ``y = H x + sigma_y n`` with ΠGDM.

    Args:
        prior: pixel-space epsilon model whose ``eps`` autograd can differentiate.
        operator: the degradation ``H`` with its implicit SVD.
        y: measurements ``(B, *operator.measurement_shape)``.
        sigma_y: measurement noise std in [-1, 1] units.
        steps: skip steps: timesteps ``0, s, 2s, ...`` with ``s = T // steps`` (one network call and
            one backward pass each). The paper reports 100 steps.
        eta: DDIM eta, the share of fresh noise (1.0 as the official SR and deblur commands run it).
        guidance_weight: weight ``w`` of the pseudo-inverse guidance (official default 1.0).
        official_ignore_sigma_y: use ``H^+`` for any ``sigma_y`` as the official code does, instead of
            the paper's noise-aware inverse (see module docstring); only matters when ``sigma_y > 0``.
        generator: source of the default Gaussian draws.
        randn: ``randn(shape) -> Tensor`` replacing the default source (official order, see module
            docstring), e.g. to replay a reference's draws.
        callback: ``callback(info)`` once per step with a :class:`~.common.StepInfo` (``x_t`` the state
            the network evaluated at ``t``, ``x0`` its prediction, ``guidance`` the VJP ``g``).

    Returns:
        x_hat ``(B, C, H, W)`` (not clamped).
    """
    check_measurement(operator, y, sigma_y)
    check_values(eta=eta, guidance_weight=guidance_weight)
    check_differentiable_prior(prior)
    seq = uniform_skip_timesteps(prior.num_timesteps, steps)
    device = y.device
    dtype = y.dtype if y.is_floating_point() else torch.float32
    img_shape = (y.shape[0], *operator.in_shape)
    if randn is None:
        randn = make_randn(generator, device, dtype)
    ac = prior.alphas_cumprod.detach().to("cpu", torch.float32)
    residual = make_guidance(operator, y.to(dtype), float(sigma_y), official_ignore_sigma_y)

    a_T = alpha_bar(ac, seq[-1])
    # the inverse of y - H 0 at a_T: H^+ y officially (the guidance vector of a zero prediction)
    init = residual(torch.zeros(img_shape, device=device, dtype=dtype), a_T).to(dtype)
    n = randn(img_shape).to(device=device, dtype=dtype)
    x = init * float(a_T.sqrt()) + n * float((1 - a_T).sqrt())

    pairs = list(zip(reversed(seq), reversed(previous_timesteps(seq))))
    for k, (t, s) in enumerate(pairs):
        z = randn(img_shape).to(device=device, dtype=dtype)
        x_s, x0, _, g = pigdm_step(prior, x, t, alpha_bar(ac, t), alpha_bar(ac, s), residual, z,
                                   eta=eta, guidance_weight=guidance_weight)
        if callback is not None:
            callback(StepInfo(i=k, steps=len(pairs), t=t, x_t=x, x0=x0, guidance=g))
        x = x_s
    return x
