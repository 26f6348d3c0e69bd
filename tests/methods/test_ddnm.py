"""DDNM / DDNM+ on our own operators (diffrestore.operators.tasks), with cheap analytic priors.

Checked against dense matrices on tiny images: the range-null-space projection (every x0_hat of
noiseless DDNM meets the measurement), DDNM+'s scaled correction (closed-form lambda where all singular
values are equal), the draw order, the schedule the callback sees, determinism, batching, the option
and operator checks, and where the paper-correct defaults differ from the official behaviour. The
official sampler itself is pinned by ``test_ddnm_golden.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffrestore.methods import check_options, ddnm, get_method
from diffrestore.methods.common import MethodArgumentError, ReplayRandn, alpha_bar
from diffrestore.operators.base import LinearOperator
from diffrestore.operators.tasks import make_task
from diffrestore.priors.base import adm_alphas_cumprod

from test_ddrm import LinearPrior, RecordingRandn

SHAPE = (3, 8, 8)


def _image(seed=1, batch=1, shape=SHAPE):
    return torch.rand(batch, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _record(task, y, **kw):
    """Run DDNM with LinearPrior; returns (output, list of StepInfo dicts with x0_hat read)."""
    infos = []

    def cb(info):
        infos.append({k: info[k] for k in ("i", "steps", "t", "x_t", "x0", "x0_hat")})

    kw.setdefault("generator", torch.Generator().manual_seed(3))
    out = ddnm.restore(LinearPrior(), task.operator, y, sigma_y=task.sigma_y, callback=cb, **kw)
    return out, infos


def _truncated_pinv(op: LinearOperator) -> torch.Tensor:
    """A's dense pseudo-inverse without the singular values at or below the operator's cut-off, from a
    float64 SVD of the dense matrix."""
    U, S, Vh = torch.linalg.svd(op.dense_matrix(), full_matrices=False)
    keep = S > max(op.threshold, 1e-10)
    return Vh[keep].T @ torch.diag(1 / S[keep]) @ U[:, keep].T


@pytest.mark.parametrize("name", ["sr4", "inpaint", "colorize", "deblur", "sr4-bicubic"])
def test_noiseless_every_x0_hat_is_the_projection_of_x0(name):
    """x0_hat = x0 + A^+ (y - A x0) with A's dense (truncated) pseudo-inverse, at every step; the output is
    the last x0_hat; where nothing is truncated, H x_hat = y to float32 rounding."""
    task = make_task(name, SHAPE)
    op = task.operator
    y = op.H(_image())
    out, infos = _record(task, y, steps=6)
    pinv = _truncated_pinv(op)
    A, yv = op.dense_matrix(), y.double().reshape(-1)
    for info in infos:
        x0 = info["x0"].double().reshape(-1)
        want = x0 + pinv @ (yv - A @ x0)
        err = float((info["x0_hat"].double().reshape(-1) - want).norm() / want.norm())
        assert err < 1e-5, (info["t"], err)
    assert torch.equal(out, infos[-1]["x0_hat"])
    if bool((op.singulars > 0).all()):
        assert float((op.H(out) - y).norm() / y.norm()) < 1e-5


@pytest.mark.parametrize("name", ["noisy-sr4", "denoise"])
def test_ddnm_plus_scales_the_correction_by_the_closed_form_lambda(name):
    """All singular values equal s (1/4 for 4x block averaging, 1 for denoising), so lambda is one
    number per step: s sigma' sqrt(1 - eta^2) / (sqrt(a') sigma_y) while sigma' < sqrt(a') sigma_y / s,
    else 1; x0_hat = x0 - lambda A^+ (A x0 - y) with A's dense pseudo-inverse. The output is the last
    raw prediction (lambda = 0 at the last step)."""
    task = make_task(name, SHAPE)
    op = task.operator
    y = task.measure(_image(), generator=torch.Generator().manual_seed(0))
    eta, sy = 0.85, task.sigma_y
    out, infos = _record(task, y, steps=8, eta=eta)
    s = float(op.singulars[0])
    assert bool((op.singulars == s).all())
    pinv = _truncated_pinv(op)
    A, yv = op.dense_matrix(), y.double().reshape(-1)
    ac = adm_alphas_cumprod()
    ts = [info["t"] for info in infos] + [-1]
    lams = []
    for info, t_next in zip(infos, ts[1:]):
        a = float(alpha_bar(ac, t_next))
        sig, sa = math.sqrt(1 - a), math.sqrt(a)
        lam = s * sig * math.sqrt(1 - eta**2) / (sa * sy) if sig < sa * sy / s else 1.0
        lams.append(lam)
        x0 = info["x0"].double().reshape(-1)
        want = x0 - lam * (pinv @ (A @ x0 - yv))
        err = float((info["x0_hat"].double().reshape(-1) - want).norm() / want.norm())
        assert err < 1e-5, (info["t"], lam, err)
    assert lams[0] == 1.0 and 0.0 < min(lams[:-1]) and lams[-1] == 0.0  # both branches are exercised
    assert torch.allclose(out, infos[-1]["x0"], atol=1e-6)


def test_schedule_callback_and_draws():
    """10 steps of 1000: calls at t = 900, 800, ..., 0; with time travel (5 steps, length 2, repeat 2)
    9 calls at 800, 600, 800, 600, 400, 200, 400, 200, 0 (RePaint jumps); one (B, C, H, W) draw for
    x_T and one per time pair, travel pairs included."""
    task = make_task("sr4", SHAPE)
    y = task.operator.H(_image(batch=2))
    rec = RecordingRandn()
    _, infos = _record(task, y, steps=10, randn=rec, generator=None)
    assert [i["t"] for i in infos] == list(range(900, -1, -100))
    assert [i["i"] for i in infos] == list(range(10)) and {i["steps"] for i in infos} == {10}
    assert len(rec.draws) == 11 and {tuple(z.shape) for z in rec.draws} == {(2, *SHAPE)}
    rec = RecordingRandn()
    _, infos = _record(task, y, steps=5, travel_length=2, travel_repeat=2, randn=rec, generator=None)
    assert [i["t"] for i in infos] == [800, 600, 800, 600, 400, 200, 400, 200, 0]
    assert {i["steps"] for i in infos} == {9} and len(rec.draws) == 1 + 13


def test_x_T_replaces_the_first_draw_and_batches_match_single_images():
    task = make_task("noisy-sr4", SHAPE)
    y = task.measure(_image(batch=2), generator=torch.Generator().manual_seed(0))
    rec = RecordingRandn(seed=5)
    both = ddnm.restore(LinearPrior(), task.operator, y, sigma_y=task.sigma_y, steps=6, randn=rec)
    again = ddnm.restore(LinearPrior(), task.operator, y, sigma_y=task.sigma_y, steps=6,
                         x_T=rec.draws[0], randn=ReplayRandn(rec.draws[1:]))
    assert torch.equal(both, again)
    for b in range(2):
        one = ddnm.restore(LinearPrior(), task.operator, y[b : b + 1], sigma_y=task.sigma_y, steps=6,
                           randn=ReplayRandn([z[b : b + 1] for z in rec.draws]))
        assert torch.allclose(one, both[b : b + 1], atol=1e-6, rtol=1e-5)


def test_same_seed_same_output_other_seed_differs():
    task = make_task("noisy-sr4", SHAPE)
    y = task.measure(_image(), generator=torch.Generator().manual_seed(0))

    def run(seed):
        return get_method("ddnm").restore(LinearPrior(), task.operator, y, sigma_y=task.sigma_y, steps=5,
                                          generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7)) and not torch.allclose(run(7), run(8))


@pytest.mark.parametrize(
    "task_name,options,differs",
    [
        ("noisy-sr4", {"official_eps_basis": True}, True),  # eps lands on the null-space rows
        ("denoise", {"official_eps_basis": True}, False),  # every row observed: no eps term at all
        ("inpaint", {"official_eps_basis": True}, False),  # V is a permutation: P = V^T
        ("sr4", {"official_eps_basis": True}, False),  # noiseless DDNM has no spectral noise split
        ("sr4", {"official_travel": True}, False),  # no time travel asked
        ("sr4", {"official_travel": True, "travel_length": 2, "travel_repeat": 2}, True),
        ("noisy-sr4", {"official_travel": True, "travel_length": 2, "travel_repeat": 2}, True),
    ],
)
def test_paper_defaults_differ_from_the_official_options_where_they_should(task_name, options, differs):
    task = make_task(task_name, SHAPE, sigma_y=0.05 if task_name == "inpaint" else None)
    y = task.measure(_image(), generator=torch.Generator().manual_seed(0))
    base = {k: v for k, v in options.items() if not k.startswith("official")}

    def run(**kw):
        return ddnm.restore(LinearPrior(), task.operator, y, sigma_y=task.sigma_y, steps=6,
                            generator=torch.Generator().manual_seed(2), **kw)

    a, b = run(**base), run(**options)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    if differs:
        assert not torch.allclose(a, b, atol=1e-4)
    else:  # the same arithmetic: bit for bit
        assert torch.equal(a, b), float((a - b).abs().max())


@pytest.mark.parametrize(
    "options,says",
    [({"eta": 1.5}, "eta must be in"), ({"eta": -0.1}, "eta must be in"), ({"travel_length": 0}, "travel_length"),
     ({"travel_repeat": 0}, "travel_repeat"), ({"travel_length": 1.5}, "travel_length"), ({"travel_repeat": True}, "travel_repeat")],
)
def test_out_of_range_options_are_refused_by_the_registry_and_the_method(options, says):
    with pytest.raises(ValueError, match=f"method ddnm: .*{says}"):
        check_options("ddnm", options)
    task = make_task("sr4", SHAPE)
    with pytest.raises(MethodArgumentError, match=says):
        ddnm.restore(LinearPrior(), task.operator, task.operator.H(_image()), sigma_y=0.0, steps=3, **options)


def test_text_options_convert_and_the_defaults_pass():
    assert check_options("ddnm", {"travel_length": "2", "official_travel": "true"}) == {
        "travel_length": 2, "official_travel": True}
    assert check_options("ddnm", {}) == {}


def test_operator_without_svd_parts_is_refused_in_one_line():
    class BlurOnly(LinearOperator):
        measurement_shape = SHAPE

        def H(self, x):
            return x

    with pytest.raises(MethodArgumentError, match=r"^ddnm needs an operator with SVD parts; BlurOnly lacks singulars, Vt, V, Ut$"):
        ddnm.restore(LinearPrior(), BlurOnly(SHAPE), torch.zeros(1, *SHAPE), sigma_y=0.0, steps=3)


def test_bad_measurement_and_x_T_shapes():
    task = make_task("sr4", SHAPE)
    with pytest.raises(MethodArgumentError, match="y must have shape"):
        ddnm.restore(LinearPrior(), task.operator, torch.zeros(1, *SHAPE), sigma_y=0.0, steps=3)
    y = task.operator.H(_image())
    with pytest.raises(MethodArgumentError, match="x_T must have shape"):
        ddnm.restore(LinearPrior(), task.operator, y, sigma_y=0.0, steps=3, x_T=torch.zeros(1, 3, 4, 4))
    with pytest.raises(MethodArgumentError, match="steps must be in"):
        ddnm.restore(LinearPrior(), task.operator, y, sigma_y=0.0, steps=0)


@pytest.mark.parametrize("official", [False, True])
def test_time_travel_renoises_the_current_state_or_officially_the_raw_prediction(official):
    """5 steps, travel length 1, repeat 2: after the call at t = 800 the sampler steps to 600, then
    travels back to 800. Default: x_800' = sqrt(r) x_600 + sqrt(1 - r) z with r = a_800 / a_600 (forward
    diffusion of the state reached, x_600 = sqrt(a_600) x0_hat + sigma eta z_1 + sigma sqrt(1-eta^2) eps);
    official: x_800' = sqrt(a_800) x0 + sqrt(1 - a_800) z from the raw prediction x0 of the call at 800."""
    task = make_task("inpaint", SHAPE)
    y = task.operator.H(_image())
    rec, eta = RecordingRandn(seed=1), 0.85
    _, infos = _record(task, y, steps=5, travel_repeat=2, eta=eta, randn=rec, generator=None, official_travel=official)
    assert [i["t"] for i in infos[:3]] == [800, 800, 600]
    ac = adm_alphas_cumprod()
    a8, a6 = float(alpha_bar(ac, 800)), float(alpha_bar(ac, 600))
    first, z1, z2 = infos[0], rec.draws[1].double(), rec.draws[2].double()
    if official:
        want = math.sqrt(a8) * first["x0"].double() + math.sqrt(1 - a8) * z2
    else:
        eps, sig = 0.5 * first["x_t"].double(), math.sqrt(1 - a6)  # LinearPrior: eps = x_t / 2
        x600 = math.sqrt(a6) * first["x0_hat"].double() + sig * eta * z1 + sig * math.sqrt(1 - eta**2) * eps
        want = math.sqrt(a8 / a6) * x600 + math.sqrt(1 - a8 / a6) * z2
    assert float((infos[1]["x_t"].double() - want).norm() / want.norm()) < 1e-6
