"""The report's "Baseline" rows from a baseline-only ``diffrestore evaluate`` (``--methods baseline``)
on 5 real photos of ``../shared/data/imagenet-sample-500`` at 256x256 (docs/baselines.md has all 500).

* the run needs no method, prior or model and holds only baseline records;
* every record equals an independent recomputation (measurement by direct pooling / convolution /
  seeded noise, bicubic upscaling, PSNR in numpy, SSIM by scikit-image);
* the denoise baseline PSNR matches its closed form (see ``expected_clipped_mse``).
"""

from __future__ import annotations

import json
import math
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import ndtr
from skimage.metrics import structural_similarity

import test_runner_fakes as fx
from diffrestore import cli
from diffrestore.evaluation import seams
from diffrestore.operators.tasks import BASELINE
from diffrestore.evaluation.data import load_eval_image
from diffrestore.restoration import image_seed

N, SIZE, SEED = 5, 256, 0
TASKS = ["sr4", "deblur", "denoise", "noisy-sr4"]
SIGMA = {"sr4": 0.0, "deblur": 0.0, "denoise": 0.1, "noisy-sr4": 0.05}  # [-1, 1] units


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def _no_inception(device):  # FID is not what this file checks; keep the run fast and offline
    raise seams.FeaturesUnavailable("no Inception network (disabled in this test)")


@pytest.fixture(scope="module")
def run(shared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("baselines") / "run"
    argv = [
        "evaluate", "--data", str(shared / "data" / "imagenet-sample-500"), "--n", str(N), "--seed", str(SEED),
        "--size", str(SIZE), "--tasks", ",".join(TASKS), "--methods", "baseline", "--device", "cpu",
        "--no-progress", "--out", str(out),
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(seams, "load_feature_extractor", _no_inception)
        rc, stdout, err = _cli(argv)
    assert rc == 0, err
    assert stdout.count("| Baseline |") == len(TASKS)
    return out


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]


def test_baseline_only_run_is_extended_by_naming_a_method(tmp_path, monkeypatch):
    data = fx.make_data(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["evaluate", "--data", str(data), "--out", str(out), "--n", "3", "--size", "32", "--tasks", "sr4", "--no-progress"]
    rc, _, err = fx.run_cli(monkeypatch, argv + ["--methods", "baseline"])
    assert rc == 0, err
    first = fx.records(out)
    assert [r["method"] for r in first] == [BASELINE] * 3
    rc, _, err = fx.run_cli(monkeypatch, argv + ["--methods", "fake-pix", "--steps", "3", "--pixel-prior", "fake:pixel"])
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["grid"]["methods"] == ["fake-pix"]
    after = fx.records(out)
    assert [r for r in after if r["method"] == BASELINE] == first
    assert [r["method"] for r in after if r["method"] != BASELINE] == ["fake-pix"] * 3


# --------------------------------------------------------------------------------------------
# independent recomputation
# --------------------------------------------------------------------------------------------


def _measure(task: str, x: torch.Tensor, image_id: str) -> torch.Tensor:
    """y of the report's tasks, written out directly (float32, like the operators)."""
    if task in ("sr4", "noisy-sr4"):
        y = F.avg_pool2d(x, 4)
    elif task == "deblur":  # Gaussian std 1 px: 9 taps (radius ceil(4 sigma)), normalised, zeros outside
        t = torch.arange(-4, 5, dtype=torch.float64)
        k = torch.exp(-0.5 * t**2)
        k = (k / k.sum()).float()
        w = torch.outer(k, k).expand(3, 1, 9, 9).contiguous()
        y = F.conv2d(x, w, padding=4, groups=3)
    else:
        y = x.clone()
    if SIGMA[task]:
        g = torch.Generator().manual_seed(image_seed(SEED, image_id + "#measurement"))
        y = y + SIGMA[task] * torch.randn(y.shape, generator=g)
    return y


def _baseline(task: str, y: torch.Tensor) -> torch.Tensor:
    if task in ("sr4", "noisy-sr4"):
        y = F.interpolate(y.clamp(-1, 1), size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    return y.clamp(-1, 1)


def _unit(x: torch.Tensor) -> np.ndarray:
    return ((x[0].double().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def test_baseline_only_run_has_no_method_and_only_baseline_records(run):
    config = json.loads((run / "config.json").read_text())
    assert config["grid"]["methods"] == [] and config["grid"]["tasks"] == TASKS
    assert config["settings"]["pixel_prior"] is None and config["settings"]["latent_prior"] is None
    recs = _records(run)
    assert len(recs) == N * len(TASKS)
    assert {(r["method"], r["steps"]) for r in recs} == {(BASELINE, 0)}
    results = json.loads((run / "results.json").read_text())
    assert [[row["label"] for row in results["tables"][t]] for t in TASKS] == [["Baseline"]] * len(TASKS)


def test_baseline_records_equal_a_direct_recomputation(run):
    files = (run / "files.txt").read_text().splitlines()
    recs = _records(run)
    assert sorted(r["image_id"] for r in recs) == sorted(files * len(TASKS))
    data = Path(json.loads((run / "config.json").read_text())["settings"]["data"])
    clean = {f: load_eval_image(data / f, SIZE).unsqueeze(0) for f in files}
    for r in recs:
        x = clean[r["image_id"]]
        y = _measure(r["task"], x, r["image_id"])
        a, b = _unit(_baseline(r["task"], y)), _unit(x)
        psnr = -10 * math.log10(float(np.mean((a - b) ** 2)))
        ssim = structural_similarity(
            a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        # float32 rounding of a differently ordered convolution is ~1e-7 per pixel: far below 1e-4 dB
        assert r["psnr"] == pytest.approx(psnr, abs=1e-4), r
        assert r["ssim"] == pytest.approx(ssim, abs=1e-6), r
        assert r["consistency"] >= 0


# --------------------------------------------------------------------------------------------
# closed form of the denoise baseline
# --------------------------------------------------------------------------------------------


def expected_clipped_mse(v: np.ndarray, s: float) -> float:
    """E[(clip(v + s n, 0, 1) - v)^2] per pixel (n ~ N(0, 1)), averaged over the image; v in [0, 1].

    With a = -v/s, b = (1 - v)/s: ``s^2 [(Phi(b) - Phi(a)) - (b phi(b) - a phi(a))] + (1 - v)^2 (1 - Phi(b))
    + v^2 Phi(a)``. Without clipping it is s^2, i.e. PSNR 20 log10(1/s) = 26.02 dB for s = 0.05.
    """
    a, b = -v / s, (1 - v) / s
    phi = lambda t: np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)  # noqa: E731
    inside = s * s * ((ndtr(b) - ndtr(a)) - (b * phi(b) - a * phi(a)))
    return float(np.mean(inside + (1 - v) ** 2 * (1 - ndtr(b)) + v**2 * ndtr(a)))


def test_expected_clipped_mse_limits():
    assert expected_clipped_mse(np.array([0.5]), 0.05) == pytest.approx(0.05**2, rel=1e-9)  # never clipped
    assert expected_clipped_mse(np.array([0.0]), 0.05) == pytest.approx(0.05**2 / 2, rel=1e-9)  # half clipped to 0 error
    rng = np.random.default_rng(0)  # and against sampling
    v = rng.uniform(0, 1, 4000)
    n = rng.standard_normal((200, 4000))
    mc = np.mean((np.clip(v + 0.05 * n, 0, 1) - v) ** 2)
    assert expected_clipped_mse(v, 0.05) == pytest.approx(mc, rel=0.01)


def test_denoise_baseline_psnr_matches_the_closed_form(run):
    """sigma_y 0.1 in [-1, 1] units is s = 0.05 on [0, 1]: unclipped PSNR 20 log10(1 / 0.05) = 26.02 dB.

    Tolerance: a record's MSE is a mean over D = 3 * 256^2 = 196,608 independent per-pixel terms, so its
    relative standard deviation is sqrt(Var(e^2) / D) / E(e^2) <= sqrt(2 / D) = 0.32 % without clipping
    (0.014 dB) and at most ~1.6x that with clipping (Var/E^2 = 5 for a pixel at 0 or 1 vs 2): <= 0.023 dB.
    0.1 dB is > 4 standard deviations of a single image (observed on all 500 photos: std 0.014 dB, max 0.047 dB),
    yet a missing clamp fails it (clipping raises these 5 photos by 0.08 to 0.82 dB, 3 of them by more
    than 0.15 dB) and so does an error of units (sigma 0.1 taken on [0, 1]: 20 dB).
    """
    data = Path(json.loads((run / "config.json").read_text())["settings"]["data"])
    unclipped_db = 20 * math.log10(1 / 0.05)
    assert unclipped_db == pytest.approx(26.0206, abs=1e-4)
    for r in (r for r in _records(run) if r["task"] == "denoise"):
        x = load_eval_image(data / r["image_id"], SIZE).unsqueeze(0)
        y = _measure("denoise", x, r["image_id"])
        raw = -10 * math.log10(float(((y.double() - x.double()) / 2).pow(2).mean()))  # no clamp
        assert raw == pytest.approx(unclipped_db, abs=0.1)
        assert r["psnr"] >= raw  # x is in [0, 1], so clipping y can only bring it closer
        expected = -10 * math.log10(expected_clipped_mse(_unit(x).ravel(), 0.05))
        assert r["psnr"] == pytest.approx(expected, abs=0.1), r["image_id"]
