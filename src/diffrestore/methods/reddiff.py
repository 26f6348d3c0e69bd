"""RED-diff: variational diffusion sampling (Mardani, Song, Kautz & Vahdat, ICLR 2024).

Instead of following a reverse diffusion, RED-diff fits the mean ``mu`` of a (degenerate) Gaussian
posterior with Adam: the loss is the measurement misfit plus a regulariser that the diffusion
denoiser supplies at one timestep per iteration (score distillation, walked from high to low noise).
A re-implementation of the official code (NVlabs/RED-diff, ``algos/reddiff.py``) against our
:class:`~diffrestore.operators.base.LinearOperator` / :class:`~diffrestore.priors.base.PixelPrior`
contracts; fed the same operator factors, Gaussian draws and network outputs, it reproduces the
official iterates step by step (see ``tests/methods/test_reddiff_golden.py``). In normal use our exact
operators are used; the official ones (DDRM's, with a 4-tap "Gaussian" blur whose singular values are
laid out in the wrong order, and a pseudo-inverse that passes zero-singular directions through) appear
only in that test.

``mu`` starts at ``H^+ y`` (no noise). For each timestep ``t`` (``0, s, 2s, ...`` walked in reverse):

* draws ``n0``, ``n`` (both ``(B, C, H, W)``, in that order; ``n0`` is drawn even when unused);
* ``x0 = mu + sigma_x0 n0``, ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n``, ``eps = net(x_t, t)`` (no
  gradient through the network);
* loss ``w_t mean((eps - n) x0) + obs_weight mean((y - H x0)^2) / 2`` with ``w_t = lambda sqrt(1 - a_t) /
  sqrt(a_t)`` (the official "linear" weighting, i.e. the inverse square-root SNR), means per image
  over its D pixels and m measurements; its gradient
  ``w_t (eps - n) / D - obs_weight H^T (y - H x0) / m`` is formed directly (the same values autograd
  gives);
* one Adam step on ``mu`` (betas 0.9 / 0.99, eps 1e-8, no weight decay, torch's formulas).

The result, as the official runner saves it, is ``x0`` of the last iteration (``mu`` before the last
Adam step when ``sigma_x0 = 0``). As in the official code (and unlike the paper's misfit
``||y - H mu||^2 / (2 sigma_y^2)``), ``sigma_y`` does not enter the loss: the measurement term's weight is
``obs_weight`` whatever the noise. The network is only evaluated, never differentiated, so frozen
graphs and bf16 priors work.
"""

from __future__ import annotations

import math

import torch

from ..operators.base import LinearOperator
from ..priors.base import PixelPrior
from .common import (
    MethodArgumentError, RandnFn, StepCallback, StepInfo, alpha_bar, check_measurement, make_randn,
    uniform_skip_timesteps,
)

__all__ = ["restore", "check_values"]

#: Adam's hyper-parameters in the official code
ADAM_BETAS = (0.9, 0.99)
ADAM_EPS = 1e-8


def check_values(*, lr: float, reg_weight: float, obs_weight: float, sigma_x0: float, **_) -> None:
    """The option values RED-diff accepts: a positive learning rate, non-negative weights and std."""
    if not 0.0 < lr < math.inf:
        raise MethodArgumentError(f"lr must be > 0 and finite, got {lr}")
    for name, value in (("reg_weight", reg_weight), ("obs_weight", obs_weight), ("sigma_x0", sigma_x0)):
        if not 0.0 <= value < math.inf:
            raise MethodArgumentError(f"{name} must be >= 0 and finite, got {value}")


def reg_schedule(ac: torch.Tensor, t: int, reg_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a_t, w_t)`` as float32 0-dim tensors: ``w_t = reg_weight sqrt(1 - a_t) / sqrt(a_t)``."""
    a_t = alpha_bar(ac, t)
    return a_t, (1 - a_t).sqrt() / a_t.sqrt() * reg_weight


class _Adam:
    """Adam on one tensor with torch's single-tensor formulas (no weight decay, no amsgrad)."""

    def __init__(self, param: torch.Tensor, lr: float):
        self.p, self.lr, self.k = param, lr, 0
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)

    def step(self, grad: torch.Tensor) -> None:
        b1, b2 = ADAM_BETAS
        self.k += 1
        self.m.lerp_(grad, 1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v.sqrt() / math.sqrt(1 - b2**self.k)).add_(ADAM_EPS)
        self.p.addcdiv_(self.m, denom, value=-self.lr / (1 - b1**self.k))


@torch.no_grad()
def restore(
    prior: PixelPrior, operator: LinearOperator, y: torch.Tensor, *, sigma_y: float, steps: int = 20,
    lr: float = 0.1, reg_weight: float = 0.25, obs_weight: float = 1.0, sigma_x0: float = 0.0,
    generator: torch.Generator | None = None, randn: RandnFn | None = None, callback: StepCallback | None = None,
) -> torch.Tensor:
    """Restore ``x`` from ``y = H x + sigma_y n`` with RED-diff.

    Args:
        prior: pixel-space epsilon model (only evaluated).
        operator: the degradation ``H`` with its implicit SVD (``pinv`` for the start, ``H`` / ``Ht``).
        y: measurements ``(B, *operator.measurement_shape)``.
        sigma_y: measurement noise std in [-1, 1] units (checked; the official loss does not use it).
        steps: Adam iterations, one network call each, at timesteps ``0, s, 2s, ...`` (``s = T // steps``)
            from high to low noise. The paper runs 1000.
        lr: Adam's learning rate (official default 0.1; the official deblur command uses 0.5).
        reg_weight: lambda, the weight of the denoiser regulariser (official 0.25).
        obs_weight: weight of the measurement misfit (official 1.0).
        sigma_x0: std of the noise added to ``mu`` before noising (official 0).
        generator: source of the default Gaussian draws.
        randn: ``randn(shape) -> Tensor`` replacing the default source (official order, see module
            docstring), e.g. to replay a reference's draws.
        callback: ``callback(info)`` once per network call with a :class:`~.common.StepInfo` (``x_t`` the
            noised image the network evaluated, ``x0`` the iterate it was noised from, ``grad`` the
            gradient of the loss, ``mu`` the mean after the Adam step).

    Returns:
        x_hat ``(B, C, H, W)``: ``x0`` of the last iteration (not clamped).
    """
    check_measurement(operator, y, sigma_y)
    check_values(lr=lr, reg_weight=reg_weight, obs_weight=obs_weight, sigma_x0=sigma_x0)
    seq = uniform_skip_timesteps(prior.num_timesteps, steps)
    device = y.device
    dtype = y.dtype if y.is_floating_point() else torch.float32
    B, C = y.shape[0], operator.in_shape[0]
    img_shape = (B, *operator.in_shape)
    D, m = operator.D, operator.m
    if randn is None:
        randn = make_randn(generator, device, dtype)
    ac = prior.alphas_cumprod.detach().to("cpu", torch.float32)
    y = y.to(dtype)

    mu = operator.pinv(y).reshape(img_shape).to(dtype).clone()
    adam = _Adam(mu, lr)
    for k, t in enumerate(reversed(seq)):
        n0 = randn(img_shape).to(device=device, dtype=dtype)
        n = randn(img_shape).to(device=device, dtype=dtype)
        # x0 = mu + sigma_x0 n0, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n, eps = net(x_t, t)
        x0 = mu + n0 * sigma_x0  # a new tensor: the Adam step below changes mu in place
        a_t, w_t = reg_schedule(ac, t, reg_weight)
        x_t = x0 * float(a_t.sqrt()) + n * float((1 - a_t).sqrt())
        eps = prior.eps(x_t, torch.full((B,), float(t), device=device, dtype=torch.float32))
        if eps.shape[1] == 2 * C:  # learned-sigma output: keep the epsilon channels
            eps = eps[:, :C]
        # the loss's gradient w_t (eps - n) / D - obs_weight H^T (y - H x0) / m, then one Adam step on mu
        misfit = operator.Ht(y - operator.H(x0)).reshape(img_shape)
        grad = (eps.to(dtype) - n) * (float(w_t) / D) - misfit * (obs_weight / m)
        adam.step(grad)
        if callback is not None:
            callback(StepInfo(i=k, steps=len(seq), t=t, x_t=x_t, x0=x0, grad=grad, mu=mu.clone()))
    return x0
