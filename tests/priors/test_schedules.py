"""Noise schedules: one function per schedule, each bit-exact to the official code it comes from
(ADM linear as DDRM computes it, LDM sqrt-linear as LDM registers it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffrestore.priors.base import (
    PixelPrior,
    PriorLoadError,
    adm_alphas_cumprod,
    alphas_cumprod_from_betas,
    ldm_alphas_cumprod,
    linear_betas,
    scheduler_alphas_cumprod,
    sqrt_linear_betas,
)


def ddrm_compute_alpha_table() -> torch.Tensor:
    """DDRM's ``get_beta_schedule('linear')`` + ``compute_alpha``: numpy float64 linspace, then float32
    betas and a float32 cumprod with 1.0 prepended (index t + 1)."""
    b = torch.from_numpy(np.linspace(0.0001, 0.02, 1000, dtype=np.float64)).float()
    return (1 - torch.cat([torch.zeros(1), b])).cumprod(dim=0)[1:]


def test_adm_schedule_is_ddrms():
    ref = ddrm_compute_alpha_table()
    assert adm_alphas_cumprod().dtype == torch.float32
    assert torch.equal(adm_alphas_cumprod(), ref)
    assert torch.equal(alphas_cumprod_from_betas(linear_betas()), ref)


@pytest.mark.parametrize("name", ["ref_deno.pt", "ref_sr4.pt", "ref_deblur_gauss.pt"])
def test_adm_schedule_reproduces_ddrm_x0_predictions_bit_for_bit(shared, name):
    """x0 = (x_t - eps sqrt(1 - a)) / sqrt(a) with our alphas gives the recorded float32 x0 at all 20 steps."""
    ref = torch.load(shared / "golden" / "ddrm" / name, map_location="cpu", weights_only=True)
    ac = adm_alphas_cumprod()
    ts = sorted((int(t) for t in ref["seq"]), reverse=True)
    for i, t in enumerate(ts):
        a = ac[t].view(1, 1, 1, 1)
        eps = ref["model_calls"][i]["out"][:, :3]
        x0 = (ref["xs"][i] - eps * (1 - a).sqrt()) / a.sqrt()
        assert torch.equal(x0, ref["x0_preds"][i]), (name, t)


def test_ldm_schedule_is_the_official_buffer(shared):
    ref = torch.load(shared / "golden" / "ldm" / "ldm_sr_tiny_ref.pt", weights_only=True)["schedule"]["alphas_cumprod"]
    hub = json.loads((shared / "golden" / "ldm" / "hub_configs" / "scheduler" / "scheduler_config.json").read_text())
    assert torch.equal(ldm_alphas_cumprod(), ref)
    assert torch.equal(alphas_cumprod_from_betas(sqrt_linear_betas()), ref)
    assert torch.equal(scheduler_alphas_cumprod(hub), ref)
    # rounding the betas to float32 first (the old sqrt_linear_betas) is what put 28 values one ulp off
    rounded = alphas_cumprod_from_betas(sqrt_linear_betas().float().double())
    assert int((rounded != ref).sum()) == 28


def test_scheduler_config_names_map_to_the_family_functions():
    assert torch.equal(scheduler_alphas_cumprod({}), adm_alphas_cumprod())  # diffusers defaults: ADM linear
    linear = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000}
    assert torch.equal(scheduler_alphas_cumprod(linear), adm_alphas_cumprod())
    scaled = {"beta_schedule": "scaled_linear", "beta_start": 0.0015, "beta_end": 0.0155, "num_train_timesteps": 1000}
    assert torch.equal(scheduler_alphas_cumprod(scaled), ldm_alphas_cumprod())
    cos = scheduler_alphas_cumprod({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 50})
    assert cos.shape == (50,) and bool((cos[1:] < cos[:-1]).all()) and 0 < float(cos[-1]) < float(cos[0]) < 1
    trained = scheduler_alphas_cumprod({"trained_betas": [0.1, 0.2]})
    assert torch.allclose(trained, torch.tensor([0.9, 0.72]))


@pytest.mark.parametrize(
    "cfg, match",
    [({"prediction_type": "v_prediction"}, "prediction_type"), ({"beta_schedule": "sigmoid"}, "sigmoid")],
)
def test_scheduler_config_errors_are_one_line(cfg, match):
    with pytest.raises(PriorLoadError, match=match) as e:
        scheduler_alphas_cumprod(cfg, "x/scheduler_config.json")
    assert "\n" not in str(e.value) and "x/scheduler_config.json" in str(e.value)


def test_casting_a_prior_keeps_its_schedule_float32():
    class Tiny(PixelPrior):
        def __init__(self):
            super().__init__(adm_alphas_cumprod())
            self.conv = torch.nn.Conv2d(3, 3, 1)

    p = Tiny().half()
    assert p.conv.weight.dtype == torch.float16
    assert p.alphas_cumprod.dtype == torch.float32 and torch.equal(p.alphas_cumprod, adm_alphas_cumprod())
    assert p.num_timesteps == 1000
