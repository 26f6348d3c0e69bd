"""RED-diff against the official code: golden tensors recorded from NVlabs/RED-diff ``algos/reddiff.py``
(``/work/shared/golden/pigdm/reddiff``, see its README).

RED-diff never differentiates the network, so every network call is replaced by the recorded output
(``ReplayPrior``, which also checks the noised input x_t and t of every call), every Gaussian draw by the
recorded one, and the operator by one laid out like the official one from the stored factors (with that
repository's ``H_pinv``). Per step to relative L2 <= 1e-4: the network input, the loss gradient, the
mean after each Adam step; then the saved output and Adam's final moments.
"""

from __future__ import annotations

import pytest
import torch

from diffrestore.methods import reddiff
from diffrestore.methods.common import ReplayRandn

TOL = 1e-4
RUNS = ["sr4", "deblur_gauss_noisy", "deno"]


def _replay(ref, helpers, **kw):
    op = helpers.reddiff_official_operator(ref)
    prior = helpers.ReplayPrior(ref["model_calls"])
    randn = ReplayRandn(ref["draws"][1:])  # draw 0 (y_noise) belongs to the measurement
    infos = []
    out = reddiff.restore(
        prior, op, ref["y_0"], sigma_y=ref["sigma_y_internal"], steps=ref["num_steps_cfg"], lr=ref["lr"],
        reg_weight=ref["grad_term_weight"], obs_weight=ref["obs_weight"], sigma_x0=ref["sigma_x0"],
        randn=randn, callback=lambda info: infos.append({k: info[k] for k in ("x0", "grad", "mu", "t")}), **kw,
    )
    return out, infos, prior, randn


@pytest.mark.parametrize("name", RUNS)
def test_replay_official(name, golden_pigdm, ddrm_helpers):
    ref = golden_pigdm(f"reddiff/reddiff_{name}")
    rel = ddrm_helpers.rel_l2
    out, infos, prior, randn = _replay(ref, ddrm_helpers)
    assert randn.remaining == 0 and randn.shapes == [tuple(s) for s in ref["draw_shapes"][1:]]
    assert prior.i == len(ref["model_calls"]) == len(infos) == 10
    assert [float(t[0]) for t in prior.t_seen] == [float(c["t"]) for c in ref["model_calls"]]
    assert [i["t"] for i in infos] == ref["t_order"]
    assert max(prior.x_errors) <= TOL, prior.x_errors
    checks = {
        "x0": ([i["x0"] for i in infos], ref["mus"][:-1]),
        "grad": ([i["grad"] for i in infos], ref["grads"]),
        "mu": ([i["mu"] for i in infos], ref["mus"][1:]),
    }
    for what, (got, want) in checks.items():
        errs = [rel(a, b) for a, b in zip(got, want)]
        assert max(errs) <= TOL, (what, errs)
    assert rel(out, ref["output"]) <= TOL
    assert rel(infos[-1]["mu"], ref["mu_final"]) <= TOL


def test_schedule_matches_the_reference(golden_pigdm, ddrm_helpers):
    ref = golden_pigdm("reddiff/reddiff_sr4")
    ac = ddrm_helpers.ReplayPrior([]).alphas_cumprod
    assert torch.equal(ac, ref["alphas_table"][1:])
    for k, t in enumerate(ref["t_order"]):
        a_t, w_t = reddiff.reg_schedule(ac, t, ref["grad_term_weight"])
        assert float(a_t) == float(ref["sched"]["alpha_t"][k])
        assert abs(float(w_t) - float(ref["sched"]["w_t"][k])) <= 1e-6 * float(ref["sched"]["w_t"][k])


def test_adam_state_matches_the_reference(golden_pigdm):
    """Our Adam fed the recorded gradients ends in the recorded moments (torch's own formulas)."""
    ref = golden_pigdm("reddiff/reddiff_deblur_gauss_noisy")
    mu = ref["mus"][0].clone()
    adam = reddiff._Adam(mu, ref["lr"])
    for k, g in enumerate(ref["grads"]):
        adam.step(g)
        assert torch.allclose(mu, ref["mus"][k + 1], rtol=0, atol=1e-6 * float(ref["mus"][k + 1].abs().max()))
    state = ref["adam_final_state"]
    assert adam.k == int(state["step"])
    assert torch.allclose(adam.m, state["exp_avg"]) and torch.allclose(adam.v, state["exp_avg_sq"])
