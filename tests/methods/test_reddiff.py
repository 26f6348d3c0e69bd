"""RED-diff on our own operators (diffrestore.operators.tasks): the gradient against autograd on the
loss written with the dense H, our Adam against torch.optim.Adam, the least-squares fixed point,
frozen graphs and bf16, callback and determinism. The official code itself is pinned by
``test_reddiff_golden.py``."""

from __future__ import annotations

import json

import pytest
import torch

from diffrestore.methods import reddiff
from diffrestore.operators.tasks import make_task
from diffrestore.priors.adm import adm_config, build_adm_unet
from diffrestore.priors.adm_weights import convert_adm_state_dict
from diffrestore.priors.pixel import UNetPixelPrior

from test_ddrm import LinearPrior, RecordingRandn
from test_pigdm import TanhPrior

SHAPE = (3, 8, 8)


def _problem(task="noisy-sr4", batch=2, seed=5):
    task = make_task(task, SHAPE)
    x = torch.rand(batch, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return task, x, task.measure(x, generator=torch.Generator().manual_seed(1))


def test_gradient_is_the_gradient_of_the_official_loss():
    """Each step's gradient equals autograd of w_t mean((eps - n) x0) + obs mean((y - H x0)^2) / 2
    per image, with H the dense matrix (an independent form of the operator)."""
    task, x, y = _problem(batch=2)
    op = task.operator
    Hd = op.dense_matrix().float()
    prior, randn, infos = TanhPrior(), RecordingRandn(seed=2), []
    reddiff.restore(prior, op, y, sigma_y=task.sigma_y, steps=4, lr=0.05, reg_weight=0.3, obs_weight=2.0,
                    sigma_x0=0.1, randn=randn, callback=infos.append)
    assert len(infos) == 4 and prior.calls == 4 and len(randn.draws) == 8
    mu = op.pinv(y).reshape(x.shape)
    for k, info in enumerate(infos):
        n0, n = randn.draws[2 * k], randn.draws[2 * k + 1]
        x0 = (mu + 0.1 * n0).requires_grad_(True)
        a = prior.alphas_cumprod[info["t"]]
        x_t = a.sqrt() * x0.detach() + (1 - a).sqrt() * n
        torch.testing.assert_close(info["x_t"], x_t)
        eps = prior.eps(x_t, torch.full((2,), float(info["t"])))
        w_t = 0.3 * (1 - a).sqrt() / a.sqrt()
        loss = 0
        for b in range(2):  # one loss per image: the images do not share Adam's scale
            resid = y[b].reshape(-1) - Hd @ x0[b].reshape(-1)
            loss = loss + w_t * ((eps[b] - n[b]) * x0[b]).mean() + 2.0 * (resid**2).mean() / 2
        (grad,) = torch.autograd.grad(loss, x0)
        torch.testing.assert_close(info["grad"], grad, rtol=1e-5, atol=1e-8)
        mu = info["mu"]


def test_adam_equals_torch_adam():
    p = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    ref = p.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=0.3, betas=reddiff.ADAM_BETAS, eps=reddiff.ADAM_EPS, foreach=False)
    ours = reddiff._Adam(p, 0.3)
    for k in range(6):
        g = torch.randn(4, 5, generator=torch.Generator().manual_seed(10 + k))
        ref.grad = g.clone()
        opt.step()
        ours.step(g)
        torch.testing.assert_close(p, ref.detach(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("task", ["sr4", "inpaint"])
def test_without_regulariser_the_pseudo_inverse_is_a_fixed_point(task):
    """reg_weight 0 and a noiseless y: H^+ y already minimises the misfit, its gradient is 0 and Adam
    never moves mu; with the regulariser it does. (float64: Adam divides a gradient by its own size, so a
    float32 rounding residue of 1e-8 would already move mu by a share of lr.)"""
    task, x, y = _problem(task)
    y = y.double()
    run = lambda w: reddiff.restore(LinearPrior(), task.operator, y, sigma_y=0.0, steps=5, reg_weight=w,  # noqa: E731
                                    generator=torch.Generator().manual_seed(0))
    pinv = task.operator.pinv(y).reshape(x.shape)
    torch.testing.assert_close(run(0.0), pinv, rtol=0, atol=1e-7)
    assert (run(0.25) - pinv).abs().max() > 0.05


def test_first_step_moves_every_pixel_by_lr():
    """Adam's first step is -lr g / (|g| + eps): every pixel with a gradient well above eps moves by lr."""
    task, x, y = _problem()
    infos = []
    reddiff.restore(TanhPrior(), task.operator, y, sigma_y=task.sigma_y, steps=2, lr=0.07,
                    generator=torch.Generator().manual_seed(0), callback=infos.append)
    step = infos[0]["mu"] - infos[0]["x0"]
    g = infos[0]["grad"]
    torch.testing.assert_close(step, -0.07 * g / (g.abs() + reddiff.ADAM_EPS), rtol=1e-5, atol=1e-8)
    assert float((step.abs() > 0.069).float().mean()) > 0.95


def test_callback_determinism_and_seeds():
    task, x, y = _problem()
    prior, infos = TanhPrior(), []
    run = lambda seed, **kw: reddiff.restore(prior, task.operator, y, sigma_y=task.sigma_y, steps=5,  # noqa: E731
                                             generator=torch.Generator().manual_seed(seed), **kw)
    a = run(3, callback=infos.append)
    assert [i["i"] for i in infos] == list(range(5)) and [i["t"] for i in infos] == [800, 600, 400, 200, 0]
    assert torch.equal(a, infos[-1]["x0"])
    assert torch.equal(a, run(3)) and not torch.allclose(a, run(4))


def test_frozen_graphs_and_bf16_priors_work(shared):
    d = shared / "golden" / "ddrm"
    cfg = adm_config(**json.loads((d / "manifest.json").read_text())["model_cfg"])

    def prior(dtype=None):
        unet = build_adm_unet(cfg)
        unet.load_state_dict(convert_adm_state_dict(torch.load(d / "unet_state_dict.pt", weights_only=True), cfg))
        return UNetPixelPrior(unet, dtype=dtype)

    op = make_task("sr4", (3, 64, 64)).operator
    y = op.H(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    run = lambda p: reddiff.restore(p, op, y, sigma_y=0.0, steps=3, generator=torch.Generator().manual_seed(0))  # noqa: E731
    eager = run(prior())
    assert (run(prior().use_frozen_graphs()) - eager).norm() <= 1e-3 * eager.norm()
    bf16 = run(prior(torch.bfloat16))
    # Adam's steps are near lr * sign(grad), so where the regulariser's gradient nearly cancels the
    # misfit's, bf16 rounding flips a step: most pixels agree, a few differ by up to 2 lr
    assert torch.isfinite(bf16).all() and float((bf16 - eager).abs().median()) <= 1e-3
