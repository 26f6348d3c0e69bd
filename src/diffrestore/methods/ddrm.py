"""DDRM: Denoising Diffusion Restoration Models (Kawar et al., 2022).

A faithful re-implementation of the official sampler (bahjat-kawar/ddrm,
``functions/denoising.py::efficient_generalized_steps``), written against our
:class:`~diffrestore.operators.base.LinearOperator` / :class:`~diffrestore.priors.base.PixelPrior`
contracts. It reproduces the official states step by step (to float32 rounding) when fed the same
operator factors and Gaussian draws; see ``tests/methods/test_ddrm_golden.py``.

The sampler works in the spectral space of ``H = U diag(s) V^T`` on ``x_t / sqrt(alpha_bar_t)``
("x_mod", noise level ``sigma_t = sqrt(1 - a_t) / sqrt(a_t)``). With ``x0`` the network's
prediction, ``vx0 = V^T x0`` and ``ybar = U^T y``, each spectral row ``i`` of the next state is:

* unobserved (``i >= m`` or ``s_i == 0``):
  ``vx0 + sqrt(1 - eta^2) sigma_next V^T eps + eta sigma_next z_C``;
* less noisy than y (``s_i sigma_next < sigma_y``):
  ``vx0 + sqrt(1 - eta^2) sigma_next (ybar - s vx0) / sigma_y + eta sigma_next z_A``;
* noisier than y (``s_i sigma_next > sigma_y``):
  ``eta_b ybar / s + (1 - eta_b) vx0 + sqrt(sigma_next^2 - eta_b^2 sigma_y^2 / s^2) z_B``;

and ``x_next = sqrt(a_next) V(.)``. At the last step ``a_next = 1`` (``t_next = -1``), so every
coefficient but that of ``vx0`` vanishes and the output is ``V(V^T x0)`` with no noise added.

Facts of the official code reproduced here:

* timesteps ``range(0, T, T // steps)`` walked in reverse, ``t_next`` the previous entry or -1,
  ``alpha_bar(-1) = 1``; the network gets ``t`` as a float tensor; learned-sigma channels dropped;
* x0 is never clamped;
* initialisation ``x_T = V((init + r * n) / sigma_T)`` with ``sigma_T`` the noise level of the
  largest timestep, ``init_i = ybar_i / s_i`` and ``r_i = sqrt(max(sigma_T^2 - sigma_y^2 / s_i^2, 0))``
  on rows with ``s_i sigma_T > sigma_y`` (``init_i = 0``, ``r_i = sigma_T`` elsewhere) and ``n`` the
  initial Gaussian image. (Dividing by ``sigma_T`` rather than multiplying by ``sqrt(a_T)`` differs
  from the paper's scaling by ``1 / sqrt(1 - a_T)``, about 1 + 5e-5 at t = 950; kept as official.)
* Gaussian draws, in order: the initial image ``(B, C, H, W)``, then per step ``z_C (B, D)``,
  ``z_A (B, #less-noisy rows)`` (possibly ``(B, 0)``), ``z_B (B, m)`` (only the noisier-than-y rows
  are used).

One deliberate difference: the official code sends singular values that are exactly zero inside
the first ``m`` rows to the "less noisy than y" branch when ``sigma_y > 0`` (it then injects
``ybar_i / sigma_y`` into directions H does not see). Here they are unobserved, as the operator
contract says. ``official_zero_singular_bug=True`` restores the official behaviour, only to replay
references recorded from it (e.g. the golden ``deblur_gauss``).
"""

from __future__ import annotations

import torch

from ..operators.base import LinearOperator
from ..priors.base import PixelPrior
from .common import (
    MethodArgumentError, RandnFn, StepCallback, StepInfo, alpha_bar, check_measurement, check_rho,
    previous_timesteps, sampler_setup, spectral_consistency, uniform_skip_timesteps,
)

__all__ = ["restore", "check_values"]


#: default ``rho`` of the ``consistency`` option: about the error of a DDRM output that already beats
#: its measurement, so the blend never leans on a noisy measurement much (docs/methods.md). Set it to
#: the output's expected error for the task.
DDRM_CONSISTENCY_RHO = 0.05


def check_values(*, eta: float, eta_b: float, rho: float = DDRM_CONSISTENCY_RHO, **_) -> None:
    """The option values DDRM accepts (both weights are shares, in [0, 1])."""
    if not 0.0 <= eta <= 1.0:
        raise MethodArgumentError(f"eta must be in [0, 1], got {eta}")
    if not 0.0 <= eta_b <= 1.0:
        raise MethodArgumentError(f"eta_b must be in [0, 1], got {eta_b}")
    check_rho(rho)


class _Rows:
    """Spectral rows picked by a mask: a prefix ``[0, n)`` is kept as a slice (an index tensor for it
    would be int64 and as long as the image when denoising a photo), anything else as an index."""

    def __init__(self, mask_cpu: torch.Tensor, device):
        self.n = int(mask_cpu.sum())
        self.prefix = bool(mask_cpu[: self.n].all())
        self.index = None if self.prefix else mask_cpu.nonzero().reshape(-1).to(device)

    def view(self, v: torch.Tensor) -> torch.Tensor:
        """The rows of (B, N) ``v``, to read."""
        return v[:, : self.n] if self.prefix else v.index_select(1, self.index)

    def take(self, v: torch.Tensor) -> torch.Tensor:
        """The rows of ``v`` as a new tensor, to modify."""
        return v[:, : self.n].clone() if self.prefix else v.index_select(1, self.index)

    def put(self, out: torch.Tensor, v: torch.Tensor) -> None:
        if self.prefix:
            out[:, : self.n] = v
        else:
            out.index_copy_(1, self.index, v)


def _sigma(a: torch.Tensor) -> torch.Tensor:
    """Noise level of x_t / sqrt(a): sqrt(1 - a) / sqrt(a), float32 as in the official code."""
    return (1 - a).sqrt() / a.sqrt()


@torch.no_grad()
def restore(
    prior: PixelPrior, operator: LinearOperator, y: torch.Tensor, *, sigma_y: float, steps: int = 20,
    eta: float = 0.85, eta_b: float = 1.0, generator: torch.Generator | None = None, randn: RandnFn | None = None,
    callback: StepCallback | None = None, x_T: torch.Tensor | None = None,
    official_zero_singular_bug: bool = False, consistency: bool = False, rho: float = DDRM_CONSISTENCY_RHO,
) -> torch.Tensor:
    """Restore ``x`` from ``y = H x + sigma_y n`` with DDRM.

    Args:
        prior: pixel-space epsilon model; ``prior.eps(x_t, t)`` with ``t`` a float tensor (B,).
        operator: the degradation ``H`` with its implicit SVD.
        y: measurements ``(B, *operator.measurement_shape)``.
        sigma_y: measurement noise std in [-1, 1] units (0 for noiseless tasks).
        steps: number of skip steps; timesteps ``0, s, 2s, ...`` with ``s = T // steps``.
        eta: DDRM eta (official ``etaA = etaC``): share of fresh noise on unobserved / less-noisy rows.
        eta_b: DDRM eta_b: weight of the measurement on rows noisier than y.
        generator: source of the default Gaussian draws (used on its own device).
        randn: ``randn(shape) -> Tensor`` replacing the default source; called in the official
            order and shapes (see module docstring), e.g. to replay a reference's draws.
        callback: ``callback(info)`` once per step with a :class:`~.common.StepInfo` (``i``,
            ``steps``, ``t``, ``x_t`` the state the network evaluated at ``t``, ``x0`` its prediction).
        x_T: the initial Gaussian image ``(B, C, H, W)`` (official ``x``); when given, it replaces
            the first draw. It is still mapped through the spectral initialisation.
        official_zero_singular_bug: reproduce the official handling of zero singular values
            (see module docstring); only for replaying official references.
        consistency: not the paper's: blend the output with the measurement on the rows H observes
            (``common.spectral_consistency`` with error std ``rho``; the projection onto
            ``{x : Hx = y}`` when ``sigma_y = 0``). Why: the last step returns the network's last
            x0 prediction as it is, so even a noiseless measurement is not met exactly.
        rho: the assumed error std of that prediction on the observed rows (``consistency`` only).

    Returns:
        x_hat ``(B, C, H, W)``: ``V(V^T x0)`` of the last prediction (not clamped).
    """
    # ---- checks ------------------------------------------------------------------------------
    check_measurement(operator, y, sigma_y)
    check_values(eta=eta, eta_b=eta_b, rho=rho)
    sigma_0 = float(sigma_y)
    seq = uniform_skip_timesteps(prior.num_timesteps, steps)
    seq_next = previous_timesteps(seq)

    device, dtype, img_shape, draw = sampler_setup(operator, y, generator, randn)
    B, C = img_shape[:2]
    D = operator.D

    ac = prior.alphas_cumprod.detach().to("cpu", torch.float32)

    # ---- constant spectral quantities --------------------------------------------------------
    s_cpu = operator.singulars.detach().to("cpu", torch.float32).reshape(-1)
    m = s_cpu.shape[0]
    s = s_cpu.to(device=device, dtype=dtype)
    if official_zero_singular_bug:
        observed_cpu = torch.ones(m, dtype=torch.bool)
    else:
        observed_cpu = s_cpu > 0
    observed = observed_cpu.to(device)
    U_t_y = operator.Ut(y).reshape(B, m).to(dtype)
    # ybar / s on observed rows (0 elsewhere, instead of the official inf/nan that is never read)
    Sig_inv_U_t_y = torch.where(observed & (s > 0), U_t_y / torch.where(s > 0, s, torch.ones_like(s)), 0.0)
    y_term_B = Sig_inv_U_t_y.mul_(eta_b)  # in place: one image-sized vector fewer

    def to_dev_index(mask: torch.Tensor) -> torch.Tensor:
        return mask.nonzero().reshape(-1).to(device)

    # ---- initialisation (paper's p(x_T | y); official formula) -------------------------------
    a_T = alpha_bar(ac, seq[-1])
    sigma_T = _sigma(a_T)
    large_cpu = (s_cpu * sigma_T > sigma_0) & observed_cpu
    large = to_dev_index(large_cpu)
    inv_sing = torch.zeros(D, device=device, dtype=dtype)
    inv_sing[large] = sigma_0 / s[large]
    init = torch.zeros(B, D, device=device, dtype=dtype)
    init[:, large] = U_t_y[:, large] / s[large].view(1, -1)
    sigma_T_d = sigma_T.to(device=device, dtype=dtype)
    remaining = (sigma_T_d**2 - inv_sing**2).clamp_min(0.0).sqrt()
    if x_T is None:
        noise = draw(img_shape)
    else:
        if tuple(x_T.shape) != img_shape:
            raise MethodArgumentError(f"x_T must have shape {img_shape}, got {tuple(x_T.shape)}")
        noise = x_T.to(device=device, dtype=dtype)
    init = (init + remaining * noise.reshape(B, D)) / sigma_T_d
    x = operator.V(init).reshape(img_shape).to(dtype)
    del init, noise, remaining, inv_sing, large, large_cpu  # whole-image temporaries not kept through the loop

    # ---- per-step constants (CPU masks and indices, one step at a time) ----------------------
    def step_plans():
        """Per-step constants, made one step ahead of its use: their index tensors are as long as the
        image for denoising, so a list of all of them would grow with steps x pixels."""
        for t, t_next in zip(reversed(seq), reversed(seq_next)):
            a_t, a_next = alpha_bar(ac, t), alpha_bar(ac, t_next)
            sigma_next = _sigma(a_next)
            before = (s_cpu * sigma_next > sigma_0) & observed_cpu
            after = (s_cpu * sigma_next < sigma_0) & observed_cpu
            std_C = sigma_next * eta
            std_A = sigma_next * eta
            rows_b, rows_a = _Rows(before, device), _Rows(after, device)
            diff_B = torch.sqrt(sigma_next**2 - sigma_0**2 / s_cpu[before] ** 2 * (eta_b**2))
            yield (
                dict(
                    t=t,
                    t_tensor=torch.full((B,), float(t), device=device, dtype=torch.float32),
                    sqrt_a=float(a_t.sqrt()),
                    sqrt_1ma=float((1 - a_t).sqrt()),
                    sqrt_a_next=float(a_next.sqrt()),
                    std_C=float(std_C),
                    tilde_C=float(torch.sqrt(sigma_next**2 - std_C**2)),
                    std_A=float(std_A),
                    tilde_A=float(torch.sqrt(sigma_next**2 - std_A**2)),
                    rows_a=rows_a,
                    n_after=rows_a.n,
                    s_after=rows_a.view(s_cpu[None])[0].to(device=device, dtype=dtype),
                    rows_b=rows_b,
                    n_before=rows_b.n,
                    diff_B=diff_B.to(device=device, dtype=dtype),
                )
            )

    # ---- sampling loop -------------------------------------------------------------------------
    n_steps = len(seq)
    for k, p in enumerate(step_plans()):
        et = prior.eps(x, p["t_tensor"])
        if et.shape[1] == 2 * C:  # learned-sigma output: keep the epsilon channels
            et = et[:, :C]
        # x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
        x0 = torch.sub(x, et, alpha=p["sqrt_1ma"]).div_(p["sqrt_a"])
        # V^T x0 is computed, not carried from the previous spectral state: one cheap transform more,
        # and closer to the official states, which compute it too
        v_x0 = operator.Vt(x0).reshape(B, D).to(dtype)
        v_et = operator.Vt(et).reshape(B, D).to(dtype)

        z_C = draw((B, D))
        z_A = draw((B, p["n_after"]))
        z_B = draw((B, m))

        # unobserved rows: vx0 + sqrt(1 - eta^2) sigma' V^T eps + eta sigma' z_C (every row first;
        # observed ones are overwritten below)
        nxt = torch.add(v_x0, v_et, alpha=p["tilde_C"]).add_(z_C, alpha=p["std_C"])
        ra, rb = p["rows_a"], p["rows_b"]
        # less noisy than y: vx0 + sqrt(1 - eta^2) sigma' (ybar - s vx0) / sigma_y + eta sigma' z_A
        if p["n_after"]:
            vx_a = ra.take(v_x0)
            resid = (ra.view(U_t_y) - vx_a * p["s_after"]).div_(sigma_0)
            ra.put(nxt, vx_a.add_(resid, alpha=p["tilde_A"]).add_(z_A, alpha=p["std_A"]))
        # noisier than y: eta_b ybar / s + (1 - eta_b) vx0 + sqrt(sigma'^2 - eta_b^2 sigma_y^2 / s^2) z_B
        if p["n_before"]:
            val = rb.take(y_term_B)
            if eta_b != 1.0:
                val.add_(rb.view(v_x0), alpha=1 - eta_b)
            rb.put(nxt, val.addcmul_(p["diff_B"], rb.view(z_B)))

        # x_next = sqrt(a') V(.)
        x_next = operator.V(nxt).reshape(img_shape).to(dtype).mul_(p["sqrt_a_next"])
        if callback is not None:
            callback(StepInfo(i=k, steps=n_steps, t=p["t"], x_t=x, x0=x0))
        x = x_next
    if consistency:
        return spectral_consistency(operator, x, y, sigma_0, rho)
    return x
