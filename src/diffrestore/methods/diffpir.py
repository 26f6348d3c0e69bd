"""DiffPIR: plug-and-play restoration with the diffusion model as denoiser (Zhu et al., CVPR 2023).

A re-implementation of the published path of the official code (yuanzhi-zhu/DiffPIR,
``main_ddpir_sisr.py`` / ``main_ddpir_deblur.py``: ``model_output_type='pred_xstart'``, closed-form
data step, one sub-iteration) on our :class:`~diffrestore.operators.base.LinearOperator` /
:class:`~diffrestore.priors.base.PixelPrior` contracts. ``tests/methods/test_diffpir_golden.py``
replays the official runs step by step.

Each step at timestep ``t`` (then ``t'``, the next one of the schedule):

1. ``x0 = clamp((x_t - sqrt(1 - a_t) eps(x_t, t)) / sqrt(a_t), -1, 1)`` (the network as denoiser);
2. data step: ``x0 <- argmin_x ||y - H x||^2 + rho_t ||x - x0||^2`` with
   ``rho_t = lambda_ (sigma_n / 2)^2 / sigma_t^2``, ``sigma_t = sqrt(1 - a_t) / sqrt(a_t)`` and
   ``sigma_n = max(sigma_y, 0.002)``. (The official code measures the measurement noise in [0, 1]
   units, hence the ``/ 2``; its ``lambda_`` values carry over unchanged.)
3. ``x_t' = sqrt(a_t') x0 + sqrt(1 - a_t') (sqrt(1 - zeta) eps_hat + sqrt(zeta) z)`` with
   ``eps_hat = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)`` (the noise the corrected x0 implies) and
   ``z`` a fresh Gaussian image (``zeta`` mixes fresh noise into the next state).

The data step. Our operators expose their SVD ``H = U diag(s) V^T``, where the proximal problem is
diagonal: on observed rows ``v_i = (s_i (U^T y)_i + rho (V^T x0)_i) / (s_i^2 + rho)``, on the null
space (and on singular values the operator reports as 0) ``x0``'s own coefficients, i.e.
``common.spectral_consistency`` with error std ratio ``sqrt(rho)``. This is exact for our
zero-border blurs, block-average / bicubic SR, inpainting and the rest. The official code instead
solves it by FFT, which assumes circular boundaries, and, for SR, a 25x25 bicubic kernel followed
by keeping one pixel per block -- a different operator from the one its measurement was made with
(MATLAB ``imresize``). Using the exact proximal step of the operator the measurement came from
removes that mismatch and the float32 cancellation of the official formula at small ``rho``. The
step is pluggable (``data_step``) so that tests can run the official FFT solution in our sampler.

Schedule: ``skip_type="quad"`` (official) takes timesteps ``t_start - int(sqrt(linspace(0,
(t_start + 1)^2, steps)))`` with the last one lowered by 1 (so the walk ends at t = 0);
``"uniform"`` takes them evenly spaced, ``steps`` of them (the official list has one more).

Initialisation at ``t_start`` from an image estimate ``x_start`` (default: the truncated
pseudo-inverse of ``y``, clamped to [-1, 1]): ``init="plain"`` is the official SR script's forward
diffusion ``sqrt(a_T) x_start + sqrt(1 - a_T) n``; ``init="noise-matched"`` is the official deblur
script's, which treats ``x_start`` as already noisy at the timestep ``t_y`` whose ``sigma_t`` is
nearest ``sigma_y`` and adds only the missing noise. (At t = 999 the image weighs 0.0064 against
noise of std 1: either barely matters.)

Official behaviours changed by default, each restored by an option:

* The official sampler calls the network once more at t = 0, discards that prediction and returns
  the state ``x_0`` that the previous update left (still noisy, std ``sqrt(1 - a_0)`` = 0.01, and not
  data-consistent). Here the last prediction goes through the data step and is returned: the same
  number of network calls, each one used. ``official_output=True`` returns the official ``x_0``.
* Kept: x0 clamped to [-1, 1] at every step (the data step's output is not); timesteps given to the
  network as int64. The official code takes x0's coefficients from guided-diffusion's float64
  schedule and the rest from its own float32 one; here all come from the prior's ``alphas_cumprod``
  in float64 (the two differ by < 1e-6 relative).
* Not offered: the official ``eta`` (DDIM noise, 0 in the official defaults and the paper), its
  sub-iterations (``iter_num_U > 1`` crashes the official scripts) and its dead settings
  (``noise_level_model``; the official ``t_start`` is overwritten to 999, here it is honoured).

Gaussian draws, in order: the initial image ``(B, C, H, W)``, then ``z`` ``(B, C, H, W)`` at every
step but the last (none when ``zeta = 0``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..operators.base import LinearOperator
from ..priors.base import PixelPrior
from .common import MethodArgumentError, RandnFn, StepCallback, StepInfo, make_randn, spectral_consistency

__all__ = ["restore", "check_values", "timesteps", "svd_data_step", "rho_schedule"]

#: ``data_step(x0, rho) -> x``: the minimiser of ``||y - H x||^2 + rho ||x - x0||^2`` (y bound inside)
DataStep = Callable[[torch.Tensor, float], torch.Tensor]

SKIP_TYPES = ("quad", "uniform")
INITS = ("plain", "noise-matched")
#: floor of the noise level rho is computed from (the official 0.001 in [0, 1] units)
SIGMA_N_MIN = 0.002


def check_values(*, lambda_: float, zeta: float, skip_type: str = "quad", init: str = "plain",
                 t_start: int = 999, **_) -> None:
    """The option values DiffPIR accepts."""
    if not (lambda_ >= 0.0 and math.isfinite(lambda_)):
        raise MethodArgumentError(f"lambda_ must be a finite number >= 0, got {lambda_}")
    if not 0.0 <= zeta <= 1.0:
        raise MethodArgumentError(f"zeta must be in [0, 1], got {zeta}")
    if skip_type not in SKIP_TYPES:
        raise MethodArgumentError(f"skip_type must be one of {', '.join(SKIP_TYPES)}, got {skip_type!r}")
    if init not in INITS:
        raise MethodArgumentError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if isinstance(t_start, bool) or int(t_start) != t_start or t_start < 0:
        raise MethodArgumentError(f"t_start must be an integer >= 0, got {t_start!r}")


def timesteps(steps: int, t_start: int = 999, skip_type: str = "quad") -> list[int]:
    """The network timesteps, descending from ``t_start`` to 0 (``steps`` of them; see module doc)."""
    steps = int(steps)
    if steps < 1 or steps > t_start + 1:
        raise MethodArgumentError(f"steps must be in [1, {t_start + 1}], got {steps}")
    if steps == 1:
        return [t_start]
    n = t_start + 1
    if skip_type == "quad":  # numpy's linspace: i * (stop / (steps - 1)), the last one exactly stop
        stop = float(n * n)
        seq = [int(math.sqrt(i * (stop / (steps - 1)))) for i in range(steps - 1)] + [int(math.sqrt(stop))]
        seq[-1] -= 1
    else:
        seq = [i * (n // (steps - 1)) for i in range(steps - 1)] + [t_start]
    ts = [t_start - s for s in seq]
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise MethodArgumentError(f"{steps} steps are too many for the {skip_type} schedule from t = {t_start}")
    return ts


def rho_schedule(alphas_cumprod: torch.Tensor, ts: list[int], lambda_: float, sigma_y: float) -> list[float]:
    """``rho_t = lambda_ (sigma_n / 2)^2 / sigma_t^2`` for each t of ``ts`` (float64 arithmetic)."""
    sigma_n = max(float(sigma_y), SIGMA_N_MIN) / 2
    a = alphas_cumprod.detach().to("cpu", torch.float64)
    return [lambda_ * sigma_n**2 * float(a[t] / (1 - a[t])) for t in ts]


def svd_data_step(operator: LinearOperator, y: torch.Tensor) -> DataStep:
    """The exact proximal data step of ``operator`` in its SVD basis (see module docstring)."""

    def step(x0: torch.Tensor, rho: float) -> torch.Tensor:
        # w_i = s_i^2 / (s_i^2 + rho): spectral_consistency's weight for sigma_y = sqrt(rho), tau = 1
        return spectral_consistency(operator, x0, y, math.sqrt(rho), 1.0)

    return step


def _initial_state(ac64: torch.Tensor, t_start: int, x_start: torch.Tensor, noise: torch.Tensor,
                   init: str, sigma_y: float) -> torch.Tensor:
    a_T = ac64[t_start]
    if init == "plain":
        scale, std = a_T.sqrt(), (1 - a_T).sqrt()
    else:  # x_start counts as x_{t_y}: scale it down to t_start and add only the missing noise
        sigma_t = ((1 - ac64) / ac64).sqrt()
        t_y = min(int((sigma_t - float(sigma_y)).abs().argmin()), t_start)
        scale = (a_T / ac64[t_y]).sqrt()
        std = ((1 - a_T) - scale**2 * (1 - ac64[t_y])).clamp_min(0).sqrt()
    return x_start * float(scale) + noise * float(std)


@torch.no_grad()
def restore(
    prior: PixelPrior, operator: LinearOperator, y: torch.Tensor, *, sigma_y: float, steps: int = 20,
    lambda_: float = 7.0, zeta: float = 0.3, skip_type: str = "quad", t_start: int = 999, init: str = "plain",
    official_output: bool = False, generator: torch.Generator | None = None, randn: RandnFn | None = None,
    callback: StepCallback | None = None, x_T: torch.Tensor | None = None, x_start: torch.Tensor | None = None,
    data_step: DataStep | None = None,
) -> torch.Tensor:
    """Restore ``x`` from ``y = H x + sigma_y n`` with DiffPIR.

    Args:
        prior: pixel-space epsilon model; ``prior.eps(x_t, t)`` with ``t`` an int64 tensor (B,).
        operator: the degradation ``H`` with its implicit SVD.
        y: measurements ``(B, *operator.measurement_shape)``, in [-1, 1] image units.
        sigma_y: measurement noise std in [-1, 1] units (0 for noiseless tasks).
        steps: number of network calls (the official ``iter_num``; its default and the paper's is 100).
        lambda_: weight of the prior in the data step (official: 7 for deblurring, swept 2-12 for SR).
        zeta: share of fresh noise in each update (official: 0.3 deblurring, 0.25 SR).
        skip_type: ``"quad"`` (official default) or ``"uniform"`` timestep spacing.
        t_start: the first timestep (999: start from pure noise).
        init: ``"plain"`` or ``"noise-matched"`` (see module docstring).
        official_output: return the official output, the t = 0 state (see module docstring).
        generator: source of the default Gaussian draws (used on its own device).
        randn: ``randn(shape) -> Tensor`` replacing the default source, called in the documented order.
        callback: ``callback(info)`` once per network call with a :class:`~.common.StepInfo`: ``x_t``
            the state the network saw, ``x0`` its (clamped) prediction, ``x0_data`` that prediction
            after the data step (None where none follows).
        x_T: the initial Gaussian image ``(B, C, H, W)``; replaces the first draw.
        x_start: the image estimate the initial state is made from (default: ``pinv(y)`` clamped).
        data_step: ``data_step(x0, rho) -> x`` replacing :func:`svd_data_step` (e.g. the official
            FFT solution, to replay the official code).

    Returns:
        x_hat ``(B, C, H, W)`` (not clamped).
    """
    meas_shape = tuple(operator.measurement_shape)
    if y.dim() < 1 or tuple(y.shape[1:]) != meas_shape:
        raise MethodArgumentError(f"y must have shape (B, {meas_shape}), got {tuple(y.shape)}")
    if not float(sigma_y) >= 0.0:
        raise MethodArgumentError(f"sigma_y must be >= 0, got {sigma_y}")
    check_values(lambda_=lambda_, zeta=zeta, skip_type=skip_type, init=init, t_start=t_start)
    if t_start >= prior.num_timesteps:
        raise MethodArgumentError(f"t_start must be below the prior's {prior.num_timesteps} timesteps, got {t_start}")
    ts = timesteps(steps, int(t_start), skip_type)
    rhos = rho_schedule(prior.alphas_cumprod, ts, lambda_, sigma_y)

    device = y.device
    dtype = y.dtype if y.is_floating_point() else torch.float32
    B = y.shape[0]
    C = operator.in_shape[0]
    img_shape = (B, *operator.in_shape)
    if randn is None:
        randn = make_randn(generator, device, dtype)
    if data_step is None:
        data_step = svd_data_step(operator, y.to(dtype))
    if x_start is None:
        x_start = operator.pinv(y.to(dtype)).reshape(img_shape).clamp(-1, 1)
    if x_T is None:
        noise = randn(img_shape).to(device=device, dtype=dtype)
    elif tuple(x_T.shape) != img_shape:
        raise MethodArgumentError(f"x_T must have shape {img_shape}, got {tuple(x_T.shape)}")
    else:
        noise = x_T.to(device=device, dtype=dtype)

    ac64 = prior.alphas_cumprod.detach().to("cpu", torch.float64)
    x = _initial_state(ac64, ts[0], x_start.to(device=device, dtype=dtype), noise, init, sigma_y)
    keep, fresh = math.sqrt(1 - zeta), math.sqrt(zeta)
    last = len(ts) - 1
    for i, t in enumerate(ts):
        a = ac64[t]
        eps = prior.eps(x, torch.full((B,), t, device=device, dtype=torch.long))
        if eps.shape[1] == 2 * C:  # learned-sigma output: keep the epsilon channels
            eps = eps[:, :C]
        # 1. the network as denoiser: x0 = clamp((x_t - sqrt(1 - a_t) eps) / sqrt(a_t)), from float64
        # coefficients as guided-diffusion's sqrt_recip(m1)_alphas_cumprod
        x0 = (x * float((1 / a).sqrt()) - eps * float((1 / a - 1).sqrt())).clamp_(-1, 1)
        # 2. data step: argmin_x ||y - H x||^2 + rho_t ||x - x0||^2
        x0_data = None
        if i < last or not official_output:
            x0_data = data_step(x0, rhos[i]).to(dtype)
        if callback is not None:
            callback(StepInfo(i=i, steps=len(ts), t=t, x_t=x, x0=x0, x0_data=x0_data))
        if i == last:
            return x if official_output else x0_data
        # 3. x_t' = sqrt(a_t') x0 + sqrt(1 - a_t') (sqrt(1 - zeta) eps_hat + sqrt(zeta) z)
        a_next = ac64[ts[i + 1]]
        eps_hat = (x - x0_data * float(a.sqrt())) / float((1 - a).sqrt())
        s_next = float((1 - a_next).sqrt())
        x = x0_data * float(a_next.sqrt()) + eps_hat * (keep * s_next)
        if zeta > 0:
            x = x + randn(img_shape).to(device=device, dtype=dtype) * (fresh * s_next)
    raise AssertionError("unreachable")  # pragma: no cover
