"""The one restore-and-score path (``restoration.restore_and_score``) and how it tells priors apart.

References are independent: PSNR / consistency recomputed with numpy, the 8-bit PSNR from the values a PNG
holds, the method run directly through ``run_method`` with the seed the path should use.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrestore import restoration
from diffrestore.operators.tasks import make_task
from diffrestore.priors.base import LatentSRPrior, PixelPrior, adm_alphas_cumprod
from diffrestore.restoration import BASELINE, Measurement, prior_kind, restore_and_score


@pytest.fixture(scope="module")
def golden(shared):
    from diffrestore.priors.loading import load_prior

    return {
        "pixel": load_prior(shared / "golden" / "ddrm" / "unet_state_dict.pt"),
        "latent": load_prior(shared / "golden" / "ldm" / "ldm_sr_tiny.ckpt"),
    }


def _clean(size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return (torch.rand(1, 3, size, size, generator=g) * 2 - 1) * 0.9


def _np_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean(((a + 1) / 2 - (b + 1) / 2) ** 2)
    return float(10 * np.log10(1 / mse))


def test_priors_tiled_and_frozen_wrappers_are_classified_by_their_base_class(golden, shared):
    from diffrestore.priors.loading import load_prior
    from diffrestore.priors.tiled import TiledLatentSRPrior, TiledPixelPrior, tiled_prior

    pixel, latent = golden["pixel"], golden["latent"]
    assert prior_kind(pixel) == "pixel" and prior_kind(latent) == "latent"
    tp, tl = tiled_prior(pixel, 64, 16), tiled_prior(latent, 64, 16)
    assert isinstance(tp, TiledPixelPrior) and isinstance(tl, TiledLatentSRPrior)
    assert prior_kind(tp) == "pixel" and prior_kind(tl) == "latent"
    frozen = load_prior(shared / "golden" / "ldm" / "ldm_sr_tiny.ckpt", frozen_graphs=True)
    assert frozen.uses_frozen_graphs and prior_kind(frozen) == "latent"
    # a latent prior's sides are its latent multiple times its autoencoder's factor, tiled or not
    assert restoration.prior_multiple(tl) == restoration.prior_multiple(latent) == latent.downscale * latent.multiple_of

    class DuckTyped:  # has encode, but is no prior: not guessed to be one
        def encode(self, x):
            return x

    with pytest.raises(TypeError, match="neither"):
        prior_kind(DuckTyped())
    assert prior_kind(type("P", (PixelPrior,), {})(adm_alphas_cumprod())) == "pixel"
    assert prior_kind(type("L", (LatentSRPrior,), {})(adm_alphas_cumprod())) == "latent"


def test_baseline_is_scored_against_numpy_references():
    x = _clean()
    task = make_task("denoise", (3, 32, 32), sigma_y=0.3)
    y = restoration.measure_image(task, x, 4, "img")
    r = restore_and_score(Measurement(x, y, task, None), method=BASELINE, prior=None, steps=None, seed=4, image_id="img",
                          metrics=("psnr", "ssim"))  # fmt: skip
    xn, yn = x.numpy().astype(np.float64), y.numpy().astype(np.float64)
    assert r.steps == 0 and r.options == {} and r.std is None and r.spread is None
    assert torch.equal(r.x_hat, y.clamp(-1, 1))  # the denoise baseline is the input itself
    assert r.consistency == pytest.approx(np.sqrt(((np.clip(yn, -1, 1) - yn) ** 2).sum()), rel=1e-5)
    assert r.consistency_raw == r.consistency  # the baseline is an image in [-1, 1] already
    assert r.metrics["psnr"] == pytest.approx(_np_psnr(np.clip(yn, -1, 1), xn), abs=1e-6)
    assert set(r.metrics) == {"psnr", "ssim"}
    # quantized: PSNR of the 8-bit values the saved PNGs hold
    q = restore_and_score(Measurement(x, y, task, None), method=BASELINE, prior=None, steps=None, seed=4, image_id="img",
                          metrics=("psnr",), quantize=True)  # fmt: skip
    u8 = lambda t: np.round((np.clip(t.numpy(), -1, 1) + 1) * np.float32(127.5)).astype(np.float64) / 255  # noqa: E731
    mse = np.mean((u8(y) - u8(x)) ** 2)
    assert q.metrics["psnr"] == pytest.approx(10 * np.log10(1 / mse), abs=1e-9)


def test_a_method_runs_with_the_image_seed_and_its_record_fields(golden):
    x = _clean()
    task = make_task("sr4", (3, 32, 32))
    y = restoration.measure_image(task, x, 9, "photo.png")
    m = Measurement(x, y, task, None)
    r = restore_and_score(m, method="ddrm", prior=golden["pixel"], steps=None, seed=9, image_id="photo.png",
                          options={"eta": 0.5}, baseline=True)  # fmt: skip
    direct = restoration.run_method("ddrm", {"pixel": golden["pixel"]}, task, y, steps=r.steps, eta=0.5,
                                    seed=restoration.image_seed(9, "photo.png")).x_hat  # fmt: skip
    assert torch.equal(r.raw, direct) and torch.equal(r.x_hat, direct.clamp(-1, 1))
    assert r.steps == restoration.get_method("ddrm").default_steps
    assert r.options["eta"] == 0.5 and r.options == restoration.used_options("ddrm", {"eta": 0.5})
    q = r.quality()
    assert q["consistency_raw"] == pytest.approx(float((task.operator.H(direct) - y).norm()), rel=1e-6)
    assert q["baseline_consistency"] == r.baseline.consistency and r.baseline.steps == 0
    assert q["psnr"] == pytest.approx(_np_psnr(direct.clamp(-1, 1).numpy().astype(np.float64), x.numpy()), abs=1e-6)
    assert {"psnr_y", "ssim", "baseline_psnr", "baseline_ssim"} <= set(q) and ("lpips" in q or "lpips_note" in q)


def test_score_image_refuses_a_metric_it_does_not_know():
    x = _clean(16)
    with pytest.raises(ValueError, match="unknown metric 'fid'"):
        restoration.score_image(x, x, ("psnr", "fid"))
