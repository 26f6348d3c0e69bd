"""The channels-last switch (``load_prior(channels_last=True)``, ``DIFFRESTORE_CHANNELS_LAST=1``): the golden
ADM's and LDM-SR's networks still reproduce the official outputs within the golden tolerances, eager and frozen,
and the eager default layout is the reference."""

from __future__ import annotations

import pytest
import torch

from diffrestore.priors.loading import load_prior


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("frozen", [False, True])
def test_golden_adm_calls_with_channels_last(shared, frozen):
    d = shared / "golden" / "ddrm"
    calls = torch.load(d / "ref_sr4.pt", weights_only=True)["model_calls"][:4]
    prior = load_prior(d / "unet_state_dict.pt", adm_config={"num_head_channels": 16}, channels_last=True, dtype="fp32")
    if frozen:
        prior.use_frozen_graphs()
    assert prior.uses_channels_last and prior.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    reference = load_prior(d / "unet_state_dict.pt", adm_config={"num_head_channels": 16}, channels_last=False)
    assert not reference.uses_channels_last
    with torch.no_grad():
        for c in calls:
            got = prior.unet_sample(c["x_in"], c["t"])
            assert rel(got, c["out"]) <= 1e-5
            assert rel(got, reference.unet_sample(c["x_in"], c["t"])) <= 1e-5


def test_golden_ldm_with_channels_last_and_back(shared):
    d = shared / "golden" / "ldm"
    ref = torch.load(d / "ldm_sr_tiny_ref.pt", weights_only=True)["unet"]
    prior = load_prior(d / "ldm_sr_tiny.ckpt", channels_last=True)
    with torch.no_grad():
        for c in ref:
            assert rel(prior.eps(c["z_t"], c["t"], c["lr"]), c["eps"]) <= 1e-5
        prior.use_channels_last(False)
        assert not prior.uses_channels_last and prior.unet.conv_in.weight.is_contiguous()
        assert rel(prior.eps(ref[0]["z_t"], ref[0]["t"], ref[0]["lr"]), ref[0]["eps"]) <= 1e-5


def test_environment_switch(shared, monkeypatch):
    path = shared / "golden" / "ldm" / "ldm_sr_tiny.ckpt"
    monkeypatch.setenv("DIFFRESTORE_CHANNELS_LAST", "1")
    assert load_prior(path).uses_channels_last and not load_prior(path, channels_last=False).uses_channels_last
    monkeypatch.delenv("DIFFRESTORE_CHANNELS_LAST")
    assert not load_prior(path).uses_channels_last
