"""ΠGDM against the official sampler: golden tensors recorded from NVlabs/RED-diff ``algos/pgdm.py``
(``/work/shared/golden/pigdm``, see its README).

The vector-Jacobian product needs the network itself, so the prior is the golden tiny ADM (our
``priors.adm`` with the stored weights), whose outputs are checked against every recorded call; every
Gaussian draw is the recorded one and the operator is laid out like the official one from the stored
factors (with that repository's ``H_pinv``). Checked per step to relative L2 <= 1e-4: states, x0
predictions and the network outputs. ``sr4``, ``sr4_noisy`` and ``deblur_gauss`` run free; ``deno``
(eta 0: a perturbation grows ~4x per step) is teacher-forced from the stored states, as are all four runs
in a second test, which also checks the guidance residual on the stored x0 and the VJP ``grad_term`` on
the stored residual. (The VJP of our own residual is not compared alone: late in a run the residual is a
small difference of values ~500, so the 1e-6 relative float differences of x0 become up to 1e-3 of it.)
"""

from __future__ import annotations

import pytest
import torch

from diffrestore.methods import pigdm
from diffrestore.methods.common import ReplayRandn, alpha_bar, uniform_skip_timesteps

from test_ddrm_golden import _adm_prior

TOL = 1e-4
RUNS = ["sr4", "sr4_noisy", "deblur_gauss", "deno"]


class CheckedPrior:
    """Wraps a prior; records the relative L2 of each eps against the network output recorded at that t."""

    def __init__(self, inner, calls, helpers):
        self.inner, self.calls, self.rel = inner, calls, helpers.rel_l2
        self.alphas_cumprod, self.num_timesteps = inner.alphas_cumprod, inner.num_timesteps
        self.by_t = {int(c["t"]): c for c in calls}
        self.errors: list[float] = []
        self.t_seen: list[float] = []

    def eps(self, x_t, t):
        eps = self.inner.eps(x_t, t)
        call = self.by_t[int(t[0])]
        self.errors.append(self.rel(eps.detach(), call["out"][:, :3]))
        self.t_seen.append(float(t[0]))
        return eps


@pytest.fixture(scope="module")
def adm(golden_ddrm, ddrm_helpers):
    return _adm_prior(golden_ddrm.folder, ddrm_helpers)


def _setup(name, golden_pigdm, helpers, adm):
    ref = golden_pigdm(f"pigdm_{name}")
    op = helpers.reddiff_official_operator(ref)
    return ref, op, CheckedPrior(adm, ref["model_calls"], helpers)


def test_schedule_and_operators_match_the_reference(golden_pigdm, ddrm_helpers, adm):
    ref = golden_pigdm("pigdm_deblur_gauss")
    assert torch.equal(adm.alphas_cumprod, ref["alphas_table"][1:])
    assert uniform_skip_timesteps(1000, 10) == ref["ts"]
    for name in RUNS:
        ref = golden_pigdm(f"pigdm_{name}")
        op = ddrm_helpers.reddiff_official_operator(ref)
        assert ddrm_helpers.rel_l2(op.H(ref["x_orig"]).reshape(1, -1), ref["y_clean"]) <= 1e-6
        assert ddrm_helpers.rel_l2(op.pinv(ref["y_0"]), ref["pinv_y_0"]) <= 1e-6


@pytest.mark.parametrize("name", ["sr4", "sr4_noisy", "deblur_gauss"])
def test_free_running_replay(name, golden_pigdm, ddrm_helpers, adm):
    ref, op, prior = _setup(name, golden_pigdm, ddrm_helpers, adm)
    rel = ddrm_helpers.rel_l2
    states, x0s = [], []

    def cb(info):
        states.append(info["x_t"].clone())
        x0s.append(info["x0"].clone())

    randn = ReplayRandn(ref["draws"][1:])  # draw 0 (y_noise) belongs to the measurement
    out = pigdm.restore(prior, op, ref["y_0"], sigma_y=ref["sigma_y_internal"], steps=ref["num_steps_cfg"],
                        eta=ref["eta"], guidance_weight=ref["grad_term_weight"], official_ignore_sigma_y=True,
                        randn=randn, callback=cb)
    assert randn.remaining == 0 and randn.shapes == [tuple(s) for s in ref["draw_shapes"][1:]]
    assert prior.t_seen == [float(t) for t in ref["t_order"]]
    assert max(prior.errors) <= TOL, prior.errors
    for got, want in ((states + [out], ref["xs"]), (x0s, ref["x0_preds"])):
        assert len(got) == len(want)
        errs = [rel(a, b) for a, b in zip(got, want)]
        assert max(errs) <= TOL, errs
    assert rel(out, ref["output"]) <= TOL


class _Stop(Exception):
    pass


@pytest.mark.parametrize("name", RUNS)
def test_teacher_forced_replay(name, golden_pigdm, ddrm_helpers, adm):
    """Every step from the stored state (what the README advises for the chaotic ``deno`` run), and
    the initial state x_T = sqrt(a_T) H^+ y + sqrt(1 - a_T) n."""
    ref, op, prior = _setup(name, golden_pigdm, ddrm_helpers, adm)
    rel = ddrm_helpers.rel_l2
    draws = [d for _, d in ref["draws"]]
    first = []

    def stop(info):
        first.append(info["x_t"].clone())
        raise _Stop

    with pytest.raises(_Stop):
        pigdm.restore(prior, op, ref["y_0"], sigma_y=ref["sigma_y_internal"], steps=ref["num_steps_cfg"],
                      eta=ref["eta"], official_ignore_sigma_y=True, randn=ReplayRandn(draws[1:]), callback=stop)
    assert rel(first[0], ref["xs"][0]) <= TOL

    prior.errors.clear()
    ac = adm.alphas_cumprod
    residual = pigdm.make_guidance(op, ref["y_0"], ref["sigma_y_internal"], official_ignore_sigma_y=True)
    for i, (t, s) in enumerate(zip(ref["t_order"], ref["s_order"])):
        a_t, a_s = alpha_bar(ac, t), alpha_bar(ac, s)
        kw = dict(eta=ref["eta"], guidance_weight=ref["grad_term_weight"])
        x_s, x0, _, _ = pigdm.pigdm_step(prior, ref["xs"][i], t, a_t, a_s, residual, draws[2 + i], **kw)
        assert rel(x0, ref["x0_preds"][i]) <= TOL, i
        assert rel(x_s, ref["xs"][i + 1]) <= TOL, i
        # the residual of the stored x0, and the VJP applied to the stored residual: each part alone
        assert rel(residual(ref["x0_preds"][i], a_t).reshape(1, -1), ref["vjp_cotangent"][i]) <= TOL, i
        stored = ref["vjp_cotangent"][i].reshape(x0.shape)
        _, _, _, g = pigdm.pigdm_step(prior, ref["xs"][i], t, a_t, a_s, lambda *_: stored, draws[2 + i], **kw)
        assert rel(g, ref["grad_term"][i]) <= TOL, i
    assert max(prior.errors) <= TOL, prior.errors


def test_noise_aware_default_departs_from_the_official_noisy_run(golden_pigdm, ddrm_helpers, adm):
    """With sigma_y > 0 the default (the paper's inverse) is not the official H^+; noiseless they agree."""
    ref, op, prior = _setup("sr4_noisy", golden_pigdm, ddrm_helpers, adm)
    ac = adm.alphas_cumprod
    t = ref["t_order"][0]
    a_t = alpha_bar(ac, t)
    off = pigdm.make_guidance(op, ref["y_0"], ref["sigma_y_internal"], official_ignore_sigma_y=True)
    new = pigdm.make_guidance(op, ref["y_0"], ref["sigma_y_internal"], official_ignore_sigma_y=False)
    x0 = ref["x0_preds"][0]
    assert ddrm_helpers.rel_l2(new(x0, a_t), off(x0, a_t)) > 1e-3
    clean = pigdm.make_guidance(op, ref["y_0"], 0.0, official_ignore_sigma_y=False)
    assert ddrm_helpers.rel_l2(clean(x0, a_t), off(x0, a_t)) <= 1e-6
