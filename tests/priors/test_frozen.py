"""Frozen TorchScript graphs (``priors.frozen``): the same numbers as the official code's golden model
calls, one graph per input signature, and a graph that disagrees with its network is refused."""

from __future__ import annotations

import json

import pytest
import torch

from diffrestore.priors.adm import adm_config, build_adm_unet
from diffrestore.priors.adm_weights import convert_adm_state_dict
from diffrestore.priors.frozen import FrozenGraphError, FrozenGraphs
from diffrestore.priors.ldm import load_latent_sr
from diffrestore.priors.pixel import UNetPixelPrior


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def adm_prior(shared):
    d = shared / "golden" / "ddrm"
    cfg = adm_config(**json.loads((d / "manifest.json").read_text())["model_cfg"])
    unet = build_adm_unet(cfg, device="meta")
    sd = torch.load(d / "unet_state_dict.pt", map_location="cpu", weights_only=True)
    unet.load_state_dict(convert_adm_state_dict(sd, cfg), strict=True, assign=True)
    calls = torch.load(d / "ref_sr4.pt", map_location="cpu", weights_only=True)["model_calls"]
    return UNetPixelPrior(unet), calls


def test_frozen_pixel_prior_reproduces_official_calls(adm_prior):
    """The tiny ADM (attention, learned sigma) of the DDRM golden run, frozen: batch 20 and batch 1."""
    prior, calls = adm_prior
    prior.use_frozen_graphs()
    try:
        x = torch.cat([c["x_in"] for c in calls])
        t = torch.cat([c["t"] for c in calls])
        out = prior.model_output(x, t)
        for i, c in enumerate(calls):
            assert rel(out[i : i + 1], c["out"]) <= 1e-5
        one = prior.model_output(calls[3]["x_in"], calls[3]["t"])
        assert rel(one, calls[3]["out"]) <= 1e-5
        # one graph per signature, reused on the next call with a known one
        assert len(prior._frozen_unet.graphs) == 2
        assert torch.equal(prior.model_output(calls[3]["x_in"], calls[3]["t"]), one)
        assert len(prior._frozen_unet.graphs) == 2
    finally:
        prior.use_frozen_graphs(False)
    assert not prior.uses_frozen_graphs


def test_frozen_latent_prior_reproduces_official_calls(shared):
    d = shared / "golden" / "ldm"
    ref = torch.load(d / "ldm_sr_tiny_ref.pt", weights_only=True)["unet"]
    prior = load_latent_sr(d / "ldm_sr_tiny.ckpt").use_frozen_graphs()
    with torch.no_grad():
        for k in range(3):
            assert rel(prior.eps(ref[k]["z_t"], ref[k]["t"], ref[k]["lr"]), ref[k]["eps"]) <= 1e-5


def test_frozen_bf16_prior_matches_its_eager_self(shared):
    """bf16 networks round differently when traced; within 8 bf16 ulps of the output scale."""
    d = shared / "golden" / "ldm"
    ref = torch.load(d / "ldm_sr_tiny_ref.pt", weights_only=True)["unet"][1]
    prior = load_latent_sr(d / "ldm_sr_tiny.ckpt", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = prior.eps(ref["z_t"], ref["t"], ref["lr"])
        frozen = prior.use_frozen_graphs().eps(ref["z_t"], ref["t"], ref["lr"])
    assert frozen.dtype == eager.dtype == ref["z_t"].dtype
    assert (frozen - eager).abs().max() <= 8 * torch.finfo(torch.bfloat16).eps * eager.abs().max()
    assert rel(frozen, ref["eps"]) <= 2e-2  # and both are the official network's output, to bf16 precision


class _Counter(torch.nn.Module):
    """Adds how often it has been called: a trace bakes in one count, so the graph disagrees."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.calls


def test_graph_that_disagrees_is_refused():
    frozen = FrozenGraphs(_Counter())
    with pytest.raises(FrozenGraphError, match="frozen graph differs"):
        frozen(torch.zeros(2, 3))
    assert not frozen.graphs
