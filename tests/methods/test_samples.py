"""``samples=N`` through the method registry: the mean of N independent draws per measurement, for
every method; and the value checks the registry runs before a command writes anything."""

from __future__ import annotations

import pytest
import torch

from diffrestore.methods import METHODS, check_options, get_method, method_options, preset_options
from diffrestore.methods.common import MethodArgumentError
from diffrestore.operators.tasks import make_task
from diffrestore.restoration import run_method

from test_ddrm import LinearPrior
from test_latent_hybrids import _PixelLatent

SHAPE = (3, 16, 16)
STEPS = {"ddrm": 5, "srldm": 4, "ddrm-srldm": 5, "ddrm-ldm": 4, "diffpir": 5, "ddnm": 5, "pigdm": 5, "reddiff": 5}


def _setup(method, batch=2):
    task = make_task("noisy-sr4", SHAPE)
    x = torch.rand(batch, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = task.measure(x, generator=torch.Generator().manual_seed(0))
    prior = LinearPrior() if get_method(method).prior == "pixel" else _PixelLatent()
    return task, prior, y


def _run(info, prior, task, y, seed=4, **kw):
    return info.restore(prior, task.operator, y, sigma_y=task.sigma_y, steps=STEPS[info.name],
                        generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_samples_are_the_mean_of_an_explicit_repeated_batch(method):
    """samples=K equals the mean over the K rows of the method's own run on y repeated K times (same
    seed, the registry's recommended options passed explicitly); the K draws differ; K=1 is the
    method's restore with those options bit for bit."""
    info = get_method(method)
    task, prior, y = _setup(method)
    rows = info.sampler(prior, task.operator, y.repeat_interleave(3, dim=0), sigma_y=task.sigma_y,
                        steps=STEPS[method], generator=torch.Generator().manual_seed(4),
                        **info.recommended).reshape(2, 3, *SHAPE)
    torch.testing.assert_close(_run(info, prior, task, y, samples=3), rows.mean(dim=1), atol=1e-6, rtol=0)
    assert not torch.allclose(rows[:, 0], rows[:, 1])
    one = info.sampler(prior, task.operator, y, sigma_y=task.sigma_y, steps=STEPS[method],
                       generator=torch.Generator().manual_seed(4), **info.recommended)
    assert torch.equal(_run(info, prior, task, y, samples=1), one)


@pytest.mark.parametrize("method", ["ddrm", "srldm"])
def test_registry_defaults_are_the_recommended_options_and_paper_is_the_module_call(method):
    """Through the registry an option left out takes its recommended value (bit for bit the run with
    it passed explicitly), ``paper=True`` is the module's plain call bit for bit, and the two differ;
    an explicit option beats the recommended one. ``method_options`` reports the same defaults."""
    info = get_method(method)
    assert info.recommended == {"consistency": True}
    assert method_options(method)["consistency"] is True and method_options(method, paper=True)["consistency"] is False
    assert preset_options(method, "paper") == {"consistency": False} and preset_options(method) == {"consistency": True}
    task, prior, y = _setup(method)
    plain = info.sampler(prior, task.operator, y, sigma_y=task.sigma_y, steps=STEPS[method],
                         generator=torch.Generator().manual_seed(4))
    default = _run(info, prior, task, y)
    assert torch.equal(default, _run(info, prior, task, y, consistency=True))
    assert torch.equal(_run(info, prior, task, y, paper=True), plain)
    assert torch.equal(_run(info, prior, task, y, consistency=False), plain)
    assert not torch.allclose(default, plain)
    # the recommended run meets the measurement better (what the consistency step is for)
    assert (task.operator.H(default) - y).norm() < (task.operator.H(plain) - y).norm()
    # samples > 1 applies the same defaults to every draw
    explicit = _run(info, prior, task, y, samples=2, consistency=True)
    assert torch.equal(_run(info, prior, task, y, samples=2), explicit)
    assert torch.equal(_run(info, prior, task, y, samples=2, paper=True), _run(info, prior, task, y, samples=2, consistency=False))


def test_methods_without_recommended_options_keep_the_module_defaults():
    for method in METHODS:
        if not get_method(method).recommended:
            assert method_options(method) == method_options(method, paper=True)
            assert preset_options(method, "paper") == preset_options(method) == {}
    with pytest.raises(ValueError, match="unknown preset"):
        preset_options("ddrm", "fast")


def test_samples_reduce_the_spread_across_seeds():
    """The mean of 4 DDRM draws varies about half as much from seed to seed as one draw (1/sqrt(4))."""
    info = get_method("ddrm")
    task, prior, y = _setup("ddrm", batch=1)

    def spread(samples):
        outs = torch.stack([_run(info, prior, task, y, seed=seed, samples=samples) for seed in range(8)])
        return float(outs.std(dim=0).mean())

    ratio = spread(4) / spread(1)
    assert 0.3 < ratio < 0.7, ratio


def test_run_method_returns_the_mean_and_the_per_pixel_std_of_the_draws():
    task, prior, y = _setup("srldm")
    info = get_method("srldm")
    draws = info.restore_draws(prior, task.operator, y, samples=3, sigma_y=task.sigma_y, steps=4,
                               generator=torch.Generator().manual_seed(9))
    result = run_method("srldm", {"latent": prior}, task, y, steps=4, seed=9, samples=3)
    torch.testing.assert_close(result.x_hat, draws.mean(dim=1))
    torch.testing.assert_close(result.std, draws.std(dim=1))
    assert result.std.shape == y.shape[:1] + SHAPE and float(result.std.min()) >= 0
    assert run_method("srldm", {"latent": prior}, task, y, steps=4, seed=9).std is None


def test_samples_argument_errors():
    info = get_method("ddrm")
    task, prior, y = _setup("ddrm", batch=1)
    for bad in (0, -2, True, 2.0):
        with pytest.raises(MethodArgumentError, match="samples must be a positive integer"):
            _run(info, prior, task, y, samples=bad)
    with pytest.raises(MethodArgumentError, match="samples=1"):
        _run(info, prior, task, y, samples=2, x_T=torch.zeros(2, *SHAPE))


@pytest.mark.parametrize(
    "method,options",
    [("ddrm", {"eta": 1.5}), ("ddrm", {"eta_b": -0.1}), ("srldm", {"eta": -1.0}), ("srldm", {"start": 1.5}),
     ("srldm", {"lr_filter": "nearest"}), ("srldm", {"rho": -0.1}), ("ddrm-ldm", {"stop": 0.5}), ("ddrm-ldm", {"rho": -0.1}),
     ("ddrm-srldm", {"strategy": "c"}), ("ddrm-srldm", {"eta": 2.0}), ("diffpir", {"lambda_": -1.0}),
     ("diffpir", {"zeta": 1.5}),
     ("pigdm", {"guidance_weight": -1.0}),
     ("pigdm", {"guidance_weight": float("inf")}), ("pigdm", {"eta": 1.5}), ("reddiff", {"lr": 0.0}),
     ("reddiff", {"reg_weight": -0.25}), ("reddiff", {"obs_weight": float("nan")}), ("reddiff", {"sigma_x0": -1.0})],
)
def test_what_the_registry_refuses_the_method_refuses_too(method, options):
    """check_options (run before anything is written) and the method agree on every bad value."""
    with pytest.raises(ValueError, match=f"method {method}: "):
        check_options(method, options)
    task, prior, y = _setup(method, batch=1)
    with pytest.raises(MethodArgumentError):
        _run(get_method(method), prior, task, y, **options)


def test_the_defaults_pass_the_checks():
    for method in METHODS:
        assert check_options(method, {}) == {}
        get_method(method).check_values({})
