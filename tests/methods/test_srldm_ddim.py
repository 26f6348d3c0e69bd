"""DDIM as the official LDM DDIMSampler: constants, update rule and a full run of the converted tiny
model, against the golden tensors of the official code (../shared/golden/ldm)."""

import pytest
import torch

from diffrestore.methods.ddim import ddim_sample, ddim_schedule, ddim_timesteps
from diffrestore.priors.ldm import load_latent_sr


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def ref(shared):
    return torch.load(shared / "golden" / "ldm" / "ldm_sr_tiny_ref.pt", weights_only=True)


def replay(draws):
    it = iter(draws)

    def randn(shape):
        x = next(it)
        assert tuple(x.shape) == tuple(shape)
        return x.clone()

    return randn


def test_grid():
    # official make_ddim_timesteps('uniform'): arange(0, T, T // S) + 1
    assert torch.equal(ddim_timesteps(1000, 100), torch.arange(0, 1000, 10) + 1)
    assert torch.equal(ddim_timesteps(1000, 1), torch.tensor([1]))
    # S not dividing T: the official grid has one point more; we keep the first S
    for s in (3, 7, 30):
        assert torch.equal(ddim_timesteps(1000, s), (torch.arange(0, 1000, 1000 // s) + 1)[:s])
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)
    # start < 1: the same grid over the first start * T timesteps
    assert torch.equal(ddim_timesteps(1000, 10, start=0.5), torch.arange(10) * 50 + 1)
    assert torch.equal(ddim_timesteps(1000, 100, start=1.0), ddim_timesteps(1000, 100))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            ddim_timesteps(1000, 10, start=bad)
    with pytest.raises(ValueError):  # more steps than the truncated range holds
        ddim_timesteps(1000, 10, start=0.01)
    # stop > 0: the grid over (stop * T, start * T]
    assert torch.equal(ddim_timesteps(1000, 10, start=0.5, stop=0.4), 400 + torch.arange(10) * 10 + 1)
    assert torch.equal(ddim_timesteps(1000, 10, start=0.5, stop=0.0), ddim_timesteps(1000, 10, start=0.5))
    for bad in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match=r"stop \(.*\) must be in \[0, start=0.5\)"):
            ddim_timesteps(1000, 10, start=0.5, stop=bad)
    with pytest.raises(ValueError, match=r"10 steps do not fit between stop 0.49 and start 0.5 \(10 timesteps\): use at most 9"):
        ddim_timesteps(1000, 10, start=0.5, stop=0.49)


def test_schedule_with_stop_ends_at_the_stop_level():
    ac = torch.linspace(0.999, 0.01, 1000)
    full, part = ddim_schedule(ac, 10, 1.0), ddim_schedule(ac, 10, 1.0, start=0.5, stop=0.4)
    assert float(full.alphas_prev[-1]) == float(ac[0])  # the official last step
    assert torch.equal(part.timesteps, torch.arange(9, -1, -1) * 10 + 401)
    assert float(part.alphas_prev[-1]) == float(ac[400])  # the step into the stop level
    torch.testing.assert_close(part.alphas_prev[:-1].float(), ac[part.timesteps[1:]])


def test_schedule_constants_are_the_official_ones(ref):
    d = ref["ddim"]
    s = ddim_schedule(ref["schedule"]["alphas_cumprod"], 10, eta=1.0)
    assert torch.equal(s.timesteps, d["timesteps_used"]) and torch.equal(s.timesteps.flip(0), d["ddim_timesteps"])
    # the official buffers are stored in grid (ascending) order
    assert torch.equal(s.alphas.flip(0), d["ddim_alphas"])
    assert torch.equal(s.alphas_prev.flip(0), d["ddim_alphas_prev"])
    assert torch.equal(s.sigmas.flip(0), d["ddim_sigmas"])
    assert torch.equal(s.sqrt_one_minus_alphas.flip(0), d["ddim_sqrt_one_minus_alphas"])
    assert s.alphas_prev[-1] == ref["schedule"]["alphas_cumprod"][0]  # last step: alpha_bar[0], not 1
    assert s.sigmas[-1] > 0.027
    assert torch.all(ddim_schedule(ref["schedule"]["alphas_cumprod"], 10, eta=0.0).sigmas == 0)


def test_update_rule_replays_the_official_run_bit_exactly(ref):
    """Feed the recorded eps and noises: every state and x0 prediction is the official one, bit for bit."""
    d = ref["ddim"]
    s = ddim_schedule(ref["schedule"]["alphas_cumprod"], 10, eta=1.0)
    eps = iter(d["step_eps"])
    seen = []

    def eps_fn(x, t):
        seen.append((x.clone(), t.clone()))
        return next(eps)

    steps = []
    out = ddim_sample(eps_fn, d["x_T"], s, randn=replay(d["noises"]), callback=steps.append)
    assert torch.equal(out, d["samples"])
    assert torch.equal(torch.stack([x for x, _ in seen]), d["step_x"])
    assert torch.equal(torch.stack([t for _, t in seen]), d["step_t"])
    assert torch.equal(torch.stack([c["x"] for c in steps]), d["x_inter"][1:])
    assert torch.equal(torch.stack([c["pred_x0"] for c in steps]), d["pred_x0"][1:])
    assert [c["t"] for c in steps] == d["timesteps_used"].tolist()


def test_full_run_with_converted_model(shared, ref):
    d = ref["ddim"]
    prior = load_latent_sr(shared / "golden" / "ldm" / "ldm_sr_tiny.ckpt")
    s = ddim_schedule(prior.alphas_cumprod, d["S"], eta=d["eta"])
    steps = []
    with torch.no_grad():
        out = ddim_sample(lambda z, t: prior.eps(z, t, d["lr"]), d["x_T"], s,
                          randn=replay(d["noises"]), callback=steps.append)
        for i, c in enumerate(steps):
            assert rel(c["x"], d["x_inter"][i + 1]) <= 1e-4, i
            assert rel(c["pred_x0"], d["pred_x0"][i + 1]) <= 1e-4, i
        assert rel(out, d["samples"]) <= 1e-4
        idx = prior.first_stage.quantize(out)[2][2].view(d["samples_q_indices"].shape)
        assert torch.equal(idx, d["samples_q_indices"])
        assert rel(prior.decode(out), d["decoded"]) <= 1e-4
        assert rel(prior.decode(out, quantize=False), d["decoded_not_quantized"]) <= 1e-4
        img01 = torch.clamp((prior.decode(out) + 1.0) / 2.0, 0.0, 1.0)
        assert (img01 - d["decoded_img01"]).abs().max() <= 1e-4


def test_default_noise_comes_from_the_generator():
    ac = torch.linspace(0.999, 0.01, 1000)
    s = ddim_schedule(ac, 5, eta=1.0)
    x_T = torch.ones(2, 3, 4, 4)
    a = ddim_sample(lambda x, t: 0.1 * x, x_T, s, generator=torch.Generator().manual_seed(3))
    b = ddim_sample(lambda x, t: 0.1 * x, x_T, s, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    draws = [torch.randn(2, 3, 4, 4, generator=g) for _ in range(5)]
    c = ddim_sample(lambda x, t: 0.1 * x, x_T, s, randn=replay(draws))
    assert torch.equal(a, b) and torch.equal(a, c)
