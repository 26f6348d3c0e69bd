"""The built-in priors that ship in the package load, and their networks give finite outputs of the
right shape (a corrupt or half-copied model folder fails here, not in a user's first command)."""

import pytest
import torch

from diffrestore.priors.catalog import list_builtin_priors
from diffrestore.priors.loading import load_prior

SHIPPED = list_builtin_priors()


@pytest.mark.parametrize("info", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_prior_loads_and_runs(info):
    prior = load_prior(f"builtin:{info.name}", kind=info.kind)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if info.kind == "pixel":
            x = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
            out = prior.eps(x, torch.tensor([500]))
        else:
            x = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
            z = prior.encode(x)
            assert z.shape == (1, prior.latent_channels, 8, 8)
            out = prior.eps(z, torch.tensor([500]), x[:, :, ::4, ::4])
            assert prior.decode(z).shape == x.shape
    assert out.shape[1:] == (x if info.kind == "pixel" else z).shape[1:]
    assert torch.isfinite(out).all()


def test_fast_latent_prior_is_v_prediction_on_the_same_autoencoder():
    names = {p.name for p in SHIPPED}
    if not {"ldmsr-s", "ldmsr-xs"} <= names:
        pytest.skip("ldmsr-s / ldmsr-xs not shipped")
    s, xs = load_prior("builtin:ldmsr-s", kind="latent"), load_prior("builtin:ldmsr-xs", kind="latent")
    assert (s.prediction_type, xs.prediction_type) == ("epsilon", "v_prediction")
    a, b = s.first_stage.state_dict(), xs.first_stage.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shipped_weights_fit_the_package_budget():
    """Issue #5 caps the built-in weights at 50 MB in all (they ride along in every install)."""
    assert SHIPPED, "no built-in prior found"
    total = sum(p.size_mb for p in SHIPPED)
    assert total <= 50.0, f"built-in priors take {total:.1f} MB: " + ", ".join(f"{p.name} {p.size_mb:.1f}" for p in SHIPPED)
