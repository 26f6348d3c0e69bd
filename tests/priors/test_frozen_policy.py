"""``load_prior(frozen_graphs=True)`` freezes only where frozen graphs are faster: latent UNets always, a pixel
UNet not in float32 on a CPU (measured slower there); an explicit ``use_frozen_graphs()`` still freezes."""

from __future__ import annotations

import pytest

from diffrestore.priors.frozen import frozen_graphs_pay_off
from diffrestore.priors.loading import load_prior

ADM = {"num_head_channels": 16}


@pytest.mark.parametrize("dtype, frozen", [(None, False), ("fp32", False), ("bf16", True), ("fp16", True)])
def test_pixel_prior_is_frozen_only_outside_fp32(shared, dtype, frozen):
    prior = load_prior(shared / "golden" / "ddrm" / "unet_state_dict.pt", adm_config=ADM, dtype=dtype, frozen_graphs=True)
    assert frozen_graphs_pay_off(prior) is frozen
    assert prior.uses_frozen_graphs is frozen


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_latent_prior_is_frozen_in_every_precision(shared, dtype):
    prior = load_prior(shared / "golden" / "ldm" / "ldm_sr_tiny.ckpt", dtype=dtype, frozen_graphs=True)
    assert frozen_graphs_pay_off(prior) and prior.uses_frozen_graphs


def test_explicit_request_still_freezes_a_fp32_pixel_prior(shared):
    prior = load_prior(shared / "golden" / "ddrm" / "unet_state_dict.pt", adm_config=ADM)
    assert not prior.uses_frozen_graphs and prior.use_frozen_graphs().uses_frozen_graphs


def test_frozen_graphs_off_by_default(shared):
    assert not load_prior(shared / "golden" / "ldm" / "ldm_sr_tiny.ckpt").uses_frozen_graphs
