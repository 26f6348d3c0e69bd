"""ΠGDM on our own operators (diffrestore.operators.tasks): the VJP against finite differences, the
noise-aware inverse against dense matrices, an exact-x0 oracle, refusals of priors that give no
gradients, bf16, callback and determinism. The official sampler itself is pinned by
``test_pigdm_golden.py``."""

from __future__ import annotations

import json

import pytest
import torch

from diffrestore.methods import pigdm
from diffrestore.methods.common import MethodArgumentError, alpha_bar
from diffrestore.operators.tasks import make_task
from diffrestore.priors.adm import adm_config, build_adm_unet
from diffrestore.priors.adm_weights import convert_adm_state_dict
from diffrestore.priors.base import PixelPrior, alphas_cumprod_from_betas, linear_betas
from diffrestore.priors.pixel import UNetPixelPrior

from conftest import OraclePrior

SHAPE = (3, 8, 8)


class TanhPrior(PixelPrior):
    """A small nonlinear 'network' with a dense, non-symmetric Jacobian (mixes every pixel)."""

    def __init__(self, d=3 * 8 * 8, seed=0):
        super().__init__(alphas_cumprod_from_betas(linear_betas()))
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
        self.calls = 0

    def eps(self, x_t, t):
        self.calls += 1
        flat = x_t.reshape(x_t.shape[0], -1)
        out = torch.tanh(flat @ self.W.to(flat) * (1 + t.to(flat).view(-1, 1) / 1000))
        return out.reshape(x_t.shape)


def _x(seed=1, batch=1, shape=SHAPE):
    return torch.rand(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def test_step_vjp_matches_finite_differences_and_the_update_formula():
    """g = (d x0 / d x_t)^T r for a fixed r, checked along random directions by central differences
    (float64), and x_s = sqrt(a_s) x0 + c1 z + c2 eps + sqrt(a_s a_t) w g."""
    prior = TanhPrior()
    ac = prior.alphas_cumprod
    t, s = 600, 500
    a_t, a_s = alpha_bar(ac, t), alpha_bar(ac, s)
    x_t, z, r = _x(1), _x(2), _x(3)
    x_s, x0, eps, g = pigdm.pigdm_step(prior, x_t, t, a_t, a_s, lambda *_: r, z, eta=0.7, guidance_weight=1.3)

    def x0_of(x):
        e = prior.eps(x, torch.full((1,), float(t), dtype=torch.float64))
        return (x - e * float((1 - a_t).sqrt())) / float(a_t.sqrt())

    h = 1e-6
    for k in range(3):
        v = _x(10 + k)
        fd = ((r * x0_of(x_t + h * v)).sum() - (r * x0_of(x_t - h * v)).sum()) / (2 * h)
        assert abs(float((g * v).sum()) - float(fd)) <= 1e-6 * float(fd.abs() + 1)
    c1 = 0.7 * ((1 - a_t / a_s) * (1 - a_s) / (1 - a_t)).sqrt()
    c2 = ((1 - a_s) - c1**2).sqrt()
    want = a_s.sqrt() * x0 + c1 * z + c2 * eps + (a_s * a_t).sqrt() * 1.3 * g
    torch.testing.assert_close(x_s, want.to(x_s), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("task", ["sr4", "inpaint", "colorize"])
def test_noise_aware_inverse_matches_the_dense_formula(task):
    """r2 H^T (r2 H H^T + sigma^2 I)^-1 r from the dense H; at sigma 0 it is the operator's pinv."""
    op = make_task(task, SHAPE).operator
    H = op.dense_matrix()
    r = torch.randn(2, *op.measurement_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for r2, sigma in ((0.7, 0.1), (0.05, 0.3)):
        want = r2 * H.T @ torch.linalg.solve(r2 * H @ H.T + sigma**2 * torch.eye(H.shape[0], dtype=H.dtype),
                                             r.reshape(2, -1).T)
        got = pigdm.weighted_inverse(op, r, r2, sigma).reshape(2, -1)
        torch.testing.assert_close(got, want.T, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(pigdm.weighted_inverse(op, r, 0.4, 0.0), op.pinv(r), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("task", ["sr4", "deblur"])
def test_exact_prior_recovers_the_image(task):
    """With eps exact for the true image, every x0 prediction is that image, the guidance residual is 0
    and the output is the image itself (noiseless y; eta 1 noise vanishes at the last step)."""
    x = _x(4, batch=2, shape=(3, 16, 16)).float()
    op = make_task(task, (3, 16, 16)).operator
    y = op.H(x)
    x0s = []
    out = pigdm.restore(OraclePrior(x), op, y, sigma_y=0.0, steps=8, generator=torch.Generator().manual_seed(0),
                        callback=lambda info: x0s.append(info["x0"]))
    assert len(x0s) == 8
    for x0 in x0s:
        torch.testing.assert_close(x0, x, atol=2e-4, rtol=0)
    torch.testing.assert_close(out, x, atol=2e-4, rtol=0)


def test_callback_determinism_and_seeds():
    task = make_task("noisy-sr4", SHAPE)
    x = _x(5, batch=2).float()
    y = task.measure(x, generator=torch.Generator().manual_seed(1))
    prior = TanhPrior()
    infos = []
    run = lambda seed, **kw: pigdm.restore(prior, task.operator, y, sigma_y=task.sigma_y, steps=5,  # noqa: E731
                                           generator=torch.Generator().manual_seed(seed), **kw)
    a = run(3, callback=infos.append)
    assert [i["i"] for i in infos] == list(range(5)) and prior.calls == 5
    assert [i["t"] for i in infos] == [800, 600, 400, 200, 0]
    assert all(i["x_t"].shape == i["x0"].shape == i["guidance"].shape == x.shape for i in infos)
    assert not infos[0]["x_t"].requires_grad
    assert torch.equal(a, run(3)) and not torch.allclose(a, run(4))
    official = run(3, official_ignore_sigma_y=True)
    assert not torch.allclose(a, official)
    noiseless = lambda **kw: pigdm.restore(prior, task.operator, y, sigma_y=0.0, steps=3,  # noqa: E731
                                           generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(noiseless(), noiseless(official_ignore_sigma_y=True))


def test_prior_without_gradients_is_refused():
    class Detached(TanhPrior):
        def eps(self, x_t, t):
            return super().eps(x_t, t).detach()

    op = make_task("sr4", SHAPE).operator
    with pytest.raises(MethodArgumentError, match="pigdm needs gradients through the prior's network"):
        pigdm.restore(Detached(), op, torch.zeros(1, *op.measurement_shape), sigma_y=0.0, steps=2)


@pytest.fixture(scope="module")
def tiny_adm(shared):
    def build(dtype=None):
        d = shared / "golden" / "ddrm"
        cfg = adm_config(**json.loads((d / "manifest.json").read_text())["model_cfg"])
        unet = build_adm_unet(cfg)
        unet.load_state_dict(convert_adm_state_dict(torch.load(d / "unet_state_dict.pt", weights_only=True), cfg))
        return UNetPixelPrior(unet, dtype=dtype)

    return build


def test_unet_prior_gives_gradients_only_when_asked(tiny_adm):
    prior = tiny_adm()
    x = torch.randn(1, 3, 64, 64)
    t = torch.tensor([500.0])
    plain = prior.eps(x, t)
    assert not plain.requires_grad
    with torch.enable_grad():
        graph = prior.eps(x.clone().requires_grad_(True), t)
    assert graph.requires_grad
    torch.testing.assert_close(graph.detach(), plain, rtol=0, atol=1e-5)


def test_frozen_graphs_are_refused_and_bf16_works(tiny_adm):
    op = make_task("sr4", (3, 64, 64)).operator
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = op.H(x)
    frozen = tiny_adm().use_frozen_graphs()
    with pytest.raises(MethodArgumentError, match="run without --frozen-graphs"):
        pigdm.restore(frozen, op, y, sigma_y=0.0, steps=2)
    outs = [pigdm.restore(tiny_adm(dtype), op, y, sigma_y=0.0, steps=2, generator=torch.Generator().manual_seed(0))
            for dtype in (None, torch.bfloat16)]
    assert torch.isfinite(outs[1]).all()
    assert (outs[1] - outs[0]).norm() <= 0.05 * outs[0].norm()


@pytest.mark.parametrize("command", ["restore", "evaluate"])
def test_cli_refuses_frozen_graphs_in_one_line_and_writes_nothing(command, tmp_path, shared, capsys):
    from PIL import Image

    from diffrestore.cli import main

    photo = tmp_path / "in" / "photo.png"
    photo.parent.mkdir()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(photo)
    out = tmp_path / "out"
    adm = str(shared / "golden" / "ddrm" / "unet_state_dict.pt")
    if command == "restore":
        args = ["restore", str(photo), "--method", "pigdm", "--task", "sr4", "--prior", adm, "--degrade"]
    else:
        args = ["evaluate", "--data", str(photo.parent), "--methods", "ddrm,pigdm", "--tasks", "sr4",
                "--pixel-prior", adm, "--size", "64"]
    rc = main(args + ["--steps", "2", "--out", str(out), "--no-progress", "--frozen-graphs"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == ["diffrestore: error: pigdm needs gradients through the prior's network; run without --frozen-graphs"]
    assert not out.exists() or not any(out.rglob("*"))
