"""DDNM / DDNM+ against the official sampler: golden tensors recorded from wyhuai/DDNM
(``../shared/golden/ddnm``, see its README).

Every network call is replaced by the recorded output (``ReplayPrior``, which also measures how far the
sampler's x_t is from the recorded network input), every Gaussian draw by the recorded one, and the
operator by one laid out like the official class, built from the stored factors. With the official
options the sampler must reproduce every x0 prediction, every corrected x0_hat, every state the
network sees and the output to relative L2 <= 1e-4. (States reached just before a time-travel jump
are never used by the official sampler and are not observable here; every state that feeds a network
call or the output is.)
"""

from __future__ import annotations

import pytest
import torch

from diffrestore.methods import ddnm
from diffrestore.methods.common import ReplayRandn
from diffrestore.priors.base import PixelPrior

TOL = 1e-4
FILES = ["sr4", "sr4_noisy", "deno", "deblur_gauss_noisy", "inp_timetravel", "color"]
OFFICIAL = dict(official_eps_basis=True, official_travel=True)


def _replay(ref, helpers, prior=None, **options):
    op, lam_s = helpers.official_ddnm_operator(ref)
    prior = prior or helpers.ReplayPrior(ref["model_calls"])
    randn = ReplayRandn([d for d in ref["draws"] if d[0] != "y_noise"])  # y_noise made the measurement
    x0s, hats, states = [], [], []

    def cb(info):
        x0s.append(info["x0"].clone())
        hats.append(info["x0_hat"].clone())
        states.append(info["x_t"].clone())

    out = ddnm.restore(
        prior, op, ref["y"], sigma_y=ref["sigma_y"], steps=ref["T_sampling"], eta=ref["eta"],
        travel_length=ref["travel_length"], travel_repeat=ref["travel_repeat"], randn=randn, callback=cb,
        lambda_singulars=lam_s, **options,
    )
    return out, x0s, hats, states, prior, randn


def _errors(ref, helpers, out, x0s, hats, states):
    rel = helpers.rel_l2
    calls = ref["model_calls"]
    return {
        "x0_preds": [rel(a, b) for a, b in zip(x0s, ref["x0_preds"], strict=True)],
        "x0_hats": [rel(a, b) for a, b in zip(hats, ref["x0_hats"], strict=True)],
        "x_t": [rel(a, ref["xs"][c["pair_index"]]) for a, c in zip(states, calls, strict=True)],
        "output": [rel(out, ref["xs"][-1])],
    }


@pytest.mark.parametrize("name", FILES)
def test_replay_official(name, golden_ddnm, ddnm_helpers):
    ref = golden_ddnm(name)
    out, x0s, hats, states, prior, randn = _replay(ref, ddnm_helpers, **OFFICIAL)
    assert randn.remaining == 0 and len(randn.shapes) == len(ref["time_pairs"]) + 1
    assert prior.i == len(ref["model_calls"])
    for got, call in zip(prior.t_seen, ref["model_calls"]):
        assert got.dtype.is_floating_point and torch.equal(got, call["t"])
    errs = _errors(ref, ddnm_helpers, out, x0s, hats, states)
    worst = {k: max(v) for k, v in errs.items()}
    assert max(worst.values()) <= TOL, worst
    assert max(prior.x_errors) <= TOL


@pytest.mark.parametrize("name", FILES)
def test_schedule_matches_official(name, golden_ddnm):
    ref = golden_ddnm(name)
    assert ddnm.travel_schedule(ref["T_sampling"], ref["travel_length"], ref["travel_repeat"]) == list(ref["times"])
    pairs = ddnm.time_pairs(1000, ref["T_sampling"], ref["travel_length"], ref["travel_repeat"])
    assert [list(p) for p in pairs] == [list(p) for p in ref["time_pairs"]]


@pytest.mark.parametrize("name", ["sr4", "sr4_noisy", "deblur_gauss_noisy", "inp_timetravel", "color"])
def test_official_layout_operators_reproduce_the_recorded_measurement(name, golden_ddnm, ddnm_helpers):
    ref = golden_ddnm(name)
    op, _ = ddnm_helpers.official_ddnm_operator(ref)
    assert ddnm_helpers.rel_l2(op.H(ref["x_orig"]).reshape(1, -1), ref["y_clean"]) <= 1e-6
    x = torch.randn(2, *op.in_shape)
    assert ddnm_helpers.rel_l2(op.V(op.Vt(x)), x) <= 1e-5


@pytest.mark.parametrize("name,rows", [("sr4_noisy", {0: 0, 768: 1, 769: 2}), ("deblur_gauss_noisy", {0: 0, 3: 1, 3 * 4095 + 2: 4095})])
def test_plus_coefficients_match_the_recorded_lambda_internals(name, rows, golden_ddnm, ddnm_helpers):
    """lambda, d1, d2 per step equal the locals of the official Lambda / Lambda_noise (rows of our
    spectral layout -> the official per-block / per-pixel index)."""
    ref = golden_ddnm(name)
    op, lam_s = ddnm_helpers.official_ddnm_operator(ref)
    s = lam_s if lam_s is not None else op.singulars
    s = torch.cat([s.float(), torch.zeros(op.D - s.numel())])
    for li in ref["lambda_internals"]:
        a, sigma = float(li["Lambda.a"]), float(li["Lambda.sigma_t"])
        lam, d1, d2 = ddnm._plus_coefficients(s, a, sigma, ref["sigma_y"], ref["eta"])
        for ours, theirs in rows.items():
            for got, key in ((lam, "Lambda.lambda_t"), (d1, "Lambda_noise.d1_t"), (d2, "Lambda_noise.d2_t")):
                want = float(li[key].reshape(-1)[theirs])
                assert abs(float(got[ours]) - want) <= 1e-6 * max(1.0, abs(want)), (key, ours, want)


def test_paper_eps_basis_moves_the_first_sr4_noisy_step_by_about_4_percent(golden_ddnm, ddnm_helpers):
    """README fact 5: with V^T eps instead of the permuted eps, x_next of the first step of
    ref_sr4_noisy changes by 3.9 % (relative L2); x0 and x0_hat of that step do not change."""
    ref = golden_ddnm("sr4_noisy")
    _, x0s, hats, states, _, _ = _replay(ref, ddnm_helpers, official_travel=True)
    assert ddnm_helpers.rel_l2(x0s[0], ref["x0_preds"][0]) <= TOL
    assert ddnm_helpers.rel_l2(hats[0], ref["x0_hats"][0]) <= TOL
    assert 0.035 <= ddnm_helpers.rel_l2(states[1], ref["xs"][1]) <= 0.043


def test_paper_travel_differs_from_official_only_after_the_first_jump(golden_ddnm, ddnm_helpers):
    """Time travel from the current state (default) vs from the raw prediction (official): the calls
    before the first travel pair agree, the first call after it does not."""
    ref = golden_ddnm("inp_timetravel")
    _, _, _, states, _, _ = _replay(ref, ddnm_helpers, official_eps_basis=True)
    errs = [ddnm_helpers.rel_l2(a, ref["xs"][c["pair_index"]]) for a, c in zip(states, ref["model_calls"])]
    assert max(errs[:2]) <= TOL and errs[2] > 1e-2, errs


@pytest.mark.slow
def test_end_to_end_with_our_adm_color(golden_ddnm, ddnm_helpers, golden_ddrm):
    """Our ADM network (weights of ../ddrm) inside DDNM reproduces the official colorization run; it
    is teacher-forced: each call also evaluates the recorded input, which must give the recorded output."""
    from test_ddrm_golden import _adm_prior

    ref = golden_ddnm("color")
    adm = _adm_prior(golden_ddrm.folder, ddnm_helpers)
    forced = []

    class Forced(PixelPrior):
        def __init__(self):
            super().__init__(adm.alphas_cumprod)

        def eps(self, x_t, t):
            call = ref["model_calls"][len(forced)]
            forced.append(ddnm_helpers.rel_l2(adm.net(call["x_in"], t).sample, call["out"]))
            return adm.eps(x_t, t)

    prior = Forced()
    errs = _errors(ref, ddnm_helpers, *_replay(ref, ddnm_helpers, prior=prior, **OFFICIAL)[:4])
    assert max(forced) <= TOL, forced
    assert max(max(v) for v in errs.values()) <= TOL, errs
