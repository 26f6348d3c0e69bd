"""SRLDM end to end with the official tiny LDM-SR model (../shared/golden/ldm)."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffrestore.methods import srldm
from diffrestore.operators.base import LinearOperator
from diffrestore.priors.ldm import load_latent_sr


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class ShapeOnly(LinearOperator):
    """Just the shapes SRLDM reads: the image (in_shape) and the measurement."""

    def __init__(self, in_shape, measurement_shape):
        super().__init__(in_shape)
        self._m = tuple(measurement_shape)

    @property
    def measurement_shape(self):
        return self._m


@pytest.fixture(scope="module")
def ref(shared):
    return torch.load(shared / "golden" / "ldm" / "ldm_sr_tiny_ref.pt", weights_only=True)


@pytest.fixture(scope="module")
def prior(shared):
    return load_latent_sr(shared / "golden" / "ldm" / "ldm_sr_tiny.ckpt")


def to_tensor(u8):
    return u8.permute(2, 0, 1)[None].float() / 255 * 2 - 1


def replay(draws):
    it = iter(draws)
    return lambda shape: next(it).clone()


def test_sr_measurement_is_the_conditioning_golden_run(ref, prior):
    """SR x4: y is used as is; replaying the official draws gives the official decoded image."""
    d = ref["ddim"]
    op = ShapeOnly((3, 64, 64), (3, 16, 16))
    out = srldm.restore(prior, op, d["lr"], sigma_y=0.0, steps=10, eta=1.0,
                        randn=replay([d["x_T"], *d["noises"]]))
    want = d["decoded"].clamp(-1, 1)
    assert out.shape == (1, 3, 64, 64)
    assert ((out - want).abs().max() / want.abs().max()).item() <= 1e-4


def test_downscale_filter_is_pil_bicubic(ref):
    """The default filter is PIL's BICUBIC resampling (float mode, without PIL's 8-bit rounding)."""
    hr = ref["hr_uint8"].numpy()
    pil = np.stack([
        np.asarray(Image.fromarray(hr[..., c].astype(np.float32), mode="F").resize((16, 16), Image.BICUBIC))
        for c in range(3)
    ])
    ours = srldm.resize(torch.from_numpy(hr).permute(2, 0, 1)[None].double(), (16, 16), "bicubic")[0]
    assert np.abs(ours.numpy() - pil).max() < 1e-3  # on the 0..255 scale
    # area = mean of each 4x4 block
    x = to_tensor(ref["hr_uint8"])
    assert torch.allclose(srldm.resize(x, (16, 16), "area"), x.unfold(2, 4, 4).unfold(3, 4, 4).mean((-1, -2)))


def test_full_size_measurement_is_downscaled(ref, prior):
    """Deblur/denoise: the full-size measurement is shrunk 4x and super-resolved; with the same draws this
    is the SR path on the shrunk image."""
    hr = to_tensor(ref["hr_uint8"])
    d = ref["ddim"]
    lr = srldm.lr_conditioning(ShapeOnly((3, 64, 64), (3, 64, 64)), hr)
    assert torch.equal(lr, srldm.resize(hr, (16, 16)).clamp(-1, 1))
    draws = [d["x_T"], *d["noises"][:3]]
    a = srldm.restore(prior, ShapeOnly((3, 64, 64), (3, 64, 64)), hr, sigma_y=0.05, steps=3, randn=replay(draws))
    b = srldm.restore(prior, ShapeOnly((3, 64, 64), (3, 16, 16)), srldm.resize(hr, (16, 16)), sigma_y=0.0,
                      steps=3, randn=replay(draws))
    assert torch.equal(a, b)


def test_seeded_run_is_deterministic_and_valid(ref, prior, monkeypatch):
    hr = to_tensor(ref["hr_uint8"])
    op = ShapeOnly((3, 64, 64), (3, 64, 64))
    run = lambda seed, **kw: srldm.restore(  # noqa: E731
        prior, op, hr, sigma_y=0.0, steps=4, generator=torch.Generator().manual_seed(seed), **kw)
    calls = []
    real_decode = prior.decode
    monkeypatch.setattr(prior, "decode", lambda z, **kw: calls.append(1) or real_decode(z, **kw))
    a = run(0)
    assert len(calls) == 1  # no callback: decode only the result
    b = run(0)
    c = run(1)
    assert a.shape == (1, 3, 64, 64) and torch.isfinite(a).all()
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    infos = []
    d = run(0, callback=infos.append)
    assert torch.equal(a, d)
    assert len(calls) == 4  # the callback alone decodes nothing until a value is read
    assert [i["i"] for i in infos] == [0, 1, 2, 3] and [i["t"] for i in infos] == [751, 501, 251, 1]
    assert infos[0]["x_t"].shape == infos[0]["x0"].shape == (1, 3, 64, 64)
    assert len(calls) == 6
    # z_t is the state the UNet evaluated: x_T at the first step
    assert torch.equal(infos[0]["z_t"], torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("size,meas", [(68, 17), (66, 66), (64, 32)])
def test_sizes_are_padded_and_cropped(prior, size, meas):
    """Latent sides must be multiples of multiple_of (2 here): 68 -> latent 17 -> padded to 18; 66 is not a
    multiple of 4; a 1/2-size measurement is resized to the 1/4 size."""
    y = torch.rand(2, 3, meas, meas) * 2 - 1
    out = srldm.restore(prior, ShapeOnly((3, size, size), (3, meas, meas)), y, sigma_y=0.0, steps=2,
                        generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, size, size) and torch.isfinite(out).all()


def test_grey_measurement_is_repeated_to_rgb(prior):
    y = torch.rand(1, 1, 16, 16) * 2 - 1
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = srldm.restore(prior, ShapeOnly((3, 64, 64), (1, 16, 16)), y, sigma_y=0.0, steps=2, generator=g())
    b = srldm.restore(prior, ShapeOnly((3, 64, 64), (3, 16, 16)), y.expand(-1, 3, -1, -1), sigma_y=0.0, steps=2,
                      generator=g())
    assert torch.equal(a, b)


def test_start_below_one_begins_at_the_diffused_upsampled_conditioning(prior):
    """start < 1: the first state the UNet sees is sqrt(a) E(bicubic_up(lr)) + sqrt(1 - a) n at the first
    point of the truncated grid, and exactly ``steps`` network calls follow."""
    import torch.nn.functional as F

    from diffrestore.methods.ddim import ddim_timesteps

    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    draws = [torch.randn(1, prior.latent_channels, 16, 16, generator=torch.Generator().manual_seed(k)) for k in range(6)]
    seen = []
    srldm.restore(prior, ShapeOnly((3, 64, 64), (3, 16, 16)), lr, sigma_y=0.0, steps=5, start=0.4,
                  randn=replay(draws), callback=seen.append)
    t = ddim_timesteps(1000, 5, start=0.4).flip(0)
    assert [s["t"] for s in seen] == t.tolist() and t[0] == 321
    a = prior.alphas_cumprod[t[0]].item()
    up = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
    want = a**0.5 * prior.encode(up) + (1 - a) ** 0.5 * draws[0]
    torch.testing.assert_close(seen[0]["z_t"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma_y", [0.0, 0.05])
def test_consistency_blends_the_official_output_with_the_measurement(ref, prior, sigma_y):
    """consistency=True on the golden run: noiseless, the official decoded image projected onto
    {x : Ax = y} with A's dense pseudo-inverse; noisy (sr4's singulars all equal s = 1/4), A x moves
    to y by w = tau^2 / (tau^2 + sigma_y^2 / s^2) and the change lies in the row space of A."""
    from diffrestore.operators.tasks import make_task

    d = ref["ddim"]
    op = make_task("sr4", (3, 64, 64)).operator
    A = op.dense_matrix().double()
    out = srldm.restore(prior, op, d["lr"], sigma_y=sigma_y, steps=10, eta=1.0, consistency=True,
                        randn=replay([d["x_T"], *d["noises"]])).double().reshape(-1)
    raw, y = d["decoded"].double().reshape(-1), d["lr"].double().reshape(-1)
    if sigma_y == 0:
        want = raw + torch.linalg.pinv(A) @ (y - A @ raw)
        torch.testing.assert_close(out, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(A @ out, y, atol=1e-4, rtol=0)
    else:
        tau, s = srldm.SRLDM_CONSISTENCY_RHO, 0.25
        assert torch.allclose(op.singulars.double(), torch.full_like(op.singulars.double(), s))
        w = tau**2 / (tau**2 + sigma_y**2 / s**2)
        torch.testing.assert_close(A @ out, A @ raw + w * (y - A @ raw), atol=1e-4, rtol=0)
        change = out - raw
        in_row_space = A.T @ torch.linalg.lstsq(A.T, change.unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(in_row_space, change, atol=1e-4, rtol=0)
